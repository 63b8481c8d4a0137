"""Builds the project's CUDA C++ kernels (a .cu beside this file) into a shared library
with nvcc, once per source, GPU architecture and nvcc, and loads it with ctypes.

Why not torch.utils.cpp_extension: its builds include PyTorch's headers (about a minute
a build) and need ninja; these kernels take plain pointers and a stream, so a ~5 s nvcc
call and ctypes do. The CUDA runtime is linked statically, and kernels are launched on
the stream the caller passes (PyTorch's current stream, CUDA graph capture included).

Where the library goes: $STRATA_CACHE/kernels (strata/runtime/paths.py), built once
(strata.runtime.build.compile_once: processes building at once never load half a file). nvcc
comes from $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin. Without nvcc or on a
failed build, `load` returns None (logged once) and callers keep their other path.
`Launcher` is one kernel's exported C launcher, typed and loaded per GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
from typing import Callable

from strata.runtime import paths
from strata.runtime.build import compile_once

LOG = logging.getLogger("strata.kernels")
HERE = pathlib.Path(__file__).resolve().parent


def nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def library_path(name: str, arch: str, compiler: str) -> pathlib.Path:
    """Where `name`.cu built for `arch` (e.g. "90") by `compiler` lives."""
    h = hashlib.sha256((HERE / f"{name}.cu").read_bytes())
    for header in sorted(HERE.glob("*.cuh")):  # what the .cu files include
        h.update(header.read_bytes())
    h.update(arch.encode())
    h.update(os.path.realpath(compiler).encode())
    return paths.cache_dir("kernels") / f"{name}-sm{arch}-{h.hexdigest()[:16]}.so"


def build(name: str, arch: str, compiler: str) -> pathlib.Path:
    """Compiles `name`.cu for `arch` unless already built; returns the library's path."""
    def command(tmp: str) -> list[str]:
        return [compiler, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler",
                "-fPIC", "-shared", "-o", tmp, str(HERE / f"{name}.cu")]
    try:
        return compile_once(library_path(name, arch, compiler), command, 600)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"nvcc failed on {name}.cu:\n{e.stderr.decode(errors='replace')[-4000:]}") from e


@functools.lru_cache(maxsize=None)
def load(name: str, arch: str) -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built here (no nvcc, a failed build)."""
    compiler = nvcc()
    if compiler is None:
        LOG.info("no nvcc: the %s CUDA kernels are not built; the Triton kernels run instead", name)
        return None
    try:
        return ctypes.CDLL(str(build(name, arch, compiler)))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        LOG.warning("building %s.cu failed; the Triton kernels run instead: %s", name, e)
        return None


class Launcher:
    """The C launcher `symbol` of `name`.cu, built for each GPU's architecture as
    `arch_for(compute capability)` names it (None: not for that GPU), typed for ctypes
    (`argtypes`; it returns a CUDA error code) and looked up once per device."""

    def __init__(self, name: str, symbol: str, argtypes: list, arch_for: Callable[[tuple[int, int]], str | None]):
        self.name, self.symbol, self.argtypes, self.arch_for = name, symbol, argtypes, arch_for
        self._by_index: dict[int, Callable | None] = {}

    def on(self, device) -> Callable | None:
        """The launcher for this torch CUDA device, or None where it is not built there."""
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._by_index:
            arch = self.arch_for(torch.cuda.get_device_capability(index))
            lib = load(self.name, arch) if arch else None
            fn = None if lib is None else getattr(lib, self.symbol)
            if fn is not None:
                fn.argtypes, fn.restype = self.argtypes, ctypes.c_int
            self._by_index[index] = fn
        return self._by_index[index]

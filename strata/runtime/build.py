"""Compiling a shared library once into a cache file, for the kernels loaded with ctypes
(the KV store's C attention, the compute node's CUDA matmul).

The compiler writes a temporary file beside the target, renamed into place once whole:
processes building at once never load half a file, and a failed build leaves nothing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile
from typing import Callable


def compile_once(out: pathlib.Path, command: Callable[[str], list[str]], timeout: float) -> pathlib.Path:
    """`out`, built by running `command(temporary path)` unless it already exists.
    Raises what subprocess.run raises (CalledProcessError carries the compiler's stderr)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run(command(tmp), check=True, capture_output=True, timeout=timeout)
        os.replace(tmp, out)  # atomic: a concurrent build finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out

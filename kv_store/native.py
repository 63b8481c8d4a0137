"""The KV store's own decode attention kernel (decode_attention*.c): built once per
machine with the system C compiler, loaded with ctypes, run on the library's own pool of
threads (decode_attention_pool.c) that claim (sequence, key/value head) rows a chunk at
a time from one shared counter. A call is one ctypes call (the GIL released for it); no
OpenMP runtime is involved.

Why not PyTorch's CPU SDPA: it needs an INT8/INT4 cache dequantized into a float copy
first, while these kernels read the codes in place; on a bfloat16 cache far beyond the
L3 cache they read at least as fast as SDPA, near DRAM bandwidth with their software
prefetch (bench/attn_sweep.py; figures in BENCHMARKS.md). Where the compiler is
missing or the build fails, `build()` returns None and the KV store keeps SDPA.

The build's options beyond FLAGS are the kernels' prefetch macros (PF_TOKENS, PF_HINT,
PF_NEXT_ROW, QX_PF_BYTES), given by the KV store's configuration: the run plan's
`kv_kernel_defines` (strata/policy/run_plan.py; bench configuration), never the environment.
Each set of macros is its own library in the cache."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import struct
import subprocess
import threading
from typing import Iterable, Mapping

import torch

from strata.policy.run_plan import check_kv_kernel_defines
from strata.runtime import paths
from strata.runtime.build import compile_once

LOG = logging.getLogger("strata.kv_store")
SOURCE = pathlib.Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-shared", "-fPIC", "-pthread"]  # no -ffast-math: masked keys are -inf
MAX_HEAD_DIM = 256  # the kernels' stack buffers
CLAIMS_PER_THREAD = 16  # rows are claimed in chunks of 1/16 of a thread's even share
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


Defines = Mapping[str, int] | Iterable[tuple[str, int]]


def flags(defines: Defines = ()) -> list[str]:
    """FLAGS plus -DNAME=VALUE for each macro (checked as the run plan checks them)."""
    pairs = check_kv_kernel_defines(dict(defines) if isinstance(defines, Mapping) else tuple(defines))
    return FLAGS + [f"-D{name}={value}" for name, value in pairs]


def _machine_key(build_flags: list[str]) -> str:
    """Source, flags, compiler and CPU: -march=native code is for this CPU only."""
    sources = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("decode_attention*.c")))
    h = hashlib.sha256(sources + " ".join(build_flags).encode() + platform.node().encode())
    try:
        h.update(pathlib.Path("/proc/cpuinfo").read_bytes().split(b"\n\n")[0])
    except OSError:
        h.update(platform.processor().encode())
    return h.hexdigest()[:16]


def build(cache_dir: pathlib.Path | None = None, defines: Defines = ()) -> ctypes.CDLL | None:
    """The compiled kernel (compiled now, or found from an earlier build) with these
    prefetch macros (`flags`; none: the sources' defaults), or None."""
    build_flags = flags(defines)
    lib_path = (cache_dir or paths.cache_dir("native")) / f"decode_attention-{_machine_key(build_flags)}.so"
    cc = os.environ.get("CC", "cc")
    try:
        lib = ctypes.CDLL(str(compile_once(lib_path, lambda tmp: [cc, *build_flags, "-o", tmp, str(SOURCE), "-lm"],
                                           120)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        LOG.warning("native decode attention unavailable (%s %s); using PyTorch SDPA", e, detail.decode()[-300:])
        return None
    # the kernels themselves are called by the pool (decode_attention_pool.c), not from here
    fs = lib.strata_quant_scratch_floats
    fs.restype = _I64
    fs.argtypes = [_I64] * 4
    lib.strata_pool_create.restype = _PTR
    lib.strata_pool_create.argtypes = [ctypes.c_int]
    lib.strata_pool_destroy.restype = None
    lib.strata_pool_destroy.argtypes = [_PTR]
    lib.strata_pool_run.restype = ctypes.c_int
    lib.strata_pool_run.argtypes = [_PTR, ctypes.c_int, _PTR, _I64, _I64, _I64]
    return lib


# decode_attention_pool.c's job kinds
JOB_BF16, JOB_QUANT, JOB_QUANTIZE = 0, 1, 2


def _job_args(args: tuple) -> ctypes.Array:
    """A kernel's arguments as the pool's int64 array: integers (pointers among them) as
    they are, a float as its 32 bits."""
    return (ctypes.c_int64 * len(args))(
        *(struct.unpack("<i", struct.pack("<f", a))[0] if isinstance(a, float) else int(a) for a in args))


def _mask_args(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, tuple[int, int, int]]:
    """(the float32 mask kept alive for the call, (pointer, batch stride, head stride))."""
    if mask is None:
        return None, (0, 0, 0)
    mask = mask.float()
    return mask, (mask.data_ptr(), mask.stride(0), 0 if mask.shape[1] == 1 else mask.stride(1))


def quant_shape_supported(head_dim: int, group: int, bits: int) -> bool:
    """Whether the quantized kernels take this format: head_dim within the stack
    buffers, whole groups, and a group's code bytes a multiple of 16 (one vector)."""
    code_bytes = group if bits == 8 else group // 2
    return bits in (4, 8) and 0 < group and head_dim <= MAX_HEAD_DIM and head_dim % group == 0 and code_bytes % 16 == 0


class NewVectors:
    """A decode step's key and value for the bfloat16 kernel to store before it reads:
    k, v [B, Hkv, 1, D] bfloat16 with the same strides (D contiguous), sequence b's going
    to column cols[b] (negative: none)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, cols: list[int]):
        if not self.fits(k, v) or k.shape != v.shape or len(cols) != k.shape[0]:
            raise ValueError("new vectors: k and v bfloat16 [B, Hkv, 1, D] with one layout and a column per row")
        self.k, self.v = k, v
        self.cols = torch.tensor(cols, dtype=torch.int64)  # kept alive for the call

    @staticmethod
    def fits(k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the kernel takes these as they are (else the caller stores them)."""
        return k.dtype == v.dtype == torch.bfloat16 and k.stride() == v.stride() and k.stride(3) == 1

    def args(self) -> tuple[int, ...]:
        return self.k.data_ptr(), self.v.data_ptr(), self.cols.data_ptr(), self.k.stride(0), self.k.stride(1)


class NativeDecodeAttention:
    """softmax(scale * q.K^T + mask) . V for one query per head over a bfloat16 cache,
    on `threads` threads. The pool runs one call at a time: calls from several threads
    take turns (the KV store makes them from one)."""

    def __init__(self, lib: ctypes.CDLL, threads: int):
        self.lib = lib
        self.fn_quant_scratch = lib.strata_quant_scratch_floats
        self.threads = max(1, threads)
        self.pool = lib.strata_pool_create(self.threads)
        self._turn = threading.Lock()
        if not self.pool:
            raise OSError(f"the KV kernel's pool of {self.threads} threads could not be started")

    @classmethod
    def create(cls, threads: int, defines: Defines = ()) -> NativeDecodeAttention | None:
        """The kernel built with `defines` (the run plan's kv_kernel_defines) on `threads`
        threads, or None where it cannot be built."""
        lib = build(defines=defines)
        return None if lib is None else cls(lib, threads)

    def supports(self, q: torch.Tensor, keys: torch.Tensor, group: int = 0, bits: int = 16) -> bool:
        """A bfloat16 cache (keys [B, Hkv, T, D]) or, for `quantized`, its codes (with
        their group and bits: `quant_shape_supported`)."""
        if bits in (4, 8) and not quant_shape_supported(q.shape[3], group, bits):
            return False
        heads, kv_heads, dim = q.shape[1], keys.shape[1], q.shape[3]
        cache_ok = keys.dtype in (torch.bfloat16, torch.uint8) and keys.stride(3) == 1
        return (q.dtype == torch.bfloat16 and q.shape[2] == 1 and heads % kv_heads == 0
                and dim <= MAX_HEAD_DIM and q.stride(3) == 1 and cache_ok)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                 scale: float, new: NewVectors | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, H, 1, D]; keys, values [B, Hkv, T, D] bfloat16 (strided, D contiguous);
        mask None or float32 [B, 1 or H, 1, >= T] (D contiguous). Returns [B, H, 1, D],
        written into `out` where given ([B, H, 1, D] bfloat16, D contiguous).
        `new`: the step's key and value, stored into keys and values by the kernel's
        threads first (`NewVectors`; the caller has checked their shapes)."""
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        mask, m_args = _mask_args(mask)
        args = (q.data_ptr(), keys.data_ptr(), values.data_ptr(), m_args[0], out.data_ptr(),
                q.shape[1], keys.shape[1], keys.shape[2], q.shape[3],
                q.stride(0), q.stride(1), *keys.stride()[:3], *values.stride()[:3], *m_args[1:],
                out.stride(0), out.stride(1), float(scale), *(new.args() if new is not None else (0,) * 5))
        self._parallel(JOB_BF16, args, q.shape[0] * keys.shape[1], keys.shape[2])
        return out

    def quantized(self, q: torch.Tensor, k_parts, v_parts, mask: torch.Tensor | None, scale: float, bits: int,
                  group: int) -> torch.Tensor:
        """The same over a cache stored at `bits` (8 or 4) in groups of `group` on head_dim:
        k_parts, v_parts = (codes [B, Hkv, T, code_width] uint8, scale, min [B, Hkv, T,
        groups] float16), K and V laid out alike (strata/model/kv_quant.py's format)."""
        (kc, ks, km), (vc, vs, vm) = k_parts, v_parts
        d = q.shape[3]
        if not quant_shape_supported(d, group, bits):
            raise ValueError(f"quantized attention: head_dim {d} / group {group} at {bits} bits not supported")
        if vc.stride() != kc.stride() or vs.stride() != ks.stride() or km.stride() != ks.stride() \
                or vm.stride() != ks.stride() or ks.stride(3) != 1:
            raise ValueError("quantized attention: K and V parts must share strides, groups contiguous")
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        mask, m_args = _mask_args(mask)
        args = (q.data_ptr(), kc.data_ptr(), ks.data_ptr(), km.data_ptr(), vc.data_ptr(), vs.data_ptr(),
                vm.data_ptr(), m_args[0], out.data_ptr(), q.shape[1], kc.shape[1], kc.shape[2], d, group, bits,
                q.stride(0), q.stride(1), *kc.stride()[:3], *ks.stride()[:3], *m_args[1:], out.stride(0),
                out.stride(1), float(scale))
        self._parallel(JOB_QUANT, args, q.shape[0] * kc.shape[1], self.fn_quant_scratch(kc.shape[2], d, group, bits))
        return out

    def quantize(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, bits: int,
                 group: int) -> bool:
        """x [B, Hkv, n, D] bfloat16 into the cache's codes [B, Hkv, n, code_width] and
        float16 scale and min [B, Hkv, n, D / group] (strided views of the cache), as
        strata/model/kv_quant.py's `quantize` would. False where the kernel cannot (the
        caller quantizes with PyTorch)."""
        d = x.shape[3]
        if x.dtype != torch.bfloat16 or x.stride(3) != 1 or not quant_shape_supported(d, group, bits) \
                or codes.stride(3) != 1 or scale.stride(3) != 1 or w_min.stride() != scale.stride():
            return False
        args = (x.data_ptr(), codes.data_ptr(), scale.data_ptr(), w_min.data_ptr(), x.shape[1], x.shape[2], d, group,
                bits, *x.stride()[:3], *codes.stride()[:3], *scale.stride()[:3])
        return self._parallel(JOB_QUANTIZE, args, x.shape[0] * x.shape[1], 0) == 0

    def _parallel(self, kind: int, args: tuple, rows: int, scratch_floats: int) -> int:
        """Kernel `kind` over `rows` rows (sequence, key/value head) on the pool's threads,
        which claim them CLAIMS_PER_THREAD-th of an even share at a time, each with its own
        scratch of `scratch_floats` floats. Returns the kernels' code (0: done)."""
        chunk = max(1, rows // (min(self.threads, rows) * CLAIMS_PER_THREAD))
        with self._turn:
            if not self.pool:
                raise RuntimeError("the KV kernel is closed")
            rc = self.lib.strata_pool_run(self.pool, kind, _job_args(args), rows, chunk, scratch_floats)
        if rc == -3:
            raise MemoryError(f"the KV kernel's scratch of {scratch_floats} floats a thread")
        return rc

    def close(self) -> None:
        with self._turn:  # never under a call that is running on the pool
            pool, self.pool = self.pool, None
        if pool:
            self.lib.strata_pool_destroy(pool)

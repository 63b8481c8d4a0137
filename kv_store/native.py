"""The KV store's own decode attention kernel (decode_attention.c): built once per
machine with the system C compiler, loaded with ctypes, run on a pool of threads that
each take a contiguous range of (sequence, key/value head) rows. ctypes releases the
GIL for the call, so the threads run in parallel; no OpenMP runtime is involved.

Why not PyTorch's CPU SDPA: on a working set far beyond the L3 cache it read a
bfloat16 cache at 67-77 GB/s against 85-99 GB/s of DRAM read (bench/attn_sweep.py,
run 24). Where the compiler is missing or the build fails, `build()` returns None and
the KV store keeps SDPA."""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import tempfile
import threading

import torch

LOG = logging.getLogger("strata.kv_store")
SOURCE = pathlib.Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
MAX_GROUP_DIM = 8 * 256  # query heads per key/value head x head_dim: the kernel's stack buffer
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("STRATA_CACHE") or pathlib.Path.home() / ".cache" / "strata"
    return pathlib.Path(base) / "native"


def _machine_key() -> str:
    """Source, flags, compiler and CPU: -march=native code is for this CPU only."""
    h = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + platform.node().encode())
    try:
        h.update(pathlib.Path("/proc/cpuinfo").read_bytes().split(b"\n\n")[0])
    except OSError:
        h.update(platform.processor().encode())
    return h.hexdigest()[:16]


def build(cache_dir: pathlib.Path | None = None) -> ctypes.CDLL | None:
    """The compiled kernel (compiled now, or found from an earlier build), or None."""
    out_dir = cache_dir or _cache_dir()
    lib_path = out_dir / f"decode_attention-{_machine_key()}.so"
    try:
        if not lib_path.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            try:
                cc = os.environ.get("CC", "cc")
                subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True,
                               timeout=120)
                os.replace(tmp, lib_path)  # atomic: a concurrent build finds a whole file or none
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        LOG.warning("native decode attention unavailable (%s %s); using PyTorch SDPA", e, detail.decode()[-300:])
        return None
    fn = lib.strata_decode_attention_bf16
    fn.restype = None
    fn.argtypes = [_PTR] * 5 + [_I64] * 4 + [_I64] * 12 + [ctypes.c_float, _I64, _I64, _PTR]
    return lib


class NativeDecodeAttention:
    """softmax(scale * q.K^T + mask) . V for one query per head over a bfloat16 cache,
    on `threads` threads. Thread-safe for calls on disjoint outputs; the KV store
    calls it from one thread."""

    def __init__(self, lib: ctypes.CDLL, threads: int):
        self.fn = lib.strata_decode_attention_bf16
        self.threads = max(1, threads)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="kv-attend")
        self._scratch = threading.local()

    @classmethod
    def create(cls, threads: int) -> NativeDecodeAttention | None:
        lib = build()
        return None if lib is None else cls(lib, threads)

    def supports(self, q: torch.Tensor, keys: torch.Tensor) -> bool:
        heads, kv_heads, dim = q.shape[1], keys.shape[1], q.shape[3]
        return (q.dtype == keys.dtype == torch.bfloat16 and q.shape[2] == 1 and heads % kv_heads == 0
                and heads // kv_heads * dim <= MAX_GROUP_DIM and q.stride(3) == 1 and keys.stride(3) == 1)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
        """q [B, H, 1, D]; keys, values [B, Hkv, T, D] (strided, D contiguous); mask
        None or float32 [B, 1 or H, 1, >= T] (D contiguous). Returns [B, H, 1, D]."""
        b, h, _, d = q.shape
        hkv, t = keys.shape[1], keys.shape[2]
        out = torch.empty(b, h, 1, d, dtype=q.dtype)
        if mask is not None:
            mask = mask.float()
        m_ptr = 0 if mask is None else mask.data_ptr()
        sm_b = 0 if mask is None else mask.stride(0)
        sm_h = 0 if mask is None or mask.shape[1] == 1 else mask.stride(1)
        args = (q.data_ptr(), keys.data_ptr(), values.data_ptr(), m_ptr, out.data_ptr(), h, hkv, t, d,
                q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
                values.stride(0), values.stride(1), values.stride(2), sm_b, sm_h, out.stride(0), out.stride(1),
                float(scale))
        rows = b * hkv
        n = min(self.threads, rows)
        bounds = [rows * i // n for i in range(n + 1)]
        scratch_floats = (h // hkv) * (t + d)
        jobs = [self.pool.submit(self._run, args, r0, r1, scratch_floats) for r0, r1 in zip(bounds, bounds[1:])]
        for job in jobs:
            job.result()
        return out

    def _run(self, args: tuple, r0: int, r1: int, floats: int) -> None:
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.numel() < floats:
            buf = self._scratch.buf = torch.empty(max(floats, 1 << 16), dtype=torch.float32)
        self.fn(*args, r0, r1, buf.data_ptr())

    def close(self) -> None:
        self.pool.shutdown(wait=True)

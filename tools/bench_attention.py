"""Kernel benchmark of CPU decode attention against host DRAM read bandwidth.

`python -m tools.bench_attention --batch 8 --heads 56 --head-dim 128 --tokens 544
--dtype float16 --threads 16 --kv-bits 16,8,4` prints one JSON line per KV precision,
all against the DRAM read bandwidth measured once in the same run. Attention runs
through the KV store's own cache classes (`GroupCache`, and `QuantizedGroupCache` for
8 and 4 bits), as the service calls them.

Per precision: `step_s` (seconds per decode step), `bytes_per_step` (K and V bytes the
step reads as stored: codes plus scales and mins when quantized), `kv_read_gbps` (those
bytes over the step time), `bf16_bytes_per_step` and `bf16_equiv_gbps` (the bytes a
bfloat16 cache of the same tokens would hold, over the same time: the bandwidth a
16-bit kernel would need to keep up).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from kv_store.group_cache import GroupCache, GroupSpec
from kv_store.native import NativeDecodeAttention
from kv_store.quantized import QuantizedGroupCache, kv_format
from strata.policy.run_plan import parse_kv_kernel_defines
from strata.transport.shm import torch_dtype

WARMUP = 3


def dram_read_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Host DRAM read bandwidth (GB/s): best of `repeats` sums over a float32 tensor."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _timed_steps(cache: GroupCache, tokens: int, steps: int) -> tuple[float, float]:
    """Fill `tokens` tokens in every layer, then time `steps` decode steps (one attend
    per layer each, as the service makes them); returns (seconds per step, mean tokens
    attended over per step). More layers than the last-level cache holds: no step reads
    what the previous left cached."""
    s = cache.spec
    shape = (s.batch, s.kv_heads, tokens, s.head_dim)
    for layer in range(s.num_layers):
        cache.append(layer, torch.randn(shape).to(s.dtype), torch.randn(shape).to(s.dtype))
    q = torch.randn(s.batch, s.num_heads, 1, s.head_dim).to(s.dtype)
    kv = torch.randn(s.batch, s.kv_heads, 1, s.head_dim).to(s.dtype)

    def step():
        for layer in range(s.num_layers):
            cache.attend(layer, q, kv, kv)

    for _ in range(WARMUP):
        step()
    first = cache.lengths[0]
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps, first + (steps + 1) / 2


def bench(batch: int, heads: int, head_dim: int, tokens: int, dtype: str, threads: int, steps: int = 20,
          kv_bits: int = 16, kv_group: int = 0, dram: float | None = None, attention: str = "native",
          layers: int = 1, defines: dict | None = None) -> dict:
    """Time `attend` on a cache holding `tokens` tokens stored at `kv_bits`; GB/s of
    K+V read per step. `dram`: GB/s measured already in this run (default: measure).
    `attention`: "native" (the KV store's kernel where it applies, as the service runs
    it) or "sdpa". `defines`: the kernel's prefetch macros (strata/policy/run_plan.py's
    kv_kernel_defines)."""
    if threads > 0:
        torch.set_num_threads(threads)
    kernel = NativeDecodeAttention.create(threads or torch.get_num_threads(), defines or {}) if attention == "native" else None
    spec = GroupSpec(
        num_layers=layers, batch=batch, num_heads=heads, head_dim=head_dim, max_tokens=tokens + WARMUP + steps,
        dtype=torch_dtype(dtype), scale=head_dim**-0.5, kv_bits=kv_bits, kv_group_size=kv_group,
    )  # fmt: skip
    quantized = kv_bits in (4, 8)
    cache = (QuantizedGroupCache if quantized else GroupCache)(spec, None, kernel)
    try:
        step_s, mean_tokens = _timed_steps(cache, tokens, steps)
    finally:
        if kernel is not None:
            kernel.close()
    vectors = 2 * layers * batch * heads * mean_tokens  # K and V, one per token, head and layer
    read = vectors * (kv_format(spec).vector_bytes if quantized else head_dim * spec.itemsize)
    bf16 = vectors * head_dim * 2
    kv_gbps = read / step_s / 1e9
    dram = dram_read_gbps() if dram is None else dram
    return {
        "bench": "kv_attention",
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "tokens": tokens,
        "layers": layers,
        "dtype": dtype,
        "kv_bits": kv_bits,
        "kv_group": spec.kv_group if quantized else 0,
        "threads": torch.get_num_threads(),
        "attention": "native" if kernel is not None else "sdpa",
        "step_ms": _sig(step_s * 1e3),
        "step_s": _sig(step_s, 6),
        "bytes_per_step": round(read),
        "bf16_bytes_per_step": round(bf16),
        "kv_read_gbps": _sig(kv_gbps),
        "bf16_equiv_gbps": _sig(bf16 / step_s / 1e9),
        "dram_read_gbps": _sig(dram),
        "fraction_of_dram": _sig(kv_gbps / dram, 3),
        "cpu": cpu_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_name() -> str:
    """The machine's CPU model (a result line says what it ran on)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The call `strata profile` times (per KV precision): T1's heads and tokens (OPT-30B, prompt
# 512 + 32 new) at the size of the service's calls (a micro-batch of 64-128 sequences: at
# 8-16 the per-call fan-out to the kernel's threads weighs in, and the H200's INT4 rate
# measured 17 GB/s there against 41 in the service), several layers a step so that no
# step reads what the last left in cache.
PROFILE_SHAPE = {"batch": 64, "heads": 56, "head_dim": 128, "tokens": 544, "layers": 4}
QUICK_SHAPE = {"batch": 8, "heads": 56, "head_dim": 128, "tokens": 128, "layers": 1}
PROFILE_FIELDS = {16: "cpu_attention_bytes_per_s", 8: "cpu_attention_int8_bytes_per_s",
                  4: "cpu_attention_int4_bytes_per_s"}


def profile_rates(threads: int, quick: bool = False, dram: float | None = None) -> dict:
    """The hardware profile's CPU attention fields: KV bytes as stored read per second by
    the kernel the KV store runs (its own where it builds, else SDPA, as the service
    decides), over a bfloat16 cache and over INT8 and INT4 caches; and which kernel ran.
    `dram`: GB/s measured already (reported beside each rate; default: measured here)."""
    shape = QUICK_SHAPE if quick else PROFILE_SHAPE
    dram = dram_read_gbps((256 << 20) if quick else 1 << 30) if dram is None else dram  # GB/s
    out: dict = {}
    kernels = set()
    for bits, field in PROFILE_FIELDS.items():
        row = bench(shape["batch"], shape["heads"], shape["head_dim"], shape["tokens"], "bfloat16", threads,
                    steps=5 if quick else 20, kv_bits=bits, dram=dram,
                    attention="native", layers=shape["layers"])
        out[field] = row["kv_read_gbps"] * 1e9
        kernels.add(row["attention"])
    out["cpu_attention_kernel"] = "/".join(sorted(kernels))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.bench_attention")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=56)  # OPT-30B
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=544)  # prompt 512 + generation 32
    p.add_argument("--dtype", default="float16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=1, help="layers attended per step, each its own cache")
    p.add_argument("--kv-bits", default="16,8,4", help="comma-separated KV precisions, each 16, 8 or 4")
    p.add_argument("--kv-group", type=int, default=0,
                   help="quantization group on head_dim; 0 = 64 where that divides head_dim (the service's)")
    p.add_argument("--dram-bytes", type=int, default=1 << 30, help="bytes summed to measure DRAM read bandwidth")
    p.add_argument("--attention", choices=["native", "sdpa"], default="native")
    p.add_argument("--kv-kernel-defines", type=parse_kv_kernel_defines, default={}, metavar="'PF_TOKENS=0 PF_HINT=2'",
                   help="the native kernel's prefetch macros")
    a = p.parse_args(argv)
    bits = [int(b) for b in a.kv_bits.split(",")]
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dram = dram_read_gbps(a.dram_bytes)
    for b in bits:
        row = bench(a.batch, a.heads, a.head_dim, a.tokens, a.dtype, a.threads, a.steps, b, a.kv_group, dram,
                    a.attention, a.layers, a.kv_kernel_defines)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

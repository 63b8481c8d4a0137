"""Kernel benchmark of CPU decode attention against host DRAM read bandwidth.

`python -m kv_store.bench_attention --batch 8 --heads 56 --head-dim 128 --tokens 544
--dtype float16 --threads 16` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kv_store.attention import GroupCache, GroupSpec
from strata.shm import torch_dtype


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


def bench(batch: int, heads: int, head_dim: int, tokens: int, dtype: str, threads: int, steps: int = 20) -> dict:
    """Time `attend` on a cache holding `tokens` tokens; GB/s of K+V read per step."""
    if threads > 0:
        torch.set_num_threads(threads)
    warmup = 3
    spec = GroupSpec(
        num_layers=1, batch=batch, num_heads=heads, head_dim=head_dim,
        max_tokens=tokens + warmup + steps, dtype=torch_dtype(dtype), scale=head_dim**-0.5,
    )  # fmt: skip
    cache = GroupCache(spec)
    shape = (batch, heads, tokens, head_dim)
    cache.append(0, torch.randn(shape).to(spec.dtype), torch.randn(shape).to(spec.dtype))
    one = torch.randn(batch, heads, 1, head_dim).to(spec.dtype)
    for _ in range(warmup):
        cache.attend(0, one, one, one)
    first = cache.lengths[0]
    t0 = time.perf_counter()
    for _ in range(steps):
        cache.attend(0, one, one, one)
    elapsed = time.perf_counter() - t0
    mean_tokens = first + (steps + 1) / 2
    kv_bytes = 2 * batch * heads * mean_tokens * head_dim * spec.itemsize
    step_s = elapsed / steps
    kv_gbps = kv_bytes / step_s / 1e9
    dram = dram_read_gbps()
    return {
        "bench": "kv_attention",
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "tokens": tokens,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "step_ms": round(step_s * 1e3, 3),
        "kv_read_gbps": round(kv_gbps, 2),
        "dram_read_gbps": round(dram, 2),
        "fraction_of_dram": round(kv_gbps / dram, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kv_store.bench_attention")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=56)  # OPT-30B
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=544)  # prompt 512 + generation 32
    p.add_argument("--dtype", default="float16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    print(json.dumps(bench(a.batch, a.heads, a.head_dim, a.tokens, a.dtype, a.threads, a.steps)))


if __name__ == "__main__":
    main()

"""The KV store's bf16 decode kernel against the size of the cache it streams: one
cache of `--layers` layers at T1's call shape (80 sequences x 56 heads x 528 tokens,
huge-page storage, filled once), timed over its first few layers and over all of
them, for each kernel build (prefetch macros) and thread count asked.

    PYTHONPATH=. python3 bench/attn_size.py [--layers 84] [--sets 4,84] [--variants ",PF_TOKENS=32"] [--threads 16]

Why: whether the cache's size, the prefetch build, the step's own work or busy
neighbours explain a service that reads slower than the kernel alone (BENCHMARKS.md,
sixteenth session). One JSON line per (variant, threads, mode, set); the table last."""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import subprocess
import sys
import time

import torch

from attn_sweep import HEAD_DIM, HEADS, TOKENS, dram, make_cache
from kv_store.native import NativeDecodeAttention
from strata.policy.run_plan import parse_kv_kernel_defines


def pass_s(kernel, cache, layers: int, rounds: int, service: bool = False) -> float:
    """Best seconds of one pass of attends over layers [0, layers): the bare kernel, or
    with `service` the KV store's whole slot step (GroupCache.attend_at: the new token's
    store, then the kernel over TOKENS tokens)."""
    q = torch.randn(cache.spec.batch, HEADS, 1, HEAD_DIM).to(torch.bfloat16)
    positions = [TOKENS - 1] * cache.spec.batch
    cache.native = kernel
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms the kernel's pool
        t0 = time.perf_counter()
        for layer in range(layers):
            if service:
                cache.attend_at(layer, q, q, q, positions)
            else:
                kernel(q, cache.keys[layer][:, :, :TOKENS], cache.values[layer][:, :, :TOKENS], None, cache.spec.scale)
        best = min(best, time.perf_counter() - t0)
    return best


def busy_loops(n: int) -> list[subprocess.Popen]:
    """n processes that each keep one core busy (a stand-in for the peers' threads)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=80)
    p.add_argument("--layers", type=int, default=84)
    p.add_argument("--sets", default="4,84", help="layer counts a pass covers, comma-separated")
    p.add_argument("--variants", default=",PF_TOKENS=32,PF_TOKENS=64,PF_TOKENS=0",
                   help="kernel macro sets, comma-separated ('' = the sources' defaults)")
    p.add_argument("--threads", default="16", help="kernel thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="kernel", help="comma-separated: kernel, service (GroupCache.attend_at), "
                   "busyN (the kernel while N other processes spin)")
    a = p.parse_args()
    per_layer = 2 * a.batch * HEADS * TOKENS * HEAD_DIM * 2
    rows = []
    with concurrent.futures.ThreadPoolExecutor(1) as worker:  # the KV store calls from a worker thread
        rows.append({"way": "dram@16", "GBps": round(worker.submit(dram, 8 << 30, 16).result(), 1)})
        print(json.dumps(rows[-1]), flush=True)
        t0 = time.perf_counter()
        cache = worker.submit(make_cache, a.batch, a.layers).result()
        print(json.dumps({"filled_gb": round(per_layer * a.layers / 1e9, 1), "s": round(time.perf_counter() - t0, 1)}),
              flush=True)
        for variant in a.variants.split(","):
            for threads in map(int, a.threads.split(",")):
                kernel = NativeDecodeAttention.create(threads, parse_kv_kernel_defines(variant) if variant else {})
                try:
                    for mode, layers in itertools.product(a.modes.split(","), map(int, a.sets.split(","))):
                        busy = busy_loops(int(mode[4:]) if mode.startswith("busy") else 0)
                        try:
                            s = worker.submit(pass_s, kernel, cache, min(layers, a.layers), a.rounds,
                                              mode == "service").result()
                        finally:
                            for b in busy:
                                b.kill()
                        rows.append({"way": f"{variant or 'default'}@{threads} {mode}", "layers": layers,
                                     "GB": round(per_layer * layers / 1e9, 1), "ms_per_layer": round(s / layers * 1e3, 2),
                                     "GBps": round(per_layer * layers / s / 1e9, 1)})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    kernel.close()
    print(f"{'way':<36} {'layers':>6} {'GB/s':>6}")
    for r in rows[1:]:
        print(f"{r['way']:<36} {r['layers']:>6} {r['GBps']:>6}")
    print(f"dram@16 {rows[0]['GBps']}")


if __name__ == "__main__":
    main()

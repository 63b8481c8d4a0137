"""The KV store's bf16 decode kernel against the size of the cache it streams: one
cache of `--layers` layers at T1's call shape (80 sequences x 56 heads x 528 tokens,
huge-page storage, filled once), timed over its first few layers and over all of
them, for each kernel build (prefetch macros) and thread count asked.

    PYTHONPATH=. python3 bench/attn_size.py [--layers 84] [--sets 4,84] [--variants ",PF_TOKENS=32"] [--threads 16]

Why: alone on a few GB the kernel reads 110-124 GB/s on the H200 hosts; in the service,
over a ~120 GB cache, it read 80-95 on some. One JSON line per (variant, threads, set);
the table last."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time

import torch

from attn_sweep import HEAD_DIM, HEADS, TOKENS, dram, make_cache
from kv_store.native import NativeDecodeAttention
from strata.policy.run_plan import parse_kv_kernel_defines


def pass_s(kernel, cache, layers: int, rounds: int) -> float:
    """Best seconds of one pass of attends over layers [0, layers)."""
    q = torch.randn(cache.spec.batch, HEADS, 1, HEAD_DIM).to(torch.bfloat16)
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms the kernel's pool
        t0 = time.perf_counter()
        for layer in range(layers):
            kernel(q, cache.keys[layer][:, :, :TOKENS], cache.values[layer][:, :, :TOKENS], None, cache.spec.scale)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=80)
    p.add_argument("--layers", type=int, default=84)
    p.add_argument("--sets", default="4,84", help="layer counts a pass covers, comma-separated")
    p.add_argument("--variants", default=",PF_TOKENS=32,PF_TOKENS=64,PF_TOKENS=0",
                   help="kernel macro sets, comma-separated ('' = the sources' defaults)")
    p.add_argument("--threads", default="16", help="kernel thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
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
                    for layers in map(int, a.sets.split(",")):
                        s = worker.submit(pass_s, kernel, cache, min(layers, a.layers), a.rounds).result()
                        rows.append({"way": f"{variant or 'default'}@{threads}", "layers": layers,
                                     "GB": round(per_layer * layers / 1e9, 1), "ms_per_layer": round(s / layers * 1e3, 2),
                                     "GBps": round(per_layer * layers / s / 1e9, 1)})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    kernel.close()
    print(f"{'way':<28} {'layers':>6} {'GB/s':>6}")
    for r in rows[1:]:
        print(f"{r['way']:<28} {r['layers']:>6} {r['GBps']:>6}")
    print(f"dram@16 {rows[0]['GBps']}")


if __name__ == "__main__":
    main()

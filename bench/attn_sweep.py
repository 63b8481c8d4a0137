"""CPU decode attention on a working set far larger than the L3 cache, as the KV store
sees it at T1 (many layers in huge-page storage, called from a worker thread), one
way of running it per line, against DRAM read bandwidth measured the same way.

    python3 bench/attn_sweep.py [--batch 84] [--layers 6]

Ways: `sdpa` (GroupCache.attend, one OpenMP team of T threads), `chunkC` (the same
call over C sequences at a time), `splitN` (N Python threads, each one OpenMP thread,
each on its own slice of the batch), `native` (the KV store's own kernel on T threads).
One JSON line each; the table last."""

from __future__ import annotations

import argparse
import dataclasses
import concurrent.futures
import json
import time

import torch
import torch.nn.functional as F

from kv_store.group_cache import GroupCache, GroupSpec
from kv_store.host_pages import huge_page_tensor
from kv_store.native import NativeDecodeAttention
from kv_store.quantized import QuantizedGroupCache, quantized_bytes

HEADS, HEAD_DIM, TOKENS = 56, 128, 528  # OPT-30B at the middle of a 512+32 run


def dram(nbytes: int, threads: int) -> float:
    """GB/s of a float32 sum over `nbytes` (best of 3)."""
    torch.set_num_threads(threads)
    x = huge_page_tensor(nbytes).view(torch.float32)
    x.fill_(1.0)
    best = min(_time(x.sum) for _ in range(3))
    return nbytes / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_cache(batch: int, layers: int) -> GroupCache:
    spec = GroupSpec(num_layers=layers, batch=batch, num_heads=HEADS, head_dim=HEAD_DIM, max_tokens=TOKENS + 16,
                     dtype=torch.bfloat16, scale=HEAD_DIM**-0.5)
    nbytes = 2 * layers * batch * HEADS * (TOKENS + 16) * HEAD_DIM * 2
    storage = huge_page_tensor(nbytes)
    storage.zero_()
    cache = GroupCache(spec, storage)
    kv = torch.randn(batch, HEADS, TOKENS, HEAD_DIM).to(torch.bfloat16)
    for layer in range(layers):
        cache.append(layer, kv, kv)
    return cache


def make_quantized(cache: GroupCache, bits: int, kernel) -> "QuantizedGroupCache":
    spec = dataclasses.replace(cache.spec, kv_bits=bits, kv_group_size=64)
    q = QuantizedGroupCache(spec, huge_page_tensor(quantized_bytes(spec)), kernel)
    for layer in range(spec.num_layers):
        q.append(layer, cache.keys[layer][:, :, :TOKENS - 1], cache.values[layer][:, :, :TOKENS - 1])
    return q


def split_attend(pool, n: int, cache: GroupCache, layer: int, q) -> torch.Tensor:
    """Attention over the cached tokens, the batch cut into n slices on n threads."""
    length = cache.lengths[layer]
    keys, values = cache.keys[layer][:, :, :length], cache.values[layer][:, :, :length]
    out = torch.empty_like(q)
    bounds = [round(i * q.shape[0] / n) for i in range(n + 1)]

    def one(a, b):
        out[a:b] = F.scaled_dot_product_attention(q[a:b], keys[a:b], values[a:b], scale=cache.spec.scale)

    list(pool.map(one, bounds[:-1], bounds[1:]))
    return out


def sweep(cache: GroupCache, way: str, threads: int, rounds: int = 3) -> float:
    """Seconds per attend (a pass over every layer, `rounds` times, best round)."""
    layers = cache.spec.num_layers
    q = torch.randn(cache.spec.batch, HEADS, 1, HEAD_DIM).to(torch.bfloat16)
    torch.set_num_threads(threads)
    pool = None
    if way in ("q8", "q4"):  # a quantized copy of the same cache, through the KV store's kernel
        qcache = make_quantized(cache, int(way[1:]), NativeDecodeAttention.create(threads))

        def run(layer):  # append one token and attend over TOKENS, as a decode step does; then undo the append
            qcache.attend(layer, q, q, q)
            qcache.lengths[layer] = TOKENS - 1
    elif way == "native":
        kernel = NativeDecodeAttention.create(threads)
        run = lambda layer: kernel(  # noqa: E731
            q, cache.keys[layer][:, :, :TOKENS], cache.values[layer][:, :, :TOKENS], None, cache.spec.scale)
    elif way.startswith("split"):
        n = int(way[5:])
        pool = concurrent.futures.ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,))
        run = lambda layer: split_attend(pool, n, cache, layer, q)  # noqa: E731
    else:
        step = int(way[5:]) if way.startswith("chunk") else q.shape[0]

        def run(layer):
            keys, values = cache.keys[layer][:, :, :TOKENS], cache.values[layer][:, :, :TOKENS]
            for b in range(0, q.shape[0], step):
                F.scaled_dot_product_attention(q[b : b + step], keys[b : b + step], values[b : b + step],
                                               scale=cache.spec.scale)
    run(0)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for layer in range(layers):
            run(layer)
        best = min(best, (time.perf_counter() - t0) / layers)
    if pool is not None:
        pool.shutdown()
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=84)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--ways", default="sdpa@16,native@16,q8@16,q4@16,q8@14,q8@12")
    a = p.parse_args()
    rows = []
    with concurrent.futures.ThreadPoolExecutor(1) as worker:  # the KV store calls from a worker thread
        for t in (14, 16):
            rows.append({"way": f"dram@{t}", "GBps": round(worker.submit(dram, 8 << 30, t).result(), 1)})
            print(json.dumps(rows[-1]), flush=True)
        cache = worker.submit(make_cache, a.batch, a.layers).result()
        per_layer = 2 * a.batch * HEADS * TOKENS * HEAD_DIM * 2  # bf16 bytes (q8/q4: the bf16 equivalent)
        for spec in a.ways.split(","):
            way, _, threads = spec.partition("@")
            s = worker.submit(sweep, cache, way, int(threads or 14)).result()
            rows.append({"way": spec, "batch": a.batch, "layers": a.layers, "ms": round(s * 1e3, 2),
                         "GBps": round(per_layer / s / 1e9, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("way           GB/s")
    for r in rows:
        print(f"{r['way']:<13} {r['GBps']}")


if __name__ == "__main__":
    main()

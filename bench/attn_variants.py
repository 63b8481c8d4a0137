"""Why is the KV store's attention slower in the service than in the kernel bench?
Times GroupCache.attend under the service's conditions one at a time: batch, thread
count, calling thread, arena (huge-page) storage, many layers. One JSON line each."""

from __future__ import annotations

import concurrent.futures
import json
import time

import torch

from kv_store.group_cache import GroupCache, GroupSpec
from kv_store.host_pages import huge_page_tensor


def run(batch=32, threads=14, worker=False, arena=False, layers=1, steps=6) -> dict:
    spec = GroupSpec(num_layers=layers, batch=batch, num_heads=56, head_dim=128, max_tokens=544,
                     dtype=torch.bfloat16, scale=1.0)
    nbytes = 2 * layers * batch * 56 * 544 * 128 * 2
    storage = None
    if arena:
        storage = huge_page_tensor(nbytes)
        storage.zero_()
    cache = GroupCache(spec, storage)
    kv = torch.randn(batch, 56, 512, 128).to(torch.bfloat16)
    for layer in range(layers):
        cache.append(layer, kv, kv)
    one = torch.randn(batch, 56, 1, 128).to(torch.bfloat16)

    def body():
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            for layer in range(layers):
                cache.attend(layer, one, one, one)
                n += 1
        return (time.perf_counter() - t0) / n

    if worker:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            dt = ex.submit(body).result()
    else:
        dt = body()
    length = 512 + steps
    gb = 2 * batch * 56 * length * 128 * 2 / 1e9
    return {"batch": batch, "threads": threads, "worker": worker, "arena": arena, "layers": layers,
            "ms": round(dt * 1e3, 3), "GBps": round(gb / dt, 1)}


def main() -> None:
    for b, t in [(16, 16), (32, 16), (32, 14), (32, 8), (8, 14)]:
        for row in kernels(b, t):
            print(json.dumps(row), flush=True)
    for kw in [dict(), dict(worker=True, arena=True, layers=24)]:
        print(json.dumps(run(**kw)), flush=True)


def kernels(batch: int, threads: int, steps: int = 8) -> list[dict]:
    """SDPA against two GEMVs (matmul, softmax, matmul) on one layer's cache."""
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    k = torch.randn(batch, 56, 544, 128).to(torch.bfloat16)
    v = torch.randn(batch, 56, 544, 128).to(torch.bfloat16)
    q = torch.randn(batch, 56, 1, 128).to(torch.bfloat16)
    gb = 2 * k.numel() * 2 / 1e9

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v)

    def gemv():
        s = torch.matmul(q, k.transpose(-1, -2)).float()
        return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)

    def gemv32():
        s = torch.matmul(q.float(), k.transpose(-1, -2).float())
        return torch.matmul(torch.softmax(s, -1), v.float())

    out = []
    for name, fn in [("sdpa", sdpa), ("gemv_bf16", gemv), ("gemv_fp32cast", gemv32)]:
        fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        dt = (time.perf_counter() - t0) / steps
        out.append({"kernel": name, "batch": batch, "threads": threads, "ms": round(dt * 1e3, 3),
                    "GBps": round(gb / dt, 1)})
    return out


if __name__ == "__main__":
    main()

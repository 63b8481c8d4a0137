"""Profile the engine in one process on the GPU (no services): a dummy model's host
tier in this process's memory, local KV, one prefill and a few decode steps under
torch.profiler. Prints step times and the top kernels. For finding where time goes;
the figures that count come from `strata bench`."""

from __future__ import annotations

import argparse
import time

import torch

from compute_node.engine import Engine, local_kv_factory
from compute_node.layer_weights import LayerWeights
from strata.placement import resident_layers
from compute_node.sampling import Sampling
from compute_node.weights import HostWeights
from strata.dummy_fill import fill
from weight_store.dummy import dummy_manifest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="facebook/opt-30b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=6)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--share", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefill", action="store_true", help="profile the full-length prefill instead of decode")
    p.add_argument("--decode-prompt", type=int, default=8, help="prompt length of the profiled decode")
    a = p.parse_args()
    m = dummy_manifest(a.model, 4, 64)
    raw = {n: torch.empty(s.size, dtype=torch.uint8).pin_memory() for n, s in m.shards.items()}
    fill(raw, m, threads=16)
    host = HostWeights(m, "", raw, [])
    dev, dtype = torch.device("cuda"), getattr(torch, a.dtype)
    lw = LayerWeights(host, dev, dtype, resident_layers(m.num_layers, a.share))
    engine = Engine(lw, local_kv_factory(dtype, dev), micro_batches=a.micro_batches)
    prompts = [[7] * a.prompt for _ in range(a.batch)]
    list(engine.generate([[5] * 8], 2, Sampling()))  # warm up
    torch.cuda.synchronize()
    times = []
    t = time.perf_counter()
    gen = engine.generate(prompts, a.gen, Sampling())
    for _ in gen:
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
    step_times = [round(x, 4) for x in times]
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    if a.prefill:  # one token: the step is the prefill
        steps = engine.generate(prompts, 1, Sampling())
    else:  # decode only: the prefill (prompts of --decode-prompt tokens) runs before profiling
        steps = engine.generate([[7] * a.decode_prompt for _ in range(a.batch)], a.gen, Sampling())
        next(steps)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in steps:
            pass
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    print("step times (s):", step_times)


if __name__ == "__main__":
    main()

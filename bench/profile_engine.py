"""Profile the compute node's passes in one process on the GPU (no services): a dummy
model's host tier in this process's memory, the scheduler's sequence slots on the
device (LocalSlots groups and a Runner, as compute_node/server.py builds them), one
prefill pass of the batch and a few decode passes under torch.profiler. Prints pass
times and the top kernels. For finding where time goes; the figures that count come
from `strata bench`. `--device cpu --model facebook/opt-125m` runs it off a GPU."""

from __future__ import annotations

import argparse
import time

import torch

from compute_node.device import device_for
from compute_node.layer_weights import LayerWeights
from compute_node.model import family_for
from compute_node.runner import GroupStep, Join, Runner
from compute_node.slot_kv import LocalSlots, SlotShape
from compute_node.slots import even_groups
from compute_node.weights import HostWeights
from strata.model.arch import dims_for
from strata.policy.placement import resident_layers
from tools.dummy.manifest import dummy_manifest
from tools.dummy.weights import fill


class Passes:
    """A batch of prompts through the runner: the prefill pass, then decode passes,
    each sequence in its own slot (rows of the groups in order), greedy tokens fed back."""

    def __init__(self, runner: Runner, groups: tuple[int, ...], sync):
        self.runner, self.groups, self.sync = runner, groups, sync

    def run(self, prompts: list[list[int]], passes: int):
        """Yields after each pass, the device synchronized."""
        seats = [(g, r) for g, rows in enumerate(self.groups) for r in range(rows)][: len(prompts)]
        joined, _ = self.runner.step([Join(g, r, p) for (g, r), p in zip(seats, prompts)], [])
        tokens = joined.argmax(-1).tolist()
        self.sync()
        yield
        for t in range(1, passes):
            steps, order = [], []
            for g in range(len(self.groups)):
                mine = [i for i, (h, _) in enumerate(seats) if h == g]  # rows 0..len(mine)-1 of group g
                if mine:
                    steps.append(GroupStep(g, [tokens[i] for i in mine], [len(prompts[i]) + t - 1 for i in mine]))
                    order += mine
            _, logits = self.runner.step([], steps)
            for i, x in zip(order, torch.cat(logits).argmax(-1).tolist()):
                tokens[i] = x
            self.sync()
            yield


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="facebook/opt-30b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=6)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--share", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--graphs", choices=["on", "off"], default="on",
                   help="decode-only passes as fixed-shape steps the device captures (runner.py)")
    p.add_argument("--device", default="cuda", help="cuda[:N], cpu or mock-cuda (compute_node/device/)")
    p.add_argument("--prefill", action="store_true", help="profile the full-length prefill instead of decode")
    p.add_argument("--decode-prompt", type=int, default=8, help="prompt length of the profiled decode")
    a = p.parse_args()
    dev, dtype = device_for(a.device), getattr(torch, a.dtype)
    cuda = dev.kind == "cuda"
    m = dummy_manifest(a.model, 4, 64)
    raw = {n: torch.empty(s.size, dtype=torch.uint8) for n, s in m.shards.items()}
    if cuda:
        raw = {n: t.pin_memory() for n, t in raw.items()}
    fill(raw, m, threads=16)
    host = HostWeights(m, "", raw, [])
    dims = dims_for(m.config)
    family = family_for(m.config, dims)
    lw = LayerWeights(host, dev, dtype, resident_layers(m.num_layers, a.share))
    groups = even_groups(a.batch, a.micro_batches)
    capacity = max(a.prompt, a.decode_prompt) + a.gen
    kvs = [LocalSlots(SlotShape(dims.num_layers, dims.num_heads, dims.kv_heads, dims.head_dim, rows, capacity,
                                family.scale, family.alibi), dtype, dev) for rows in groups]
    runner = Runner(lw, family, dims.num_layers, kvs, max(groups) * capacity, a.graphs == "on")
    passes = Passes(runner, groups, dev.synchronize)
    for _ in passes.run([[5] * 8] * a.batch, 2):  # warm up (and capture the full batch's decode graphs)
        pass
    prompts = [[7] * a.prompt for _ in range(a.batch)]
    times = []
    t = time.perf_counter()
    for _ in passes.run(prompts, a.gen):
        times.append(round(time.perf_counter() - t, 4))
        t = time.perf_counter()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if a.prefill:  # one pass: the prefill
        steps = passes.run(prompts, 1)
    else:  # decode only: the prefill (prompts of --decode-prompt tokens) runs before profiling
        steps = passes.run([[7] * a.decode_prompt for _ in range(a.batch)], a.gen)
        next(steps)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in steps:
            pass
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    if cuda:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    print("pass times (s):", times)


if __name__ == "__main__":
    main()

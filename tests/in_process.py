"""The compute node's generation in one process, without the services: a Runner
(compute_node/runner.py) over LocalSlots groups, built as ComputeNode._runner builds
it, driven by the real Scheduler. For the tests that check the model's math against
transformers (the services are exercised in tests/deploy and test_scheduler.py)."""

from __future__ import annotations

import contextlib

import torch

from compute_node.device import device_for
from compute_node.layer_weights import LayerWeights
from compute_node.metrics import Metrics
from compute_node.model import family_for
from compute_node.runner import Runner
from compute_node.sampling import Sampling
from compute_node.requests import Request
from compute_node.scheduler import Scheduler
from compute_node.slot_kv import LocalSlots, SlotShape
from compute_node.slots import Limits
from compute_node.stops import StopWatch
from compute_node.weights import HostWeights
from strata.model.arch import dims_for
from strata.runtime.errors import StrataError

CPU = torch.device("cpu")
GREEDY = Sampling(greedy=True)


class InProcess:
    """A model's runner: `groups` of slots (rows per group, the micro-batches) of
    `capacity` tokens each, every layer resident unless `resident` says which.
    `device`: a device name ("mock-cuda"), torch device or Device (compute_node/device/).
    `graphs`: fixed-shape decode steps, captured by the device (compute_node/slot_graphs.py).
    `slots(shape) -> a group's KV cache` stands in for LocalSlots where given.
    `prefill_budget`: the scheduler's prompt tokens per pass (0: no bound)."""

    def __init__(self, shards, groups: tuple[int, ...] = (3,), capacity: int = 48, kv_bits: int = 16,
                 graphs: bool = False, resident: set[int] | None = None, device=CPU,
                 dtype: torch.dtype = torch.float32, slots=None, prefill_budget: int = 0, **weights_kw):
        self.device = device = device_for(device)
        host = HostWeights.from_directory(shards)
        self.dims = d = dims_for(host.manifest.config)
        self.family = family = family_for(host.manifest.config, d)
        layers = set(range(d.num_layers)) if resident is None else resident
        self.weights = LayerWeights(host, device, dtype, layers, **weights_kw)
        slots = slots or (lambda shape: LocalSlots(shape, dtype, device, kv_bits))
        self.kvs = [slots(SlotShape(d.num_layers, d.num_heads, d.kv_heads, d.head_dim, rows, capacity, family.scale,
                                    family.alibi)) for rows in groups]
        self.limits = Limits(tuple(groups), capacity, max_queue=64)
        self.runner = Runner(self.weights, family, d.num_layers, self.kvs, max(groups) * capacity, graphs)
        self.eos = d.eos_token_id
        self.prefill_budget = prefill_budget

    @contextlib.contextmanager
    def scheduler(self):
        """A Scheduler over this runner (its thread), stopped at the end."""
        s = Scheduler(self.runner, self.limits, self.eos, self.dims.pad_token_id or 0, Metrics(),
                      prefill_budget=self.prefill_budget)
        try:
            yield s
        finally:
            s.stop()

    def steps(self, prompts: list[list[int]], max_new: int, sampling: Sampling = GREEDY,
              stop_at_eos: bool = False) -> list[list[int]]:
        """One request alone: the tokens of each step, one per prompt (-1 once a
        sequence has finished)."""
        with self.scheduler() as s:
            return collect(s.submit(request(prompts, max_new, sampling, stop_at_eos)))

    def generate(self, prompts: list[list[int]], max_new: int, sampling: Sampling = GREEDY,
                 stop_at_eos: bool = False) -> list[list[int]]:
        """One request alone: each prompt's generated tokens."""
        return columns(self.steps(prompts, max_new, sampling, stop_at_eos))


def request(prompts: list[list[int]], max_new: int, sampling: Sampling = GREEDY, stop_at_eos: bool = False) -> Request:
    return Request(prompts, max_new, sampling, stop_at_eos, StopWatch([], lambda ids: "", len(prompts)), None)


def collect(r: Request, timeout: float = 120) -> list[list[int]]:
    """A request's steps, to its last message; its error is raised."""
    out = []
    while True:
        m = r.outbox.get(timeout=timeout)
        if isinstance(m, StrataError):
            raise m
        if m.done:
            return out
        out.append(list(m.tokens))


def columns(steps: list[list[int]]) -> list[list[int]]:
    return [[t for t in seq if t != -1] for seq in zip(*steps)] if steps else []


def finishing_prompts(node: InProcess, prompt: list[int], n: int, offsets: list[int]):
    """Prompts that reach one token, taken as EOS, at different steps: `prompt` extended
    by j of its own greedy tokens for each j in `offsets` (it finishes j steps earlier).
    (prompts, eos, the step each one finishes at)."""
    g = node.generate([prompt], n)[0]
    k = next(k for k in range(max(offsets) + 1, n) if g[k] not in g[:k])
    return [prompt + g[:j] for j in offsets], g[k], [k - j for j in offsets]

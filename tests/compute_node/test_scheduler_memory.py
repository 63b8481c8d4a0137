"""The scheduler when the device runs out of memory in a pass: the prefill is retried in
smaller chunks and no request is lost. The device is the one part these tests stand in
for (a runner that raises torch.OutOfMemoryError above a chunk size)."""

import torch

from compute_node.metrics import Metrics
from compute_node.sampling import Sampling
from compute_node.requests import Request
from compute_node.scheduler import Scheduler
from compute_node.slots import Limits
from compute_node.stops import StopWatch

VOCAB = 8


class TightDevice:
    """Logits that choose token (position % VOCAB); a pass whose prefill chunks exceed
    `fits` tokens runs out of memory."""

    def __init__(self, chunk_tokens: int, fits: int):
        self.chunk_tokens, self.fits = chunk_tokens, fits
        self.passes = 0

    def step(self, joins, steps):
        if joins and min(self.chunk_tokens, sum(len(j.ids) for j in joins)) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        self.passes += 1

        def pick(tokens):
            out = torch.zeros(len(tokens), VOCAB)
            out[torch.arange(len(tokens)), torch.tensor(tokens) % VOCAB] = 1.0
            return out

        joined = pick([len(j.ids) for j in joins]) if joins else None
        return joined, [pick([p + 1 for p in s.positions]) for s in steps]


def test_a_pass_out_of_memory_shrinks_the_prefill_chunks_and_loses_no_request():
    device = TightDevice(chunk_tokens=64, fits=20)
    metrics = Metrics()
    sched = Scheduler(device, Limits((4,), capacity=32, max_queue=8), eos_id=None, pad_id=0, metrics=metrics)
    try:
        prompts = [[1] * 10, [2] * 12, [3] * 9]
        req = sched.submit(Request(prompts, 4, Sampling(), False, StopWatch([], lambda ids: "", 3), None))
        messages = []
        while not messages or not messages[-1].done:
            messages.append(req.outbox.get(timeout=30))
    finally:
        sched.stop()
    tokens = [list(m.tokens) for m in messages[:-1]]
    # each sequence's first token is its prompt length, then its positions + 1, mod VOCAB
    assert tokens == [[10 % 8, 12 % 8, 9 % 8], [3, 5, 2], [4, 6, 3], [5, 7, 4]]
    assert device.chunk_tokens == 16 and metrics.snapshot()["oom_shrinks_total"] == 2  # 64 -> 32 -> 16
    assert messages[-1].finish_reasons == ["length"] * 3


class GrowingKV:
    """Logits as TightDevice's; a decode step whose running rows hold more than `budget`
    cached tokens (their positions + 1) runs out of memory, as a KV cache that grows."""

    def __init__(self, budget: int):
        self.budget, self.chunk_tokens, self.passes = budget, 1, 0

    def step(self, joins, steps):
        if sum(p + 1 for s in steps for r, p in enumerate(s.positions) if r not in s.idle) > self.budget:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return TightDevice(self.chunk_tokens, 1 << 30).step(joins, steps)


def test_a_decode_step_out_of_memory_takes_the_last_request_out_and_recomputes_it_later():
    """Two requests of 2 sequences fill 4 slots; at the 5th pass their 4 rows hold 32 > 30
    tokens: the request admitted last leaves the batch with 4 tokens generated, the first
    runs alone to its end, then the second's prompt and tokens are prefilled again and it
    goes on. Every sequence gets the tokens it gets without the preemption."""
    metrics = Metrics()
    sched = Scheduler(GrowingKV(budget=30), Limits((4,), capacity=32, max_queue=8), eos_id=None, pad_id=0,
                      metrics=metrics)
    try:
        with sched.cv:  # both queued before the scheduler's first pass takes any (a reentrant lock)
            reqs = [sched.submit(Request([[1] * 4, [2] * 4], 8, Sampling(), False, StopWatch([], lambda ids: "", 2),
                                         None)) for _ in range(2)]
        outs = []
        for req in reqs:
            messages = []
            while not messages or not messages[-1].done:
                messages.append(req.outbox.get(timeout=30))
            outs.append(messages)
    finally:
        sched.stop()
    for messages in outs:
        seqs = [[t for t in col if t != -1] for col in zip(*(m.tokens for m in messages[:-1]))]
        assert seqs == [[(4 + k) % VOCAB for k in range(8)]] * 2  # first token: the prompt's length; then p + 1
        assert messages[-1].finish_reasons == ["length"] * 2
    snap = metrics.snapshot()
    assert snap["oom_preemptions_total"] == 1 and snap["admit_cap"] == 2
    assert snap["requests_total:ok"] == 2

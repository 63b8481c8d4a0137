"""The scheduler when the device runs out of memory in a pass: the prefill is retried in
smaller chunks and no request is lost. The device is the one part these tests stand in
for (a runner that raises torch.OutOfMemoryError above a chunk size)."""

import torch

from compute_node.metrics import Metrics
from compute_node.sampling import Sampling
from compute_node.scheduler import Request, Scheduler
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

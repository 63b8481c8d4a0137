"""Greedy decode without a host round trip between steps.

Why: reading a step's tokens on the host before building and launching the next step
leaves the GPU idle for that host work, and in the service also while the consumer of
`Engine.generate` sends the step out. Greedy decode needs nothing from the host to go
on: the argmax is the next step's input.

How: each step writes its argmax into the input ids of the next step and advances the
positions by one, on the device (inside the captured graph where decode graphs run,
compute_node/decode_graph.py). Its tokens are copied to a pinned host buffer without
blocking, and an event marks the copy done. Reading step t first launches step t+1,
then waits for step t's event only: the caller gets step t's tokens while the GPU runs
step t+1. No step is launched past max_new_tokens (the KV cache holds exactly those);
when the caller stops early, the one step launched ahead is waited for and dropped. On
the CPU the same code runs synchronously.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import torch

from compute_node.batch import MicroBatch, positions
from compute_node.sampling import greedy_ids

if TYPE_CHECKING:
    from compute_node.engine import Engine

IN_FLIGHT = 2  # steps whose tokens may be unread at once: the one read next, the one launched ahead


def feed_back(logits: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A step's greedy tokens [b]; written into `ids` [b, 1], with `pos` advanced by
    one, they are the next step's inputs without leaving the device."""
    tokens = greedy_ids(logits)
    ids.copy_(tokens.view(-1, 1))
    pos.add_(1)
    return tokens


class _HostTokens:
    """Host buffers the steps' tokens are copied into, used in turn: pinned on CUDA, so
    the copy does not wait for the stream (a plain `.tolist()` would wait for the step
    launched ahead too)."""

    def __init__(self, batch: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(batch, dtype=torch.long, pin_memory=self.cuda) for _ in range(IN_FLIGHT)]
        self.turn = 0

    def read(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Enqueue the copy of the micro-batches' tokens (request order): (buffer, event)."""
        buf = self.buffers[self.turn % IN_FLIGHT]
        self.turn += 1
        a = 0
        for t in parts:
            buf[a : a + t.numel()].copy_(t, non_blocking=True)
            a += t.numel()
        if not self.cuda:
            return buf, None
        event = torch.cuda.Event()
        event.record()
        return buf, event


class GreedyDecode:
    """The decode steps of one greedy request, after its prefill: an iterator of each
    step's tokens (request order), each step launched one ahead of its read."""

    def __init__(self, engine: Engine, mbs: list[MicroBatch], first: list[torch.Tensor], max_new_tokens: int):
        """`first`: each micro-batch's prefill tokens [b] on the device (step 0, read by
        the caller). Launches step 1."""
        self.device, self.forward, self.mbs = engine.w.device, engine.forward, mbs
        self.inputs = [(t.view(-1, 1), positions(mb.pad, mb.ids.shape[1], 1).to(self.device))
                       for t, mb in zip(first, mbs)]
        self.graphs = engine.graphs_for(mbs, max_new_tokens, self._graph_step)
        self.host = _HostTokens(sum(t.numel() for t in first), self.device)
        self.unlaunched = max_new_tokens - 1  # decode steps the KV cache has room for
        self.launched = 0
        self.pending: collections.deque = collections.deque()  # (buffer, event) per step in flight
        self._launch()

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        """The next step's tokens: launches the step after it, then waits for them."""
        self._launch()
        if not self.pending:
            raise StopIteration
        return self._ready(*self.pending.popleft())

    def close(self) -> None:
        """Drops unread steps after they have run: their KV cache is freed next."""
        self.pending.clear()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @staticmethod
    def _ready(buf: torch.Tensor, event: torch.cuda.Event | None) -> list[int]:
        """A step's tokens, once their copy to the host is done (and nothing after it)."""
        if event is not None:
            event.synchronize()
        return buf.tolist()

    def _launch(self) -> None:
        if self.unlaunched == 0:
            return
        self.unlaunched -= 1
        if self.graphs is not None:  # the first step hands the graphs their inputs; later ones feed themselves
            tokens = self.graphs.run(None if self.launched else self.inputs)
        else:
            logits = self.forward(self.mbs, self.inputs, False)
            tokens = [feed_back(x, ids, pos) for x, (ids, pos) in zip(logits, self.inputs)]
        self.launched += 1
        self.pending.append(self.host.read(tokens))

    def _graph_step(self, mb: MicroBatch, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One micro-batch's step as its decode graph records it: forward, argmax, feedback."""
        return feed_back(self.forward([mb], [(ids, pos)], False)[0], ids, pos)

"""A Generate call as the scheduler (compute_node/scheduler.py) holds it: its sequences,
each with its slot, the part of its context already in the KV cache and its tokens so
far, and the call's sampling, stops, deadline and outbox."""

from __future__ import annotations

import queue
import time

import torch

from compute_node.sampling import Sampling
from compute_node.stops import StopWatch


class Sequence:
    def __init__(self, index: int, prompt: list[int], max_new: int):
        self.index, self.prompt, self.max_new = index, prompt, max_new
        self.slot: tuple[int, int] | None = None
        # the tokens whose keys and values the slot must hold before decoding: the prompt,
        # or after a preemption the prompt and the tokens generated so far (recomputed)
        self.context = prompt
        self.prefilled = 0  # context tokens in the KV cache (a long prompt goes in over several passes)
        self.generated: list[int] = []
        self.finish: str | None = None  # "stop" | "length"

    @property
    def position(self) -> int:
        """The column the last generated token is written to when fed back."""
        return len(self.prompt) + len(self.generated) - 1


class Request:
    """One Generate call's sequences, admitted together; the call reads `outbox`
    (GenerateResponse messages, or a StrataError that ends it)."""

    def __init__(self, prompts: list[list[int]], max_new: int, sampling: Sampling, stop_at_eos: bool,
                 stops: StopWatch, deadline: float | None):
        self.seqs = [Sequence(i, p, max_new) for i, p in enumerate(prompts)]
        self.sampling, self.stop_at_eos, self.stops = sampling, stop_at_eos, stops
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
        self.outbox: queue.Queue = queue.Queue()
        self.cancelled = False
        self.arrival = time.monotonic()
        self.admitted = self.first_token = self.last_token = 0.0
        self.steps = 0

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def live(self) -> list[Sequence]:
        return [s for s in self.seqs if s.finish is None]

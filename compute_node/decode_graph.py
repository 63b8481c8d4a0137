"""The decode step as one CUDA graph per micro-batch, replayed every step.

Why: at decode the GPU work per layer is small (a few hundred microseconds at 64 rows)
and the host spends about as long issuing it: ~30 kernels per layer, each a Python
op and a launch. A graph issues the whole step, every layer and the head, in one call.

What it needs, checked by `for_request`: a CUDA device, every layer resident (nothing
streams, so the weights a step reads never move) and a bfloat16/float16 KV cache on the
device (`LocalKV`), switched to fixed shapes (`LocalKV.fixed_shapes`): the step writes
its token at a position held in a device tensor and attends over all max_tokens keys,
those not yet written masked. Then nothing in the step depends on its length.

How: the first decode step runs eagerly (its result is used; it also warms every
kernel up), then the same step is captured (capture records, it does not run). From
the next step on: copy the step's token ids and positions into the graph's inputs,
advance the cache (host side: cursor and mask), replay. A greedy step feeds its tokens
back into those inputs itself, inside the graph (compute_node/decode_loop.py): then
nothing is copied in. Where capture fails, the micro-batch goes on eagerly with the
same fixed shapes (logged once).

Across requests: the engine keeps the last request's caches and complete graphs
(`KeptDecode`); the next request of the same shapes renews those caches in place and
replays the graphs from its first decode step (no eager step, no capture).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from compute_node.batch import MicroBatch
from compute_node.kv_cache import LocalKV

LOG = logging.getLogger("strata.compute_node")

# One micro-batch's decode step on its (ids [b, 1], positions [b, 1]): its logits, or
# where greedy tokens are fed back, its tokens (also written into ids, positions advanced).
Step = Callable[[MicroBatch, torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeGraphs:
    """Captured decode steps of one request's micro-batches."""

    def __init__(self, step: Step, mbs: list[MicroBatch]):
        self.step, self.mbs = step, mbs
        self.graphs: list[torch.cuda.CUDAGraph | None | bool] = [None] * len(mbs)  # False: capture failed
        self.inputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mbs)  # the graphs' ids, positions
        self.outputs: list[torch.Tensor | None] = [None] * len(mbs)  # what each replay writes

    @staticmethod
    def for_request(device: torch.device, streamed: bool, mbs: list[MicroBatch], step: Step):
        """Graphs for these micro-batches after their prefill, or None where the step
        cannot be captured (then nothing is changed)."""
        if device.type != "cuda" or streamed or not all(isinstance(mb.kv, LocalKV) for mb in mbs):
            return None
        if not all(mb.kv.plain for mb in mbs):
            return None
        for mb in mbs:
            mb.kv.fixed_shapes()
        return DecodeGraphs(step, mbs)

    @property
    def complete(self) -> bool:
        """Every micro-batch's step captured: what a later request can replay."""
        return all(g is not None and g is not False for g in self.graphs)

    def reuse(self, mbs: list[MicroBatch], step: Step) -> None:
        """Hand these graphs to a new request after its prefill, its micro-batches holding
        the caches they were recorded on (renewed: KeptDecode). Its first step's inputs
        are copied in by `run`."""
        for mb in mbs:
            mb.kv.fixed_shapes()
        self.mbs, self.step = mbs, step

    def run(self, inputs: list[tuple[torch.Tensor, torch.Tensor]] | None) -> list[torch.Tensor]:
        """One decode step: the step's output per micro-batch, valid until the next step.
        `inputs` (ids, positions per micro-batch) are copied into the graphs' inputs; None
        where the previous step already wrote them there (greedy feedback)."""
        out = []
        for j, mb in enumerate(self.mbs):
            mb.kv.advance()
            if inputs is not None:
                self._set_inputs(j, *inputs[j])
            graph = self.graphs[j]
            if graph is None:
                out.append(self._first(j, mb))
            elif graph is False:
                out.append(self.step(mb, *self.inputs[j]))
            else:
                graph.replay()
                out.append(self.outputs[j])
        return out

    def _set_inputs(self, j: int, ids: torch.Tensor, pos: torch.Tensor) -> None:
        if self.inputs[j] is None:
            self.inputs[j] = (ids.clone(), pos.clone())
        else:
            s_ids, s_pos = self.inputs[j]
            s_ids.copy_(ids)
            s_pos.copy_(pos)

    def _first(self, j: int, mb: MicroBatch) -> torch.Tensor:
        """Run the step eagerly on a side stream (warm-up), then capture it."""
        s_ids, s_pos = self.inputs[j]
        current = torch.cuda.current_stream(s_ids.device)
        side = torch.cuda.Stream(s_ids.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self.step(mb, s_ids, s_pos)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self.step(mb, s_ids, s_pos)
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured: go on eagerly
            LOG.warning("decode step capture failed (%s: %s); micro-batch %d decodes without a graph",
                        type(e).__name__, str(e)[:200], j)
            self.graphs[j] = False
            return out
        self.graphs[j], self.outputs[j] = graph, static_out
        return out


class KeptDecode:
    """The device KV caches and complete decode graphs of an engine's last request, kept
    for its next request of the same shapes (micro-batch sizes, max_tokens, greedy or
    not): that request renews the caches (LocalKV.renew) and replays the graphs from its
    first decode step, without the eager warm-up step and the capture (~70 ms of T2's
    1.1 s decode). A request of other shapes frees them first, before it allocates.
    Memory: the kept caches stay allocated between requests, as the request had them."""

    def __init__(self):
        self._key: tuple | None = None
        self._kvs: list[LocalKV] = []
        self._graphs: DecodeGraphs | None = None

    def take(self, key: tuple) -> tuple[list[LocalKV], DecodeGraphs] | None:
        """What is kept under `key`, no longer kept here; else None, with anything kept
        under another key freed."""
        if self._graphs is None or key != self._key:
            self.release()
            return None
        kept = (self._kvs, self._graphs)
        self._key, self._kvs, self._graphs = None, [], None
        return kept

    def keep(self, key: tuple, kvs: list[LocalKV], graphs: DecodeGraphs) -> None:
        self.release()
        self._key, self._kvs, self._graphs = key, kvs, graphs

    def release(self) -> None:
        for kv in self._kvs:
            kv.free()
        self._key, self._kvs, self._graphs = None, [], None

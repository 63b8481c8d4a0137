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
advance the cache (host side: cursor and mask), replay. Where capture fails, the
micro-batch goes on eagerly with the same fixed shapes (logged once).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from compute_node.batch import MicroBatch
from compute_node.kv_cache import LocalKV

LOG = logging.getLogger("strata.compute_node")

Forward = Callable[[list[MicroBatch], list[tuple[torch.Tensor, torch.Tensor]], bool], list[torch.Tensor]]


class DecodeGraphs:
    """Captured decode steps of one request's micro-batches."""

    def __init__(self, forward: Forward, mbs: list[MicroBatch]):
        self.forward, self.mbs = forward, mbs
        self.graphs: list[torch.cuda.CUDAGraph | None | bool] = [None] * len(mbs)  # False: capture failed
        self.static: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(mbs)

    @staticmethod
    def for_request(device: torch.device, streamed: bool, mbs: list[MicroBatch], forward: Forward):
        """Graphs for these micro-batches after their prefill, or None where the step
        cannot be captured (then nothing is changed)."""
        if device.type != "cuda" or streamed or not all(isinstance(mb.kv, LocalKV) for mb in mbs):
            return None
        if not all(mb.kv.plain for mb in mbs):
            return None
        for mb in mbs:
            mb.kv.fixed_shapes()
        return DecodeGraphs(forward, mbs)

    def run(self, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """One decode step: logits [b, vocab] per micro-batch, valid until the next step."""
        out = []
        for j, (mb, (ids, pos)) in enumerate(zip(self.mbs, inputs)):
            mb.kv.advance()
            graph = self.graphs[j]
            if graph is None:
                out.append(self._first(j, mb, ids, pos))
            elif graph is False:
                out.append(self.forward([mb], [(ids, pos)], False)[0])
            else:
                s_ids, s_pos, logits = self.static[j]
                s_ids.copy_(ids)
                s_pos.copy_(pos)
                graph.replay()
                out.append(logits)
        return out

    def _first(self, j: int, mb: MicroBatch, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run the step eagerly on a side stream (warm-up), then capture it."""
        s_ids, s_pos = ids.clone(), pos.clone()
        current = torch.cuda.current_stream(ids.device)
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self.forward([mb], [(s_ids, s_pos)], False)[0]
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_logits = self.forward([mb], [(s_ids, s_pos)], False)[0]
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured: go on eagerly
            LOG.warning("decode step capture failed (%s: %s); micro-batch %d decodes without a graph",
                        type(e).__name__, str(e)[:200], j)
            self.graphs[j] = False
            return logits
        self.graphs[j], self.static[j] = graph, (s_ids, s_pos, static_logits)
        return logits

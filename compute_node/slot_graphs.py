"""A group's decode step as CUDA graphs, one per bucket of rows (1, 2, 4, ... up to the
group's slots), replayed at every decode-only pass.

Why: at decode the GPU work per layer is small and the host spends about as long
issuing it (~30 kernels a layer, each a Python op and a launch); a graph issues the
whole step in one call.

What makes the step's shapes fixed: a step of n running rows runs the bucket b >= n
(the rows above n idle); every row writes its new key and value at a column held in a
device tensor (`cols`: its position, or for an idle row the slot's scratch column past
its capacity) and attends over all the columns of its row, those past its own
(`limit`: its position, or 0 for an idle row) masked by a bias the graph computes from
`limit`. So nothing in the step depends on the rows' lengths, and the graph of a bucket
serves every later step of that many rows, across requests, for the server's life.

Where: a device that captures graphs, every layer resident, an unquantized KV cache on
the device (compute_node/runner.py decides). The capture is the device's
(compute_node/device/): CUDA graphs on CUDA; on `--device mock-cuda`, the same steps and
buckets, the side-stream warm-up included, with each replay run again on the CPU and
checked to be its capture (same ops, shapes and input memory), so CI covers this logic;
on the CPU, plain reruns. Where capture fails, the bucket runs eagerly with the same
fixed shapes (logged once).
"""

from __future__ import annotations

import logging

import torch

from compute_node.device import Device

LOG = logging.getLogger("strata.compute_node")


def bucket(n: int, slots: int) -> int:
    """The smallest power of two >= n, at most the group's slots."""
    b = 1
    while b < n:
        b *= 2
    return min(b, slots)


class FixedView:
    """The decode view of a fixed-shape step: b rows, every column of the row."""

    def __init__(self, kv, b: int, device: torch.device):
        s = kv.s
        self.n = b
        self.keys = s.capacity + 1  # with the scratch column
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.cols = torch.zeros(b, dtype=torch.long, device=device)  # where each row writes
        self.limit = torch.zeros(b, dtype=torch.long, device=device)  # the last column each row reads
        self.write_rows = torch.arange(b, device=device)
        self._kpos = torch.arange(self.keys, device=device)
        self._slopes = s.slopes.to(device) if s.alibi else None
        self._dtype = kv.dtype
        self.bias: torch.Tensor | None = None

    def set(self, ids: list[int], positions: list[int], idle: list[int], scratch: int) -> None:
        """This step's inputs, padded to b rows (the rows past len(ids) idle)."""
        b = self.n
        idle_set = set(idle) | set(range(len(ids), b))
        ids = ids + [0] * (b - len(ids))
        positions = positions + [0] * (b - len(positions))
        cols = [scratch if r in idle_set else positions[r] for r in range(b)]
        host = torch.tensor([ids, positions, cols], dtype=torch.long)
        self.ids.copy_(host[0].view(-1, 1))
        self.pos.copy_(host[1].view(-1, 1))
        self.cols.copy_(host[2])
        self.limit.copy_(host[1])  # idle rows: position 0, so they read column 0 only

    def prepare(self) -> None:
        """The bias over every column, from `limit` (inside the graph: replays recompute it)."""
        bias = torch.zeros(self.n, 1, 1, self.keys, dtype=torch.float32, device=self.limit.device)
        bias.masked_fill_(self._kpos[None, None, None, :] > self.limit[:, None, None, None], float("-inf"))
        if self._slopes is not None:
            bias = bias + self._slopes[None, :, None, None] * self._kpos.float()[None, None, None, :]
        self.bias = bias.to(self._dtype)

    @property
    def write_cols(self) -> torch.Tensor:
        return self.cols


class GroupGraphs:
    """The captured decode steps of one group, by bucket."""

    def __init__(self, kv, step, device: Device):
        """`step(view) -> logits [b, vocab]`: the group's decode step on a FixedView.
        `device`: the node's Device, which captures the steps."""
        self.kv, self.step, self.dev = kv, step, device
        self.views: dict[int, FixedView] = {}
        self.graphs: dict[int, object] = {}  # bucket -> its captured step (.replay()), None: eager

    def run(self, ids: list[int], positions: list[int], idle: list[int]) -> torch.Tensor:
        """One decode step of rows 0..len(ids)-1: their logits [len(ids), vocab]."""
        n = len(ids)
        b = bucket(n, self.kv.s.slots)
        view = self.views.get(b)
        if view is None:
            view = self.views[b] = FixedView(self.kv, b, self.kv.device)
        view.set(list(ids), list(positions), list(idle), self.kv.s.capacity)
        if b not in self.graphs:
            return self._first(b, view)[:n]
        graph = self.graphs[b]
        if graph is None:
            return self._eager(view)[:n]
        return graph.replay()[:n]

    def _eager(self, view: FixedView) -> torch.Tensor:
        view.prepare()
        return self.step(view)

    def _first(self, b: int, view: FixedView) -> torch.Tensor:
        """Run the step on a side stream (it warms every kernel up; its result is this
        step's), then capture it."""
        dev = self.dev
        current = dev.current_stream()
        side = dev.new_stream()
        side.wait_stream(current)
        with dev.stream(side):
            out = self._eager(view)
        current.wait_stream(side)
        try:
            graph = dev.capture(lambda: self._eager(view))
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured: this bucket goes on eagerly
            LOG.warning("decode step capture failed (%s: %s); %d rows decode without a graph",
                        type(e).__name__, str(e)[:200], b)
            self.graphs[b] = None
            return out
        self.graphs[b] = graph
        return out

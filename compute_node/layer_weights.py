"""Device copies of the layers: resident ones made once, streamed ones loaded into a
small ring while the previous layer computes (a side CUDA stream on the GPU).

Which layers are resident is decided by the placement; this module only moves bytes."""

from __future__ import annotations

import torch

from compute_node.weights import HostWeights, materialize
from strata.manifest import layer_shard


class LayerWeights:
    def __init__(self, host: HostWeights, device: torch.device, dtype: torch.dtype, resident: set[int]):
        self.host, self.device, self.dtype = host, device, dtype
        self.resident_ids = resident
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self._inflight: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
        self.loads: list[int] = []  # layers streamed, in order (the schedule, for tests and stats)
        self.embed = materialize(host.shard("embed"), device, dtype)
        self.head = materialize(host.shard("head"), device, dtype)
        for i in sorted(resident):
            self._resident[i] = materialize(host.shard(layer_shard(i)), device, dtype)

    def prefetch(self, i: int) -> None:
        """Start loading layer i if it is streamed and not already on its way."""
        if i in self._resident or i in self._inflight or i >= self.host.manifest.num_layers:
            return
        self.loads.append(i)
        stored = self.host.shard(layer_shard(i))
        if not self.cuda:
            self._inflight[i] = (materialize(stored, self.device, self.dtype), None)
            return
        with torch.cuda.stream(self.copy_stream):
            w = materialize(stored, self.device, self.dtype, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._inflight[i] = (w, event)

    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights, ready for the current stream. Streamed layers are dropped
        from the ring once taken (the caller holds them for the layer's compute)."""
        if i in self._resident:
            return self._resident[i]
        self.prefetch(i)
        w, event = self._inflight.pop(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in w.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        return w

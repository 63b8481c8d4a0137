"""Device copies of the layers: resident ones placed once, streamed ones loaded into a
ring of `depth` layers ahead of use (a side CUDA stream on the GPU), in the cyclic
order the passes use them, so the stream never waits for a resident layer's compute
and the next pass's first streamed layers load during this pass's tail.

On the GPU, weights stay packed (INT4/INT8 as stored) and are dequantized by a fused
kernel when a layer runs; on the CPU, resident layers are kept dense. Which layers
are resident is the placement's decision; this module only moves bytes."""

from __future__ import annotations

import torch

from compute_node.kernels import dequantize
from compute_node.weights import HostWeights, StoredTensor
from strata.manifest import layer_shard

Packed = dict[str, StoredTensor]


def to_device(stored: Packed, device: torch.device, non_blocking: bool = False, copy: bool = False) -> Packed:
    """The stored parts on `device`, still packed (`copy`: always a copy, never the
    host memory itself, e.g. a staging slot about to be reused)."""
    return {
        name: StoredTensor(st.entry, {p: t.to(device, non_blocking=non_blocking, copy=copy)
                                      for p, t in st.parts.items()})
        for name, st in stored.items()
    }


def dense(packed: Packed, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dense weights in `dtype` on the parts' device (dequantized where quantized)."""
    out = {}
    for name, st in packed.items():
        q = st.entry.quant
        if q is None:
            out[name] = st.parts["data"].to(dtype)
        else:
            out[name] = dequantize(st.parts["data"], st.parts["scale"], st.parts["min"], q.bits, q.group_size, dtype)
    return out


class LayerWeights:
    def __init__(self, host: HostWeights, device: torch.device, dtype: torch.dtype, resident: set[int],
                 packed_resident: bool | None = None, depth: int = 2, resident_source=None):
        """`resident_source(i) -> Packed on device` makes resident layers without the
        host tier (dummy weights generated on the GPU); default: copy from the host."""
        self.host, self.device, self.dtype = host, device, dtype
        self.cuda = device.type == "cuda"
        self.packed_resident = self.cuda if packed_resident is None else packed_resident
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.depth = max(1, depth)
        self.streamed = [i for i in range(host.manifest.num_layers) if i not in resident]
        self._next = 0  # position in self.streamed of the next layer to enqueue
        self._resident: dict[int, Packed | dict[str, torch.Tensor]] = {}
        self._inflight: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
        self.loads: list[int] = []  # layers streamed, in order (the schedule, for tests and stats)
        self.embed = dense(self._copied("embed"), dtype)
        self.head = dense(self._copied("head"), dtype)
        for i in sorted(resident):
            packed = resident_source(i) if resident_source else self._copied(layer_shard(i))
            self._resident[i] = packed if self.packed_resident else dense(packed, dtype)
        if host.stager is not None:  # from now on, the disk reads run ahead of the passes
            host.stager.start([layer_shard(i) for i in self.streamed if layer_shard(i) in host.disk])

    def _copied(self, name: str) -> Packed:
        """A shard copied to the device once (from the host tier, or read from disk)."""
        with self.host.borrow(name) as stored:
            return to_device(stored, self.device, copy=name in self.host.disk)

    def _enqueue(self, i: int) -> None:
        self.loads.append(i)
        name = layer_shard(i)
        slot, stored = self.host.staged(name) if name in self.host.disk else (None, self.host.shard(name))
        if not self.cuda:
            self._inflight[i] = (dense(to_device(stored, self.device, copy=slot is not None), self.dtype), None)
            if slot is not None:
                self.host.stager.release(slot)  # type: ignore[union-attr]
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            w = dense(to_device(stored, self.device, non_blocking=True), self.dtype)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        if slot is not None:  # the slot is read again once the copy out of it is done
            self.host.stager.release(slot, event)  # type: ignore[union-attr]
        self._inflight[i] = (w, event)

    def top_up(self) -> None:
        """Keep `depth` streamed layers loading or loaded, in cyclic pass order."""
        while self.streamed and len(self._inflight) < min(self.depth, len(self.streamed)):
            i = self.streamed[self._next]
            if i in self._inflight:
                return
            self._enqueue(i)
            self._next = (self._next + 1) % len(self.streamed)

    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's dense weights, ready for the current stream."""
        if i in self._resident:
            r = self._resident[i]
            self.top_up()
            return dense(r, self.dtype) if self.packed_resident else r  # type: ignore[arg-type]
        if i not in self._inflight:  # out of the cyclic order (a new request mid-ring): restart the ring at i
            self._inflight.clear()
            self._next = self.streamed.index(i)
            self.top_up()
        w, event = self._inflight.pop(i)
        self.top_up()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in w.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        return w

    def prefetch(self, i: int) -> None:
        """Compatibility with the engine's loop: the ring runs ahead on its own."""
        self.top_up()

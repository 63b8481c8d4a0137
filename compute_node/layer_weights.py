"""Device copies of the layers: resident ones placed once, streamed ones loaded ahead
of use, in the cyclic order the passes use them, so the copies never wait for a
resident layer's compute and the next pass's first streamed layers load during this
pass's tail.

On a CUDA device (and mock-cuda: compute_node/device/), streamed layers go through a
ring of `depth` packed slots (`DeviceRing`): one copy per layer, straight from the host
tier (or a disk staging slot) on a side stream, and the layer's dequantization on the
compute stream when it runs, so the copy engine never idles behind a dequant kernel.
Resident layers stay packed (INT4/INT8 as stored) and are dequantized by a fused
kernel when a layer runs. On the CPU, a streamed layer is dequantized straight from
the host tier when loaded (`DenseCopies`) and resident layers are kept dense. Which
layers are resident is the placement's decision; this module only moves bytes."""

from __future__ import annotations

import torch

from compute_node.device import Device, device_for
from compute_node.kernels import MERGED_QKV, PackedInt4, dequantize
from compute_node.kernels.choice import DEFAULT as DEFAULT_KERNELS, KernelChoice
from compute_node.weights import HostWeights, StoredTensor, shard_views
from strata.model import arch
from strata.model.manifest import Shard, layer_shard
from strata.policy.placement import FUSED_INT4_MAX_ROWS, RING_DEPTH

Packed = dict[str, StoredTensor]


def to_device(stored: Packed, device: torch.device, non_blocking: bool = False, copy: bool = False) -> Packed:
    """The stored parts on `device`, still packed (`copy`: always a copy, never the
    host memory itself, e.g. a staging slot about to be reused)."""
    return {
        name: StoredTensor(st.entry, {p: t.to(device, non_blocking=non_blocking, copy=copy)
                                      for p, t in st.parts.items()})
        for name, st in stored.items()
    }


def _dense(st: StoredTensor, dtype: torch.dtype, copy: bool = False) -> torch.Tensor:
    q = st.entry.quant
    if q is None:
        return st.parts["data"].to(dtype, copy=copy)
    return dequantize(st.parts["data"], st.parts["scale"], st.parts["min"], q.bits, q.group_size, dtype)


def dense(packed: Packed, dtype: torch.dtype, copy: bool = False) -> dict[str, torch.Tensor]:
    """Dense weights in `dtype` on the parts' device (dequantized where quantized;
    `copy`: never a view of the parts, even where they already are in `dtype`)."""
    return {name: _dense(st, dtype, copy) for name, st in packed.items()}


def merge_qkv(packed: Packed, names: tuple[str, ...], kernels: KernelChoice = DEFAULT_KERNELS) -> PackedInt4 | None:
    """A packed INT4 layer's separate q, k, v matrices as one [Nq + Nk + Nv, K] matrix
    for the fused kernel (one launch, one pass over the rows instead of three). The
    three entries become views into it, so the layer holds no second copy. None where
    the layer has no such three INT4 matrices of one K and group size."""
    parts = [packed.get(f"{n}.weight") for n in names] if len(names) == 3 else [None]
    if any(p is None or p.entry.quant is None or p.entry.quant.bits != 4 or p.parts["data"].dim() != 2
           for p in parts):
        return None
    groups = {p.entry.quant.group_size for p in parts}  # type: ignore[union-attr]
    if len(groups) != 1 or len({p.parts["data"].shape[1] for p in parts}) != 1:  # type: ignore[union-attr]
        return None
    merged = {key: torch.cat([p.parts[key] for p in parts]) for key in ("data", "scale", "min")}  # type: ignore
    start = 0
    for p in parts:
        rows = p.parts["data"].shape[0]  # type: ignore[union-attr]
        p.parts.update({key: t[start : start + rows] for key, t in merged.items()})  # type: ignore[union-attr]
        start += rows
    return PackedInt4(merged["data"], merged["scale"], merged["min"], groups.pop(), kernels)


def fused(packed: Packed, dtype: torch.dtype, qkv: tuple[PackedInt4, tuple[str, ...]] | None = None,
          kernels: KernelChoice = DEFAULT_KERNELS) -> dict[str, torch.Tensor | PackedInt4]:
    """INT4 matrices left packed for the fused kernel under `kernels` (the model's linear
    dispatches on the type); everything else dense in `dtype`. With `qkv` (merge_qkv's
    matrix and the three names), q, k and v are one entry, MERGED_QKV: (matrix, joined
    bias or None)."""
    out: dict = {}
    if qkv is not None:
        matrix, names = qkv
        biases = [packed.get(f"{n}.bias") for n in names]
        bias = None if any(b is None for b in biases) else torch.cat([_dense(b, dtype) for b in biases])  # type: ignore
        out[MERGED_QKV] = (matrix, bias)
        packed = {k: v for k, v in packed.items() if k not in {f"{n}.{s}" for n in names for s in ("weight", "bias")}}
    for name, st in packed.items():
        q = st.entry.quant
        if q is not None and q.bits == 4 and st.parts["data"].dim() == 2:
            out[name] = PackedInt4(st.parts["data"], st.parts["scale"], st.parts["min"], q.group_size, kernels)
        else:
            out[name] = _dense(st, dtype)
    return out


def _all_matrices_int4(packed: Packed) -> bool:
    """Whether every matrix of a layer is INT4 (what is left dense for decode is then
    only its small vectors: norms and biases)."""
    return all(st.entry.quant is not None and st.entry.quant.bits == 4
               for st in packed.values() if st.parts["data"].dim() == 2)


def _separate_qkv(config: dict) -> tuple[str, ...]:
    """The family's q, k, v projection names where they are three matrices, else ()."""
    spec = arch.spec_for(config)
    return spec.names.qkv if spec.math_for(config).qkv == "separate" else ()


class DeviceRing:
    """`depth` device slots of packed layer bytes. `fill` copies a shard's bytes into the
    next slot on the ring's stream; `use` dequantizes it on the current stream. A slot
    is refilled only after the dequant that read it has run (its `consumed` event), so
    the copy stream waits for nothing else."""

    def __init__(self, device: Device, depth: int, slot_bytes: int):
        self.dev = device
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device.torch_device) for _ in range(depth)]
        self.consumed: list = [None] * depth  # per slot: the event after the dequant that last read it
        self.stream = device.new_stream()
        self._next = 0

    def fill(self, raw: torch.Tensor) -> tuple:
        """(slot, the event after the copy into it)."""
        k = self._next
        self._next = (k + 1) % len(self.slots)
        if self.consumed[k] is not None:
            self.stream.wait_event(self.consumed[k])
        with self.dev.stream(self.stream):
            self.slots[k][: raw.numel()].copy_(raw, non_blocking=True)
            copied = self.dev.new_event()
            copied.record(self.stream)
        return k, copied

    def use(self, k: int, copied, shard: Shard, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        stream = self.dev.current_stream()
        stream.wait_event(copied)
        # copies, never views: the slot is refilled as soon as these kernels have run
        w = dense(shard_views(shard, self.slots[k][: shard.size]), dtype, copy=True)
        self.consumed[k] = self.dev.new_event()
        self.consumed[k].record(stream)
        return w

    def load(self, host: HostWeights, name: str) -> tuple:
        """Start copying shard `name` in: (slot, copied event), for `ready`."""
        slot, raw = host.staged_raw(name) if name in host.disk else (None, host.raw(name))
        loaded = self.fill(raw)
        if slot is not None:  # the staging slot is read again once the copy out of it is done
            host.stager.release(slot, loaded[1])  # type: ignore[union-attr]
        return loaded

    def ready(self, loaded: tuple, shard: Shard, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A loaded layer's dense weights for the current stream."""
        return self.use(*loaded, shard, dtype)


class DenseCopies:
    """Streamed layers off the ring (the CPU): dequantized (or copied) straight from the
    host tier, or a staging slot, when loaded."""

    def __init__(self, device: Device, dtype: torch.dtype):
        self.device, self.dtype = device.torch_device, dtype

    def load(self, host: HostWeights, name: str) -> dict[str, torch.Tensor]:
        on_disk = name in host.disk
        slot, stored = host.staged(name) if on_disk else (None, host.shard(name))
        w = dense(to_device(stored, self.device, copy=on_disk), self.dtype)
        if slot is not None:
            host.stager.release(slot)  # type: ignore[union-attr]
        return w

    def ready(self, loaded: dict[str, torch.Tensor], shard: Shard, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return loaded


class LayerWeights:
    def __init__(self, host: HostWeights, device: Device | torch.device | str, dtype: torch.dtype, resident: set[int],
                 packed_resident: bool | None = None, depth: int = RING_DEPTH, device_source=None,
                 fused_max_rows: int | None = None, kernels: KernelChoice = DEFAULT_KERNELS):
        """`device`: the node's Device (compute_node/device/; a torch device or its name
        makes one). `device_source(shard name) -> Packed on device` makes the resident
        layers, embeddings and head the host tier does not hold (dummy weights generated
        on the GPU); default: copy from the host.
        `packed_resident`: resident layers stay packed (default: the device's choice).
        `fused_max_rows`: packed resident INT4 layers asked for with at most this many
        rows run the fused kernel (default FUSED_INT4_MAX_ROWS where the device runs it,
        in fp16/bf16, else 0: always dequantize). `kernels`: the CUDA W4A16 kernels those
        may run (the compute node's choice, made once at its start:
        compute_node/kernels/choice.py)."""
        self.dev = device_for(device)
        self.host, self.device, self.dtype = host, self.dev.torch_device, dtype
        self.packed_resident = self.dev.packed_resident if packed_resident is None else packed_resident
        if fused_max_rows is None:
            half = dtype in (torch.float16, torch.bfloat16)
            fused_max_rows = FUSED_INT4_MAX_ROWS if self.dev.fused_int4 and half else 0
        self.fused_max_rows = fused_max_rows if self.packed_resident else 0
        self.depth = max(1, depth)
        self.streamed = [i for i in range(host.manifest.num_layers) if i not in resident]
        slot_bytes = max((host.manifest.shards[layer_shard(i)].size for i in self.streamed), default=0)
        # how streamed layers come in: the packed ring, or dense copies
        self.loader = DeviceRing(self.dev, self.depth, slot_bytes) if self.dev.streams_ring and self.streamed \
            else DenseCopies(self.dev, dtype)
        self._next = 0  # position in self.streamed of the next layer to enqueue
        self._resident: dict[int, Packed | dict[str, torch.Tensor]] = {}
        # resident layers as decode runs them (fused): packed INT4 views, q, k, v merged,
        # the small tensors (norms, biases) dense once, not converted at every step
        self._decode: dict[int, dict] = {}
        self._inflight: dict[int, object] = {}  # layer -> what its loader's `load` returned
        self.loads: list[int] = []  # layers streamed, in order (the schedule, for tests and stats)
        self._source = device_source
        self.embed = dense(self._placed("embed"), dtype)
        self.head = dense(self._placed("head"), dtype)
        for i in sorted(resident):
            packed = self._placed(layer_shard(i))
            self._resident[i] = packed if self.packed_resident else dense(packed, dtype)
            if self.fused_max_rows and _all_matrices_int4(packed):
                names = _separate_qkv(host.manifest.config)
                merged = merge_qkv(packed, names, kernels)
                self._decode[i] = fused(packed, dtype, None if merged is None else (merged, names), kernels)
        if host.stager is not None:  # from now on, the disk reads run ahead of the passes
            host.stager.start([layer_shard(i) for i in self.streamed if layer_shard(i) in host.disk])

    def _placed(self, name: str) -> Packed:
        """A shard held on the device for the whole run: copied from where the host
        holds it, else made there by the source."""
        if self._source is not None and not self.host.holds(name):
            return self._source(name)
        return self._copied(name)

    def _copied(self, name: str) -> Packed:
        """A shard copied to the device once (from the host tier, or read from disk)."""
        with self.host.borrow(name) as stored:
            return to_device(stored, self.device, copy=name in self.host.disk)

    def _enqueue(self, i: int) -> None:
        self.loads.append(i)
        self._inflight[i] = self.loader.load(self.host, layer_shard(i))

    def top_up(self) -> None:
        """Keep `depth` streamed layers loading or loaded, in cyclic pass order."""
        while self.streamed and len(self._inflight) < min(self.depth, len(self.streamed)):
            i = self.streamed[self._next]
            if i in self._inflight:
                return
            self._enqueue(i)
            self._next = (self._next + 1) % len(self.streamed)

    def get(self, i: int, rows: int | None = None) -> dict:
        """Layer i's weights, ready for the current stream: dense, or for a packed
        resident layer run on at most `fused_max_rows` rows (micro-batch tokens), its
        INT4 matrices still packed (`fused`)."""
        if i in self._resident:
            r = self._resident[i]
            self.top_up()
            if not self.packed_resident:
                return r  # type: ignore[return-value]
            small = rows is not None and rows <= self.fused_max_rows
            if small and i in self._decode:
                return self._decode[i]
            return dense(r, self.dtype)  # type: ignore[arg-type]
        if i not in self._inflight:  # out of the cyclic order (a new request mid-ring): restart the ring at i
            self._inflight.clear()
            self._next = self.streamed.index(i)
            self.top_up()
        # ready (on the ring: dequantized) before topping up: the slot's refill waits for this
        w = self.loader.ready(self._inflight.pop(i), self.host.manifest.shards[layer_shard(i)], self.dtype)
        self.top_up()
        return w

    def get_pair(self, i: int, prefill_rows: int, decode_rows: int) -> tuple[dict, dict]:
        """Layer i's weights for a pass that prefills `prefill_rows` tokens at once and
        decodes `decode_rows`: a resident packed layer in both forms (dequantized for the
        prefill, fused for decode where it is small enough); any other layer loaded once."""
        if i in self._resident and self.packed_resident and prefill_rows and decode_rows:
            return self.get(i, prefill_rows), self.get(i, decode_rows)
        w = self.get(i, max(prefill_rows, decode_rows))
        return w, w


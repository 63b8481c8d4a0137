"""KV caches of the scheduler's running batch: a group of sequence slots, each slot one
sequence at a time with its own length (no padding to the longest), on the compute
device (`LocalSlots`) or in the KV store with attention on its CPU (`RemoteSlots`).

A group is one micro-batch of the planner: `slots` rows of `capacity` tokens, allocated
once. A sequence joins a free row: its prompt's keys and values go to columns
[0, prompt) of that row (`prefill`), then each decode step writes its new token at the
row's own length and attends over the row's first length + 1 columns (`decode_start`).
A decode step covers the first `n` rows (every running row lies below n: the scheduler
fills the lowest free rows first); idle rows below n compute at position 0 and are
ignored. Freeing a row costs nothing: the next sequence overwrites it from column 0.

Prefill runs on the compute device for both homes (it has the prompt's keys at hand):
the joining prompts are packed into one row of tokens, so the linear layers run on all
of them at once, and attention runs per sequence (causal, over its own tokens only).

Both take the node's Device (compute_node/device/): its kernel choices (fused decode
attention over the cache in place, else GEMV decode attention over whole-cache
dequantization), and for the KV store's groups the streams and
events that order copies out of the device."""

from __future__ import annotations

import dataclasses
import uuid

import torch

from compute_node.device import Device, device_for
from compute_node.kernels.decode_attention import decode_attention
from compute_node.kv_cache import _PlainLayers, _QuantLayers
from compute_node.model import attend, attend_causal, attention_bias
from compute_node.peers import KVStoreClient
from strata.model.alibi import alibi_slopes
from strata.model.kv_quant import KVFormat, check_bits, default_group
from strata.transport import packed
from strata.transport.shm import dtype_name
from strata.transport.wire import kv_store_pb2


@dataclasses.dataclass(frozen=True)
class SlotShape:
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    slots: int  # rows of the group
    capacity: int  # tokens a row holds: prompt + generated - 1
    scale: float
    alibi: bool

    @property
    def slopes(self) -> torch.Tensor | None:
        return alibi_slopes(self.num_heads) if self.alibi else None


def kv_bytes_per_token(dims, dtype: torch.dtype, kv_bits: int) -> int:
    """Bytes one token's keys and values take over all layers (codes plus fp16 scale and
    min per group when quantized)."""
    vectors = 2 * dims.num_layers * dims.kv_heads
    if kv_bits == 16:
        return vectors * dims.head_dim * torch.empty(0, dtype=dtype).element_size()
    return vectors * KVFormat(kv_bits, dims.head_dim, default_group(dims.head_dim)).vector_bytes


@dataclasses.dataclass
class Joining:
    """The sequences that join a group in one pass: their rows and prompt lengths, in
    the order their tokens lie in the packed prefill."""

    rows: list[int]
    lengths: list[int]
    starts: list[int] = dataclasses.field(default_factory=list)  # per sequence, where its ids begin (0: all)

    @property
    def continues(self) -> bool:
        """Some sequence continues a prompt already partly in the cache."""
        return any(self.starts)


def causal_attention(s: SlotShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     gemv: bool = False) -> torch.Tensor:
    """Attention of one sequence's prompt over itself: q [1, heads, n, hd] (`gemv`:
    model.attend's choice for one query)."""
    if not s.alibi:
        return attend_causal(q, k, v, s.scale)
    n = k.shape[2]
    pad = torch.zeros(1, dtype=torch.long, device=q.device)
    return attend(q, k, v, attention_bias(pad, n, n, s.slopes, q.dtype), s.scale, gemv)


def packed_attention(s: SlotShape, joining: Joining, q, k, v, store, gemv: bool = False) -> torch.Tensor:
    """Per-sequence causal attention over a packed prefill ([1, heads, sum(lengths), hd]);
    `store(rows, k, v)` keeps the keys and values of sequences of one length, stacked
    [len(rows), kv_heads, n, hd]. Consecutive sequences of equal length run as one batch."""
    outs, a = [], 0
    rows, lengths = joining.rows, joining.lengths
    for i, j in packed.runs(lengths):
        m, n = j - i, lengths[i]
        qs, ks, vs = (packed.stacked(x, a, m, n) for x in (q, k, v))
        store(rows[i:j], ks, vs)
        out = causal_attention(s, qs, ks, vs, gemv)  # [m, heads, n, hd]
        # as [1, heads, m * n, hd] through the token-major order: a view where the kernel
        # wrote its output token-major (flash's and cuDNN's do), and the merge of heads
        # after it (model._merge) is a view then too
        outs.append(out.transpose(1, 2).reshape(1, m * n, out.shape[1], out.shape[3]).transpose(1, 2))
        a += m * n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class DecodeView:
    """One decode step of a group: how many rows run and each row's position (the
    column its new token goes to), with the additive mask over the columns read. Idle
    rows store nothing and read column 0 (a sequence may be joining in that row)."""

    def __init__(self, s: SlotShape, positions: list[int], idle: list[int], device: torch.device,
                 dtype: torch.dtype):
        self.n = len(positions)
        self.positions = positions
        self.idle = idle
        self.keys = max(positions) + 1  # columns read this step
        self.cols = torch.tensor(positions, dtype=torch.long, device=device)
        self.limit = self.cols  # the last column each row reads
        idle_set = set(idle)
        active = [r for r in range(self.n) if r not in idle_set]
        self.write_rows = torch.tensor(active, dtype=torch.long, device=device)
        self.write_cols = torch.tensor([positions[r] for r in active], dtype=torch.long, device=device)
        kpos = torch.arange(self.keys, device=device)
        bias = torch.zeros(self.n, 1, 1, self.keys, dtype=torch.float32, device=device)
        bias.masked_fill_(kpos[None, None, None, :] > self.cols[:, None, None, None], float("-inf"))
        if s.alibi:
            bias = bias + s.slopes.to(device)[None, :, None, None] * kpos.float()[None, None, None, :]
        self.bias = bias.to(dtype)


class LocalSlots:
    """A group's KV on the compute device: [slots, kv_heads, capacity, head_dim] per
    layer in the compute dtype, or quantized to 8 or 4 bits."""

    overlaps = False  # decode_start computes the attention; decode_finish waits for nothing

    def __init__(self, s: SlotShape, dtype: torch.dtype, device: Device | torch.device, kv_bits: int = 16):
        check_bits(kv_bits)
        self.dev = device_for(device)
        self.s, self.dtype, self.device = s, dtype, self.dev.torch_device
        self.gemv = self.dev.gemv_attention
        self.fused = self.dev.fused_decode_attention
        self._slopes = s.slopes.to(self.device) if s.alibi else None
        pad = torch.zeros(s.slots, dtype=torch.long)  # the layers' constructors read the batch from it
        # one column past the capacity: where idle rows of a fixed-shape step write (slot_graphs.py)
        shape = _LayersShape(s.num_layers, s.kv_heads, s.capacity + 1, s.head_dim, pad)
        if kv_bits == 16:
            self.layers = _PlainLayers(shape, dtype, self.device)
        else:
            fmt = KVFormat(kv_bits, s.head_dim, default_group(s.head_dim))
            self.layers = _QuantLayers(shape, dtype, self.device, fmt, whole=self.dev.whole_dequant)
        for t in self.layers.tensors():  # idle rows read column 0: never uninitialized memory (NaN)
            t.zero_()

    @property
    def nbytes(self) -> int:
        return self.layers.nbytes

    @property
    def plain(self) -> bool:
        """Stored in the compute dtype (not quantized)."""
        return isinstance(self.layers, _PlainLayers)

    @property
    def fixed_steps(self) -> bool:
        """A decode step can run at fixed shapes (slot_graphs.py): the cache is in the
        compute dtype, or decode attention reads the quantized cache in place."""
        return self.plain or self.fused

    def view(self, positions: list[int], idle: list[int]) -> DecodeView:
        return DecodeView(self.s, positions, idle, self.device, self.dtype)

    def prefill(self, layer: int, joining: Joining, q, k, v) -> torch.Tensor:
        if joining.continues:
            return self._pieces(layer, joining, q, k, v)
        return packed_attention(self.s, joining, q, k, v,
                                lambda rows, ks, vs: self.layers.write_rows(layer, rows, ks, vs), self.gemv)

    def _pieces(self, layer: int, joining: Joining, q, k, v) -> torch.Tensor:
        """Prompts in pieces (a long prompt over several passes): each piece's keys and
        values go to its columns [start, start + n), and its queries attend causally over
        the row's first start + n columns (the earlier pieces from the cache)."""
        outs, a = [], 0
        dev = q.device
        for row, n, start in zip(joining.rows, joining.lengths, joining.starts):
            qs, ks, vs = q[:, :, a : a + n], k[:, :, a : a + n], v[:, :, a : a + n]
            if start == 0:
                self.layers.write_rows(layer, [row], ks, vs)
                outs.append(causal_attention(self.s, qs, ks, vs, self.gemv))
            else:
                self.layers.write_piece(layer, row, start, ks, vs)
                keys, values = self.layers.read_row(layer, row, start + n)
                pad = torch.zeros(1, dtype=torch.long, device=dev)
                bias = attention_bias(pad, n, start + n, self.s.slopes, qs.dtype)
                outs.append(attend(qs, keys, values, bias, self.s.scale, self.gemv))
            a += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def decode_start(self, layer: int, view: DecodeView, q, k, v):
        self.layers.write_columns(layer, view.write_rows, view.write_cols, k, v)
        if self.fused:  # one kernel over the cache where it lies (kernels/decode_attention.py)
            kp, vp = self.layers.planes(layer)
            return decode_attention(q, kp, vp, view.limit, view.keys, self.s.scale, self._slopes)
        keys, values = self.layers.read_rows(layer, view.n, view.keys)
        return attend(q, keys, values, view.bias, self.s.scale, self.gemv)

    def decode_finish(self, handle) -> torch.Tensor:
        return handle

    def free(self) -> None:
        self.layers = None


@dataclasses.dataclass
class _LayersShape:
    """What kv_cache's layer stores read from a shape."""

    num_layers: int
    num_kv_heads: int
    max_tokens: int
    head_dim: int
    pad: torch.Tensor


class RemoteSlots:
    """A group's KV in the KV store: allocated once with `slots` rows; prompts append
    to their rows, decode steps send each row's position."""

    overlaps = True  # the KV store computes between decode_start and decode_finish

    def __init__(self, s: SlotShape, dtype: torch.dtype, device: Device | torch.device, client: KVStoreClient,
                 exchange, kv_bits: int = 16):
        """`device`: the node's Device, the one `exchange` has."""
        check_bits(kv_bits)
        self.dev = device_for(device)
        self.s, self.dtype, self.device = s, dtype, self.dev.torch_device
        self.gemv = self.dev.gemv_attention
        self.client, self.exchange = client, exchange
        self.group = uuid.uuid4().hex
        client.allocate(kv_store_pb2.AllocateRequest(
            group=self.group, num_layers=s.num_layers, batch=s.slots, num_heads=s.num_heads, head_dim=s.head_dim,
            max_tokens=s.capacity, dtype=dtype_name(dtype), scale=s.scale,
            position_bias=kv_store_pb2.POSITION_BIAS_ALIBI if s.alibi else kv_store_pb2.POSITION_BIAS_NONE,
            num_kv_heads=s.kv_heads, kv_bits=kv_bits,
            kv_group_size=default_group(s.head_dim) if kv_bits != 16 else 0,
        ))
        self.nbytes = 0  # held by the KV store, counted there

    def view(self, positions: list[int], idle: list[int]) -> _RemoteView:
        return _RemoteView(positions, idle)

    def prefill(self, layer: int, joining: Joining, q, k, v) -> torch.Tensor:
        out = packed_attention(self.s, joining, q, k, v, lambda rows, ks, vs: None, self.gemv)
        self.exchange.on_layer(layer)
        (kh, kref), (vh, vref) = (self.exchange.alloc(x.shape, self.dtype) for x in (k, v))
        dev, stream = self.dev, self.exchange.offload_stream  # copy out on it; the compute stream goes on
        stream.wait_stream(dev.current_stream())
        with dev.stream(stream):
            kh.copy_(k, non_blocking=True)
            vh.copy_(v, non_blocking=True)
            event = dev.new_event()
            event.record(stream)
        dev.record_stream(k, stream)
        dev.record_stream(v, stream)
        request = kv_store_pb2.AppendRequest(group=self.group, layer=layer, key=kref, value=vref,
                                             rows=joining.rows, lengths=joining.lengths)
        self.exchange.send_after(event, lambda: self.client.append(request))
        return out

    def decode_start(self, layer: int, view, q, k, v):
        self.exchange.on_layer(layer)
        refs = []
        for t in (q, k, v):
            host, ref = self.exchange.alloc(t.shape, self.dtype)
            host.copy_(t)
            refs.append(ref)
        out_host, oref = self.exchange.alloc(q.shape, self.dtype)
        event = self.dev.new_event(blocking=True)  # the staged copies are done (it sleeps, not spins)
        event.record(self.dev.current_stream())
        event.synchronize()
        fut = self.client.attend_async(kv_store_pb2.AttendRequest(
            group=self.group, layer=layer, query=refs[0], key=refs[1], value=refs[2], output=oref,
            positions=view.positions, idle_rows=view.idle))
        return fut, out_host

    def decode_finish(self, handle) -> torch.Tensor:
        fut, out_host = handle
        self.client.result(fut)
        return out_host.to(self.device, copy=True)  # the exchange slot is reused next layer

    def free(self) -> None:
        try:
            self.exchange.drain()
        finally:
            self.client.free(self.group)


class _RemoteView:
    def __init__(self, positions: list[int], idle: list[int]):
        self.n = len(positions)
        self.positions = positions
        self.idle = idle

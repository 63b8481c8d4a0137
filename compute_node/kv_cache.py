"""Where a micro-batch's KV cache lives, behind one interface with two
implementations: on the compute device (`LocalKV`) or in the KV store with attention
on its CPU (`RemoteKV`). Decode attention is split into start/finish so the engine
can overlap one micro-batch's remote attention with another's device work.

Prefill attention always runs on the compute device (it has every key of the prompt
at hand); RemoteKV ships the prompt's keys/values to the store asynchronously. Both
can hold the cache at 8 or 4 bits (`kv_bits`, strata/kv_quant.py's format): LocalKV
quantizes on the device, RemoteKV asks the KV store to."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import torch

from compute_node.kernels import dequant
from compute_node.model import attend, attend_causal, attention_bias
from strata.alibi import alibi_slopes
from compute_node.peers import KVStoreClient
from strata.errors import ErrorKind, StrataError
from strata.kv_quant import KVFormat, check_bits, default_group
from strata.shm import dtype_name
from strata.wire import kv_store_pb2

DEQUANT_CHUNK = 256  # tokens rebuilt at a time off CUDA (float32 arithmetic on that many only)


class KVCache(Protocol):
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
    def decode_start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any: ...
    def decode_finish(self, handle: Any) -> torch.Tensor: ...
    def free(self) -> None: ...


class _Shape:
    def __init__(self, num_layers, num_heads, head_dim, max_tokens, pad: torch.Tensor, scale: float, alibi: bool,
                 num_kv_heads: int = 0):
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.max_tokens, self.pad, self.scale = max_tokens, pad, scale
        self.slopes = alibi_slopes(num_heads) if alibi else None
        self.padded = bool(pad.any())  # any left padding in the batch (else prefill needs no mask)


def _prompt_attention(s: _Shape, pad: torch.Tensor, q, k, v) -> torch.Tensor:
    """Causal attention over the whole prompt, on the compute device (both KV modes)."""
    t = k.shape[2]
    if s.slopes is None and not s.padded:
        return attend_causal(q, k, v, s.scale)
    return attend(q, k, v, attention_bias(pad, t, t, s.slopes, q.dtype), s.scale)


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src, as 8-byte words where both last dims are contiguous rows of whole
    words. A strided copy (the prompt's K/V, [B, T, heads, head_dim] read as [B, heads,
    T, head_dim], into the cache) pays index arithmetic per element: 16-bit elements
    held T2's prefill writes to ~0.6 TB/s, 75 ms of its 3.0 s (bench/results run 68)."""
    if dst.dtype == src.dtype and dst.element_size() < 8:
        try:
            dst.view(torch.int64).copy_(src.view(torch.int64))
            return
        except RuntimeError:  # rows not whole aligned words: the plain copy below
            pass
    dst.copy_(src)


class _PlainLayers:
    """K and V of every layer in the compute dtype, [B, kv_heads, max_tokens, head_dim]."""

    def __init__(self, s: _Shape, dtype: torch.dtype, device: torch.device):
        dims = (s.pad.numel(), s.num_kv_heads, s.max_tokens, s.head_dim)
        self.k = [torch.empty(dims, dtype=dtype, device=device) for _ in range(s.num_layers)]
        self.v = [torch.empty(dims, dtype=dtype, device=device) for _ in range(s.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def tensors(self) -> list[torch.Tensor]:
        return self.k + self.v

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        copy_rows(self.k[layer][:, :, start : start + k.shape[2]], k)
        copy_rows(self.v[layer][:, :, start : start + v.shape[2]], v)

    def read(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    # Slot access (compute_node/slot_kv.py): one row per sequence, each its own length.
    def write_rows(self, layer: int, rows: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Prompts of one length, k, v [len(rows), kv_heads, n, head_dim], into columns
        [0, n) of `rows`."""
        n = k.shape[2]
        if len(rows) == 1:
            copy_rows(self.k[layer][rows[0] : rows[0] + 1, :, :n], k)
            copy_rows(self.v[layer][rows[0] : rows[0] + 1, :, :n], v)
            return
        index = torch.tensor(rows, device=k.device)
        self.k[layer][index, :, :n] = k
        self.v[layer][index, :, :n] = v

    def write_columns(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """One token per listed row: k[r] [kv_heads, 1, head_dim] at column cols[i] of
        row r = rows[i]."""
        self.k[layer][rows, :, cols] = k[rows, :, 0]
        self.v[layer][rows, :, cols] = v[rows, :, 0]

    def read_rows(self, layer: int, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:rows, :, :n], self.v[layer][:rows, :, :n]


class _QuantLayers:
    """K and V of every layer group-wise quantized (strata/kv_quant.py), token-major:
    codes [max_tokens, B, kv_heads, code_width], scale and min [max_tokens, B, kv_heads,
    groups] per layer, so the first n tokens are one contiguous block. `read` rebuilds
    one layer's first n tokens in the compute dtype: in one fused kernel on CUDA (no
    float32 copy), elsewhere in chunks of DEQUANT_CHUNK tokens."""

    def __init__(self, s: _Shape, dtype: torch.dtype, device: torch.device, fmt: KVFormat):
        self.fmt, self.dtype = fmt, dtype
        lead = (s.max_tokens, s.pad.numel(), s.num_kv_heads)

        def planes():
            return (torch.empty(*lead, fmt.code_width, dtype=torch.uint8, device=device),
                    torch.empty(*lead, fmt.groups, dtype=torch.float16, device=device),
                    torch.empty(*lead, fmt.groups, dtype=torch.float16, device=device))

        self.k = [planes() for _ in range(s.num_layers)]
        self.v = [planes() for _ in range(s.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.k + self.v for t in parts)

    def tensors(self) -> list[torch.Tensor]:
        return [t for parts in self.k + self.v for t in parts]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for parts, x in ((self.k[layer], k), (self.v[layer], v)):
            end = start + x.shape[2]
            for plane, q in zip(parts, self.fmt.quantize(x.permute(2, 0, 1, 3))):
                plane[start:end] = q

    def read(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantize(self.k[layer], n), self._dequantize(self.v[layer], n)

    # Slot access (compute_node/slot_kv.py): one row per sequence, each its own length.
    def write_rows(self, layer: int, rows: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        index = torch.tensor(rows, device=k.device)
        for parts, x in ((self.k[layer], k), (self.v[layer], v)):
            n = x.shape[2]
            for plane, q in zip(parts, self.fmt.quantize(x.permute(2, 0, 1, 3))):
                plane[:n, index] = q

    def write_columns(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        for parts, x in ((self.k[layer], k), (self.v[layer], v)):
            for plane, q in zip(parts, self.fmt.quantize(x[rows].permute(2, 0, 1, 3))):
                plane[cols, rows] = q[0]

    def read_rows(self, layer: int, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._dequantize(tuple(p[:, :rows] for p in self.k[layer]), n),
                self._dequantize(tuple(p[:, :rows] for p in self.v[layer]), n))

    def _dequantize(self, parts, n: int) -> torch.Tensor:
        codes, scale, w_min = (p[:n] for p in parts)
        out = torch.empty(*codes.shape[:-1], self.fmt.head_dim, dtype=self.dtype, device=codes.device)
        rows = out.view(-1, self.fmt.head_dim)
        per_token = rows.shape[0] // n
        step = n if codes.is_cuda else DEQUANT_CHUNK
        for a in range(0, n, step):
            z = min(a + step, n)
            flat = [p[a:z].reshape(-1, p.shape[-1]) for p in (codes, scale, w_min)]
            dequant.dequantize(*flat, self.fmt.bits, self.fmt.group, self.dtype, out=rows[a * per_token : z * per_token])
        return out.permute(1, 2, 0, 3)  # [B, kv_heads, n, head_dim], strided


class LocalKV:
    """KV on the compute device, per layer: [B, heads, max_tokens, head_dim] in the
    compute dtype (kv_bits 16), or quantized to 8 or 4 bits (`_QuantLayers`); decode
    attention then reads one layer's keys and values rebuilt in the compute dtype."""

    def __init__(self, shape: _Shape, dtype: torch.dtype, device: torch.device, kv_bits: int = 16,
                 group_size: int = 0):
        """`group_size`: head_dim elements per quantization group; 0 = 64, or the whole
        head_dim where 64 does not divide it. Raises StrataError(INVALID_ARGUMENT) for
        kv_bits other than 16, 8, 4 or a group that does not divide head_dim."""
        check_bits(kv_bits)
        self.s = shape
        if kv_bits == 16:
            self.layers = _PlainLayers(shape, dtype, device)
        else:
            fmt = KVFormat(kv_bits, shape.head_dim, group_size or default_group(shape.head_dim))
            self.layers = _QuantLayers(shape, dtype, device, fmt)
        self.length = [0] * shape.num_layers
        self.pad = shape.pad.to(device)
        self._bias: tuple[int, torch.dtype, torch.Tensor] | None = None  # (keys, dtype, bias): one per step
        self._fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # fixed_shapes(): cursor, biases

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds on the device (codes, scales and mins when quantized)."""
        return self.layers.nbytes

    def prefill(self, layer, q, k, v):
        t = k.shape[2]
        self.layers.write(layer, 0, k, v)
        self.length[layer] = t
        return _prompt_attention(self.s, self.pad, q, k, v)

    @property
    def plain(self) -> bool:
        """Stored in the compute dtype (not quantized)."""
        return isinstance(self.layers, _PlainLayers)

    def fixed_shapes(self) -> None:
        """Switch decode to fixed shapes, for a captured CUDA graph (compute_node/
        decode_graph.py): each step's token is written at a position held in a device
        tensor, and attention reads all max_tokens keys with those not yet written masked
        by a bias updated in place. Call after prefill on a `plain` cache, then
        `advance()` before every step."""
        if not self.plain:
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "fixed-shape decode needs an unquantized KV cache")
        n, dev = self.length[0], self.pad.device
        for t in self.layers.k + self.layers.v:
            t[:, :, n:].zero_()  # unwritten slots are read (and masked): no NaN from old memory
        dtype = self.layers.k[0].dtype  # as the per-step bias: in the queries' dtype
        base = attention_bias(self.pad, 1, self.s.max_tokens, self.s.slopes, dtype)  # every key visible
        if self._fixed is None:
            self._fixed = (torch.zeros(1, dtype=torch.long, device=dev), base, base.clone())
        else:  # a renewed cache: in place, where graphs recorded on it read them
            self._fixed[1].copy_(base)
        bias = self._fixed[2]
        bias.copy_(base)
        bias[..., n:] = float("-inf")

    def renew(self, shape: _Shape) -> LocalKV:
        """This cache emptied for a new request of the same batch and max_tokens (`shape`
        gives its padding): every tensor stays where it is, so decode graphs recorded on
        it replay for the new request (compute_node/decode_graph.py, KeptDecode)."""
        if (shape.pad.numel(), shape.max_tokens) != (self.s.pad.numel(), self.s.max_tokens):
            raise ValueError("a renewed KV cache keeps its batch and max_tokens")
        self.s = shape
        self.pad.copy_(shape.pad)
        self.length = [0] * shape.num_layers
        self._bias = None
        return self

    def advance(self) -> None:
        """Fixed shapes: make room for the next step's token (its position into the
        cursor, its key unmasked)."""
        n = self.length[0]
        if n + 1 > self.s.max_tokens:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED, f"KV cache holds {self.s.max_tokens} tokens per sequence")
        cursor, base, bias = self._fixed
        cursor.fill_(n)
        bias[..., n] = base[..., n]
        self.length = [n + 1] * len(self.length)

    def decode_start(self, layer, q, k, v):
        if self._fixed is not None:  # the step's shapes do not depend on its length
            cursor, _, bias = self._fixed
            keys, values = self.layers.k[layer], self.layers.v[layer]
            keys.index_copy_(2, cursor, k)
            values.index_copy_(2, cursor, v)
            return attend(q, keys, values, bias, self.s.scale)
        n = self.length[layer]
        if n + 1 > self.s.max_tokens:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED, f"KV cache holds {self.s.max_tokens} tokens per sequence")
        self.layers.write(layer, n, k, v)
        self.length[layer] = n + 1
        keys, values = self.layers.read(layer, n + 1)
        return attend(q, keys, values, self._decode_bias(n + 1, q.dtype), self.s.scale)

    def _decode_bias(self, keys: int, dtype: torch.dtype) -> torch.Tensor:
        """The one-query mask over `keys` keys, built once per step (every layer of a
        step attends over the same number of keys)."""
        if self._bias is None or self._bias[:2] != (keys, dtype):
            self._bias = (keys, dtype, attention_bias(self.pad, 1, keys, self.s.slopes, dtype))
        return self._bias[2]

    def decode_finish(self, handle):
        return handle

    def free(self):
        self.layers = None


class RemoteKV:
    """KV in the KV store; tensors cross through the compute node's exchange region."""

    def __init__(self, shape: _Shape, dtype: torch.dtype, device: torch.device, client: KVStoreClient, exchange,
                 kv_bits: int = 16):
        self.s, self.dtype, self.device = shape, dtype, device
        self.client, self.exchange = client, exchange
        self.group = uuid.uuid4().hex
        client.allocate(
            kv_store_pb2.AllocateRequest(
                group=self.group, num_layers=shape.num_layers, batch=shape.pad.numel(), num_heads=shape.num_heads,
                head_dim=shape.head_dim, max_tokens=shape.max_tokens, dtype=dtype_name(dtype), scale=shape.scale,
                position_bias=kv_store_pb2.POSITION_BIAS_ALIBI if shape.slopes is not None else kv_store_pb2.POSITION_BIAS_NONE,
                pad=[int(p) for p in shape.pad.tolist()], num_kv_heads=shape.num_kv_heads, kv_bits=kv_bits,
                # the same groups as a device cache (64 elements where head_dim allows): the
                # KV store's default, one group per head, is coarser at 4 bits
                kv_group_size=default_group(shape.head_dim) if kv_bits != 16 else 0,
            )
        )
        self.pad = shape.pad.to(device)

    def _stage(self, t: torch.Tensor):
        host, ref = self.exchange.alloc(t.shape, self.dtype)
        host.copy_(t)
        return host, ref

    def prefill(self, layer, q, k, v):
        out = _prompt_attention(self.s, self.pad, q, k, v)
        self.exchange.on_layer(layer)
        (kh, kref), (vh, vref) = (self.exchange.alloc(x.shape, self.dtype) for x in (k, v))
        event = None
        if self.device.type == "cuda":  # copy out on the offload stream; the compute stream goes on
            stream = self.exchange.offload_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                kh.copy_(k, non_blocking=True)
                vh.copy_(v, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            k.record_stream(stream)
            v.record_stream(stream)
        else:
            kh.copy_(k)
            vh.copy_(v)
        request = kv_store_pb2.AppendRequest(group=self.group, layer=layer, key=kref, value=vref)
        self.exchange.send_after(event, lambda: self.client.append(request))
        return out

    def decode_start(self, layer, q, k, v):
        self.exchange.on_layer(layer)
        (_, qref), (_, kref), (_, vref) = self._stage(q), self._stage(k), self._stage(v)
        out_host, oref = self.exchange.alloc(q.shape, self.dtype)
        self._sync()
        fut = self.client.attend_async(
            kv_store_pb2.AttendRequest(group=self.group, layer=layer, query=qref, key=kref, value=vref, output=oref)
        )
        return fut, out_host

    def decode_finish(self, handle):
        fut, out_host = handle
        self.client.result(fut)
        return out_host.to(self.device, copy=True)  # the exchange slot is reused next layer

    def _sync(self):
        """Wait for the staged copies. A blocking-sync event sleeps instead of spinning a
        core the KV store's attention needs."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(blocking=True)
            event.record(torch.cuda.current_stream(self.device))
            event.synchronize()

    def free(self):
        try:
            self.exchange.drain()
        finally:
            self.client.free(self.group)

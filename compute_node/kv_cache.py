"""Where a micro-batch's KV cache lives, behind one interface with two
implementations: on the compute device (`LocalKV`) or in the KV store with attention
on its CPU (`RemoteKV`). Decode attention is split into start/finish so the engine
can overlap one micro-batch's remote attention with another's device work.

Prefill attention always runs on the compute device (it has every key of the prompt
at hand); RemoteKV ships the prompt's keys/values to the store asynchronously."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import torch

from compute_node.model import attend, attention_bias
from strata.alibi import alibi_slopes
from compute_node.peers import KVStoreClient
from strata.errors import ErrorKind, StrataError
from strata.shm import dtype_name
from strata.wire import kv_store_pb2


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


def _prompt_attention(s: _Shape, pad: torch.Tensor, q, k, v) -> torch.Tensor:
    """Causal attention over the whole prompt, on the compute device (both KV modes)."""
    t = k.shape[2]
    return attend(q, k, v, attention_bias(pad, t, t, s.slopes, q.dtype), s.scale)


class LocalKV:
    """KV on the compute device, [B, heads, max_tokens, head_dim] per layer."""

    def __init__(self, shape: _Shape, dtype: torch.dtype, device: torch.device):
        self.s = shape
        b = shape.pad.numel()
        dims = (b, shape.num_kv_heads, shape.max_tokens, shape.head_dim)
        self.k = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.v = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.length = [0] * shape.num_layers
        self.pad = shape.pad.to(device)

    def prefill(self, layer, q, k, v):
        t = k.shape[2]
        self.k[layer][:, :, :t] = k
        self.v[layer][:, :, :t] = v
        self.length[layer] = t
        return _prompt_attention(self.s, self.pad, q, k, v)

    def decode_start(self, layer, q, k, v):
        n = self.length[layer]
        if n + 1 > self.s.max_tokens:
            raise StrataError(ErrorKind.RESOURCE_EXHAUSTED, f"KV cache holds {self.s.max_tokens} tokens per sequence")
        self.k[layer][:, :, n : n + 1] = k
        self.v[layer][:, :, n : n + 1] = v
        self.length[layer] = n + 1
        bias = attention_bias(self.pad, 1, n + 1, self.s.slopes, q.dtype)
        return attend(q, self.k[layer][:, :, : n + 1], self.v[layer][:, :, : n + 1], bias, self.s.scale)

    def decode_finish(self, handle):
        return handle

    def free(self):
        self.k.clear()
        self.v.clear()


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

"""The transformer math, as plain functions over weight dicts, driven by a family's
spec (strata/model/arch.py, strata/model/families/): one decoder layer for every family.

A layer is split where the attention happens, so the engine can run the attention
anywhere (on the device over a local cache, or in the KV store on the CPU) and
interleave micro-batches:

    q, k, v = family.pre_attention(w, h, pos) # [B, heads (kv heads for k, v), T, head_dim]
    a       = <attention backend>(q, k, v)    # [B, heads, T, head_dim]
    h       = family.post_attention(w, h, a)

Weights are dicts of local names (strata/model/arch.py) to dense tensors on the compute
device. `Decoder` interprets a spec's `Math`; nothing here branches on model_type.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from compute_node.kernels import MERGED_QKV, PackedInt4, add_norm
from strata.model import arch
from strata.model.arch import ModelDims

Weights = dict[str, torch.Tensor]


class Family(Protocol):
    scale: float  # softmax scale the attention applies to q.k
    alibi: bool

    def embed(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...
    def pre_attention(self, w: Weights, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def post_attention(self, w: Weights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor: ...
    def logits(self, w_head: Weights, w_embed: Weights, h: torch.Tensor) -> torch.Tensor: ...


def _linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    if isinstance(weight, PackedInt4):  # a resident INT4 layer at decode (compute_node/layer_weights.py)
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


def _linear_relu(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    """relu(x @ W^T + b) with the bias and relu in the GEMM's epilogue (cuBLASLt) where the
    weight is dense: one pass over the (wide) output instead of three. Rounding commutes
    with relu, so the result is F.relu(F.linear(x, W, b)) exactly."""
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    if isinstance(weight, PackedInt4) or bias is None:
        return F.relu(_linear(x, w, name))
    y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t())
    return y.view(*x.shape[:-1], weight.shape[0])


def torch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               rms: bool) -> torch.Tensor:
    """Layer norm, or RMSNorm as transformers' LlamaRMSNorm rounds it, in torch ops: the
    model's norms where the kernel (kernels/add_norm.py) cannot run, and its reference."""
    if not rms:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _normed(x: torch.Tensor, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    if add_norm.available(x):
        return add_norm.norm(x, weight, bias, eps, rms)
    return torch_norm(x, weight, bias, eps, rms)


def _layer_norm(x: torch.Tensor, w: Weights, name: str, eps: float) -> torch.Tensor:
    return _normed(x, w.get(f"{name}.weight"), w.get(f"{name}.bias"), eps, rms=False)


def _rms_norm(x: torch.Tensor, w: Weights, name: str, eps: float) -> torch.Tensor:
    return _normed(x, w[f"{name}.weight"], None, eps, rms=True)


_NORMS = {"layernorm": _layer_norm, "rmsnorm": _rms_norm}


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def _merge(a: torch.Tensor) -> torch.Tensor:
    b, nh, t, hd = a.shape
    return a.transpose(1, 2).reshape(b, t, nh * hd)


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "gelu": F.gelu,  # as transformers' ACT2FN
                "bloom_gelu": _bloom_gelu}  # BLOOM's own tanh constants (not gelu_new's)


def _activation(name: str):
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """Rotary positions over the first `dim` features of each head (all of them unless
    the config asks for partial rotary), with the config's scaling applied through
    transformers' own rope initializers."""

    def __init__(self, config: dict, head_dim: int):
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = AutoConfig.for_model(**config)
        params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            base = params.get("rope_theta", getattr(hf, "rope_theta", getattr(hf, "rotary_emb_base", 10000.0)))
            share = params.get("partial_rotary_factor",
                               getattr(hf, "partial_rotary_factor", getattr(hf, "rotary_pct", 1.0)))
            dim = int(head_dim * share)
            self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.gain = 1.0
        else:
            self.inv_freq, self.gain = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
        self.dim = 2 * self.inv_freq.numel()
        self.partial = self.dim < head_dim
        self._on: dict[torch.device, torch.Tensor] = {}  # inv_freq per device: no copy inside a captured step

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        inv = self._on.get(pos.device)
        if inv is None:
            inv = self._on[pos.device] = self.inv_freq.to(pos.device)
        freqs = pos.float()[..., None] * inv[None, None, :]  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = (emb.cos() * self.gain).to(x.dtype), (emb.sin() * self.gain).to(x.dtype)
        if self.partial:
            rot, rest = x[..., : self.dim], x[..., self.dim :]
            return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
        return x * cos + _rotate_half(x) * sin


class Decoder:
    """Embedding, decoder layer and head of any family, as its spec's `Math` says."""

    def __init__(self, spec: arch.ArchSpec, config: dict, dims: ModelDims):
        m = self.m = spec.math_for(config)
        self.n, self.dims, self.tied = spec.names, dims, spec.tied_to
        self.alibi = m.positions == "alibi"
        self.rope = Rope(config, dims.head_dim) if m.positions == "rope" else None
        self.act = _activation(m.activation)
        self._norm_fn = _NORMS[m.norm]
        # "projection" (OPT: transformers scales the projected queries) is applied as the
        # softmax scale, the same product without a pass over the queries
        self.scale = {"attention": dims.head_dim**-0.5, "attention_inv_sqrt": 1.0 / math.sqrt(dims.head_dim),
                      "projection": dims.head_dim**-0.5}[m.query_scale]

    def _norm(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        return self._norm_fn(x, w, name, self.m.eps)

    def embed(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, w[f"{self.n.tokens}.weight"])
        if self.m.positions == "learned":
            h = h + F.embedding(positions + self.m.position_offset, w[f"{self.n.positions}.weight"])
        return self._norm(h, w, self.n.embed_norm) if self.n.embed_norm else h

    def pre_attention(self, w: Weights, h: torch.Tensor, pos: torch.Tensor):
        x = self._norm(h, w, self.n.attn_norm) if self.m.pre_norm else h
        nh, kvh, hd = self.dims.num_heads, self.dims.kv_heads, self.dims.head_dim
        if MERGED_QKV in w:  # a resident INT4 layer at decode: q, k, v in one fused matmul
            matrix, bias = w[MERGED_QKV]
            q, k, v = matrix.linear(x, bias).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
            q, k, v = _heads(q, nh), _heads(k, kvh), _heads(v, kvh)
        elif self.m.qkv == "fused":  # [B, T, heads, (q, k, v), head_dim]
            b, t, _ = x.shape
            fused = _linear(x, w, self.n.qkv[0]).view(b, t, nh, 3, hd)
            q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        else:
            qn, kn, vn = self.n.qkv
            q, k, v = _heads(_linear(x, w, qn), nh), _heads(_linear(x, w, kn), kvh), _heads(_linear(x, w, vn), kvh)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v

    def _mlp(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        if self.m.mlp == "gated":
            gate, up, down = self.n.mlp
            return _linear(self.act(_linear(x, w, gate)) * _linear(x, w, up), w, down)
        up, down = self.n.mlp
        if self.act is F.relu:
            return _linear(_linear_relu(x, w, up), w, down)
        return _linear(self.act(_linear(x, w, up)), w, down)

    def post_attention(self, w: Weights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        m, n = self.m, self.n
        a = _linear(_merge(attn), w, n.out)
        if m.parallel:  # both branches read the layer input
            return h + a + self._mlp(w, self._norm(h, w, n.attn_norm if m.shared_norm else n.mlp_norm))
        if not m.pre_norm:  # post-norm: normalize each residual sum
            h = self._norm(h + a, w, n.attn_norm)
            return self._norm(h + self._mlp(w, h), w, n.mlp_norm)
        residual = self._norm(h, w, n.attn_norm) if m.residual_from_norm else h
        if add_norm.available(a) and residual.shape == a.shape:  # the sum and its norm in one pass
            h, x = add_norm.add_norm(residual, a, w.get(f"{n.mlp_norm}.weight"), w.get(f"{n.mlp_norm}.bias"),
                                     m.eps, rms=m.norm == "rmsnorm")
        else:
            h = residual + a
            x = self._norm(h, w, n.mlp_norm)
        return (x if m.residual_from_norm else h) + self._mlp(w, x)

    def logits(self, w_head: Weights, w_embed: Weights, h: torch.Tensor) -> torch.Tensor:
        if self.m.pre_norm and self.m.final_norm:
            h = self._norm(h, w_head, self.n.final_norm)
        return F.linear(h, w_head.get("lm_head.weight", w_embed[self.tied]))


def family_for(config: dict, dims: ModelDims) -> Family:
    return Decoder(arch.spec_for(config), config, dims)


def attention_bias(
    pad: torch.Tensor, q_len: int, k_len: int, slopes: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, H or 1, q_len, k_len] for left-padded sequences: padding keys
    and future keys are -inf; ALiBi adds slope_h * (key position - pad). Queries are the
    last q_len positions of the k_len."""
    device = pad.device
    kpos = torch.arange(k_len, device=device)
    qpos = torch.arange(k_len - q_len, k_len, device=device)
    allowed = (kpos[None, None, :] <= qpos[None, :, None]) & (kpos[None, None, :] >= pad[:, None, None])
    allowed |= kpos[None, None, :] == qpos[None, :, None]  # a padding query sees itself: no all -inf row (NaN)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(~allowed, float("-inf"))
    bias = bias[:, None]  # [B, 1, q, k]
    if slopes is not None:
        rel = (kpos[None, :] - pad[:, None]).float()  # [B, k]
        bias = bias + slopes.to(device)[None, :, None, None] * rel[:, None, None, :]
    return bias.to(dtype)


_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_WIDE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *_PREFILL_BACKENDS]
# A causal prefill of at least this many tokens (sequences x length) runs cuDNN's attention
# first: 1.26 ms against flash's 2.34 for 128 x 512 tokens of OPT-30B's heads on the H200
# (BENCHMARKS.md, fifteenth session). cuDNN builds a graph per new shape (~5 ms of host
# time, once: it is cached), which only a wide prefill hides; decode never uses it.
CUDNN_MIN_TOKENS = 4096


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a prompt with no padding and no ALiBi: no mask tensor, so
    the flash kernels (cuDNN's or flash-attention's) can run."""
    wide = q.is_cuda and q.shape[0] * q.shape[2] >= CUDNN_MIN_TOKENS
    with sdpa_kernel(_WIDE_BACKENDS if wide else _PREFILL_BACKENDS, set_priority=wide):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
           gemv: bool = False) -> torch.Tensor:
    """softmax(scale * q.k^T + bias) v, on whatever device the tensors are.

    With `gemv` (the device's choice: compute_node/device/), decode (one query) is two
    batched GEMVs that read K and V once, in place (the cache slices are strided).
    cuDNN's attention is avoided: it rebuilds its graph for every new key length, ~5 ms
    of host time per call (BENCHMARKS.md, "Kernel measurements")."""
    gqa = k.shape[1] != q.shape[1]
    if q.shape[2] == 1 and gemv:  # grouped heads ride along as GEMV rows: K, V are read once
        b, h, _, d = q.shape
        qg = q.view(b, k.shape[1], h // k.shape[1], d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale + bias.float().view(b, -1, 1, k.shape[2])
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).view(b, h, 1, d)
    with sdpa_kernel(_PREFILL_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)

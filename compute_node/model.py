"""The transformer math of each family, as plain functions over weight dicts.

A layer is split where the attention happens, so the engine can run the attention
anywhere (on the device over a local cache, or in the KV store on the CPU) and
interleave micro-batches:

    q, k, v = family.pre_attention(w, h, pos) # [B, heads (kv heads for k, v), T, head_dim]
    a       = <attention backend>(q, k, v)    # [B, heads, T, head_dim]
    h       = family.post_attention(w, h, a)

Weights are dicts of local names (strata/arch.py) to dense tensors on the compute
device. OPT and BLOOM are the two implementations of `Family`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from strata.arch import ModelDims

Weights = dict[str, torch.Tensor]


class Family(Protocol):
    scale: float  # softmax scale the attention applies to q.k
    alibi: bool

    def embed(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...
    def pre_attention(self, w: Weights, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def post_attention(self, w: Weights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor: ...
    def logits(self, w_head: Weights, w_embed: Weights, h: torch.Tensor) -> torch.Tensor: ...


def _linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _norm(x: torch.Tensor, w: Weights, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w.get(f"{name}.weight"), w.get(f"{name}.bias"), eps)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def _merge(a: torch.Tensor) -> torch.Tensor:
    b, nh, t, hd = a.shape
    return a.transpose(1, 2).reshape(b, t, nh * hd)


class OPTFamily:
    alibi = False
    scale = 1.0  # q is pre-scaled by head_dim**-0.5, as in OPT

    def __init__(self, config: dict, dims: ModelDims):
        self.dims = dims
        self.pre_ln = config.get("do_layer_norm_before", True)
        self.final_ln = self.pre_ln and not config.get("_remove_final_layer_norm", False)
        self.eps = 1e-5
        self.q_scale = dims.head_dim**-0.5

    def embed(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, w["embed_tokens.weight"]) + F.embedding(positions + 2, w["embed_positions.weight"])

    def pre_attention(self, w: Weights, h: torch.Tensor, pos: torch.Tensor):
        x = _norm(h, w, "self_attn_layer_norm", self.eps) if self.pre_ln else h
        nh = self.dims.num_heads
        q = _heads(_linear(x, w, "self_attn.q_proj") * self.q_scale, nh)
        return q, _heads(_linear(x, w, "self_attn.k_proj"), nh), _heads(_linear(x, w, "self_attn.v_proj"), nh)

    def post_attention(self, w: Weights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + _linear(_merge(attn), w, "self_attn.out_proj")
        if not self.pre_ln:
            h = _norm(h, w, "self_attn_layer_norm", self.eps)
        x = _norm(h, w, "final_layer_norm", self.eps) if self.pre_ln else h
        h = h + _linear(F.relu(_linear(x, w, "fc1")), w, "fc2")
        return h if self.pre_ln else _norm(h, w, "final_layer_norm", self.eps)

    def logits(self, w_head: Weights, w_embed: Weights, h: torch.Tensor) -> torch.Tensor:
        if self.final_ln:
            h = _norm(h, w_head, "final_layer_norm", self.eps)
        return F.linear(h, w_head.get("lm_head.weight", w_embed["embed_tokens.weight"]))


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomFamily:
    alibi = True

    def __init__(self, config: dict, dims: ModelDims):
        self.dims = dims
        self.eps = config.get("layer_norm_epsilon", 1e-5)
        self.residual_post_ln = config.get("apply_residual_connection_post_layernorm", False)
        self.scale = 1.0 / math.sqrt(dims.head_dim)

    def embed(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return _norm(F.embedding(ids, w["word_embeddings.weight"]), w, "word_embeddings_layernorm", self.eps)

    def pre_attention(self, w: Weights, h: torch.Tensor, pos: torch.Tensor):
        x = _norm(h, w, "input_layernorm", self.eps)
        b, t, _ = x.shape
        fused = _linear(x, w, "self_attention.query_key_value").view(b, t, self.dims.num_heads, 3, self.dims.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        return q, k, v

    def post_attention(self, w: Weights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        residual = _norm(h, w, "input_layernorm", self.eps) if self.residual_post_ln else h
        h = residual + _linear(_merge(attn), w, "self_attention.dense")
        x = _norm(h, w, "post_attention_layernorm", self.eps)
        residual = x if self.residual_post_ln else h
        return residual + _linear(_bloom_gelu(_linear(x, w, "mlp.dense_h_to_4h")), w, "mlp.dense_4h_to_h")

    def logits(self, w_head: Weights, w_embed: Weights, h: torch.Tensor) -> torch.Tensor:
        h = _norm(h, w_head, "ln_f", self.eps)
        return F.linear(h, w_head.get("lm_head.weight", w_embed["word_embeddings.weight"]))


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaFamily:
    """Llama 2/3, Mistral, Qwen2: RMSNorm, RoPE (scaling from the config, through
    transformers' own rope initializers), grouped-query attention, SwiGLU."""

    alibi = False

    def __init__(self, config: dict, dims: ModelDims):
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self.dims = dims
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.scale = dims.head_dim**-0.5
        hf = AutoConfig.for_model(**config)
        params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
            self.inv_freq = 1.0 / (base ** (torch.arange(0, dims.head_dim, 2, dtype=torch.float32) / dims.head_dim))
            self.rope_gain = 1.0
        else:
            self.inv_freq, self.rope_gain = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")

    def embed(self, w: Weights, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, w["embed_tokens.weight"])

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        freqs = pos.float()[..., None] * self.inv_freq.to(pos.device)[None, None, :]  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = (emb.cos() * self.rope_gain).to(x.dtype), (emb.sin() * self.rope_gain).to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def pre_attention(self, w: Weights, h: torch.Tensor, pos: torch.Tensor):
        x = _rms_norm(h, w["input_layernorm.weight"], self.eps)
        q = _heads(_linear(x, w, "self_attn.q_proj"), self.dims.num_heads)
        k = _heads(_linear(x, w, "self_attn.k_proj"), self.dims.kv_heads)
        v = _heads(_linear(x, w, "self_attn.v_proj"), self.dims.kv_heads)
        return self._rope(q, pos), self._rope(k, pos), v

    def post_attention(self, w: Weights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + _linear(_merge(attn), w, "self_attn.o_proj")
        x = _rms_norm(h, w["post_attention_layernorm.weight"], self.eps)
        return h + _linear(F.silu(_linear(x, w, "mlp.gate_proj")) * _linear(x, w, "mlp.up_proj"), w, "mlp.down_proj")

    def logits(self, w_head: Weights, w_embed: Weights, h: torch.Tensor) -> torch.Tensor:
        h = _rms_norm(h, w_head["norm.weight"], self.eps)
        return F.linear(h, w_head.get("lm_head.weight", w_embed["embed_tokens.weight"]))


def family_for(config: dict, dims: ModelDims) -> Family:
    families = {"opt": OPTFamily, "bloom": BloomFamily, "llama": LlamaFamily, "mistral": LlamaFamily,
                "qwen2": LlamaFamily}
    return families[config["model_type"]](config, dims)


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q.k^T + bias) v, on whatever device the tensors are.

    Decode (one query) is two batched GEMVs that read K and V once, in place (the
    cache slices are strided). cuDNN's attention is avoided: it rebuilds its graph for
    every new key length, ~5 ms of host time per call (bench/results run 3)."""
    gqa = k.shape[1] != q.shape[1]
    if q.shape[2] == 1 and q.is_cuda:  # grouped heads ride along as GEMV rows: K, V are read once
        b, h, _, d = q.shape
        qg = q.view(b, k.shape[1], h // k.shape[1], d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale + bias.float().view(b, -1, 1, k.shape[2])
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v).view(b, h, 1, d)
    with sdpa_kernel(_PREFILL_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)

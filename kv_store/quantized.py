"""A KV cache stored group-wise quantized on head_dim (INT8 or INT4, fp16 scale and
min per group, strata/quant.py's format), with decode attention computed over it in
chunks of tokens: only one chunk of keys or values is ever dequantized (to fp32) at a
time, never the whole cache."""

from __future__ import annotations

import torch

from kv_store.attention import GroupCache, GroupSpec, build_mask, huge_page_tensor
from strata import quant
from strata.errors import ErrorKind, StrataError

CHUNK = 128  # tokens dequantized at a time


def quantized_bytes(spec: GroupSpec) -> int:
    d, g = spec.head_dim, spec.kv_group
    per_token = (d if spec.kv_bits == 8 else d // 2) + 2 * 2 * (d // g)
    return 2 * spec.num_layers * spec.batch * spec.kv_heads * spec.max_tokens * per_token


class QuantizedGroupCache(GroupCache):
    def __init__(self, spec: GroupSpec, storage: torch.Tensor | None = None):  # noqa: D401 - same contract
        spec.validate()
        if spec.kv_bits not in (4, 8) or spec.head_dim % spec.kv_group or spec.kv_group % 2:
            raise StrataError(ErrorKind.INVALID_ARGUMENT,
                              f"KV quantization {spec.kv_bits} bits, group {spec.kv_group} of head_dim {spec.head_dim}")
        self.spec = spec
        b, h, t, d = spec.batch, spec.kv_heads, spec.max_tokens, spec.head_dim
        per, groups = (d if spec.kv_bits == 8 else d // 2), d // spec.kv_group
        n_codes = 2 * spec.num_layers * b * h * t * per
        n_side = 2 * spec.num_layers * b * h * t * groups
        raw = storage if storage is not None else huge_page_tensor(quantized_bytes(spec))
        self.codes = raw[:n_codes].view(2, spec.num_layers, b, h, t, per)
        side = raw[n_codes : n_codes + 4 * n_side].view(torch.float16)
        self.scale = side[:n_side].view(2, spec.num_layers, b, h, t, groups)
        self.min = side[n_side:].view(2, spec.num_layers, b, h, t, groups)
        self.lengths = [0] * spec.num_layers
        self.mask = build_mask(spec)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.codes, self.scale, self.min))

    def _store(self, which: int, layer: int, start: int, x: torch.Tensor) -> None:
        b, h, n, d = x.shape
        data, sc, mn = quant.quantize(x.reshape(-1, d).float(), self.spec.kv_bits, self.spec.kv_group)
        end = start + n
        self.codes[which, layer, :, :, start:end] = data.view(b, h, n, -1)
        self.scale[which, layer, :, :, start:end] = sc.view(b, h, n, -1)
        self.min[which, layer, :, :, start:end] = mn.view(b, h, n, -1)

    def _load(self, which: int, layer: int, a: int, z: int) -> torch.Tensor:
        s = self.spec
        sl = (which, layer, slice(None), slice(None), slice(a, z))
        data = self.codes[sl].reshape(-1, self.codes.shape[-1])
        w = quant.dequantize(data, self.scale[sl].reshape(data.shape[0], -1), self.min[sl].reshape(data.shape[0], -1),
                             s.kv_bits, s.kv_group, out_dtype=torch.float32)
        return w.view(s.batch, s.kv_heads, z - a, s.head_dim)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        self._check_layer(layer)
        self._check(k, "key", None, self.spec.kv_heads)
        self._check(v, "value", k.shape[2], self.spec.kv_heads)
        start, n = self.lengths[layer], k.shape[2]
        self._check_room(layer, n)
        self._store(0, layer, start, k)
        self._store(1, layer, start, v)
        self.lengths[layer] = start + n
        return start + n

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        self._check_layer(layer)
        self._check(q, "query", 1, self.spec.num_heads)
        length = self.append(layer, k_new, v_new)
        b, hq, _, d = q.shape
        hk = self.spec.kv_heads
        qg = q.float().view(b, hk, hq // hk, d) * self.spec.scale
        chunks = [(a, min(a + CHUNK, length)) for a in range(0, length, CHUNK)]
        scores = torch.cat([qg @ self._load(0, layer, a, z).transpose(-1, -2) for a, z in chunks], dim=-1)
        if self.mask is not None:
            m = self.mask[..., :length]
            scores = scores + (m.view(b, hk, hq // hk, length) if m.shape[1] == hq else m)
        p = torch.softmax(scores, dim=-1)
        out = sum(p[..., a:z] @ self._load(1, layer, a, z) for a, z in chunks)
        return out.view(b, hq, 1, d).to(q.dtype)

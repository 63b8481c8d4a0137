"""A KV cache stored group-wise quantized on head_dim (INT8 or INT4, fp16 scale and
min per group: strata/model/kv_quant.py's format). Decode attention runs in the KV store's
own kernel (kv_store/native.py: codes read once, nothing dequantized to memory) for a
bfloat16 query; otherwise in PyTorch, in chunks of tokens: only one chunk of keys or
values is ever dequantized (to fp32) at a time, never the whole cache, into a float32
buffer of CHUNK tokens the group keeps (fresh tensors for each 128-token chunk measured
10x slower, likely first-touch page faults).

The PyTorch path is compute bound (it rebuilds float32 values); the native kernel
works on the codes directly (kv_store/decode_attention_qx.c: integer dot products for
the scores, per-group scale and min applied once), so it reads the cache nearer DRAM
speed. `python -m tools.bench_attention --kv-bits 16,8,4` compares them; the figures
are in BENCHMARKS.md."""

from __future__ import annotations

import torch

from kv_store.group_cache import GroupCache, GroupSpec, build_mask
from kv_store.host_pages import huge_page_tensor
from strata.model.kv_quant import KVFormat

CHUNK = 64  # tokens dequantized at a time (64 beat 16, 32 and 128 in the measurement above)


def kv_format(spec: GroupSpec) -> KVFormat:
    """Raises StrataError(INVALID_ARGUMENT) unless kv_bits is 8 or 4 and the group fits head_dim."""
    return KVFormat(spec.kv_bits, spec.head_dim, spec.kv_group)


def quantized_bytes(spec: GroupSpec) -> int:
    vectors = 2 * spec.num_layers * spec.batch * spec.kv_heads * spec.max_tokens
    return vectors * kv_format(spec).vector_bytes


class QuantizedGroupCache(GroupCache):
    def __init__(self, spec: GroupSpec, storage: torch.Tensor | None = None, native=None):  # noqa: D401 - same contract
        spec.validate()
        self.native = native
        self.spec, self.fmt = spec, kv_format(spec)
        b, h, t = spec.batch, spec.kv_heads, spec.max_tokens
        per, groups = self.fmt.code_width, self.fmt.groups
        n_codes = 2 * spec.num_layers * b * h * t * per
        n_side = 2 * spec.num_layers * b * h * t * groups
        raw = storage if storage is not None else huge_page_tensor(quantized_bytes(spec))
        self.codes = raw[:n_codes].view(2, spec.num_layers, b, h, t, per)
        side = raw[n_codes : n_codes + 4 * n_side].view(torch.float16)
        self.scale = side[:n_side].view(2, spec.num_layers, b, h, t, groups)
        self.min = side[n_side:].view(2, spec.num_layers, b, h, t, groups)
        self.lengths = [0] * spec.num_layers
        self.mask = build_mask(spec)
        self._slot_masks = None  # (positions, mask) of the last slot step (GroupCache._slot_mask)
        self._chunk_buffers = None  # (float32 [b, h, CHUNK, head_dim], uint8 nibbles), made at the first attend

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.codes, self.scale, self.min))

    def _store(self, which: int, layer: int, start: int, x: torch.Tensor, rows: slice = slice(None)) -> None:
        sl = (which, layer, rows, slice(None), slice(start, start + x.shape[2]))
        if self.native is not None and self.native.quantize(x, self.codes[sl], self.scale[sl], self.min[sl],
                                                            self.fmt.bits, self.fmt.group):
            return  # in place, on the kernel's threads (PyTorch's ops are far slower at a T1 prompt)
        self.codes[sl], self.scale[sl], self.min[sl] = self.fmt.quantize(x)

    def _load(self, which: int, layer: int, a: int, z: int, rows: int | None = None) -> torch.Tensor:
        """Tokens [a, z), z - a <= CHUNK, of the first `rows` rows (default all),
        dequantized to float32 [rows, h, z - a, head_dim]: a view of the group's chunk
        buffer, valid until the next `_load`."""
        if self._chunk_buffers is None:
            b, h, d = self.spec.batch, self.spec.kv_heads, self.spec.head_dim
            nibbles = torch.empty(b, h, CHUNK, self.fmt.code_width, dtype=torch.uint8)
            self._chunk_buffers = (torch.empty(b, h, CHUNK, d), nibbles)
        rows = self.spec.batch if rows is None else rows
        out, nibbles = (buf[:rows, :, : z - a] for buf in self._chunk_buffers)
        sl = (which, layer, slice(0, rows), slice(None), slice(a, z))
        return self.fmt.dequantize_into(self.codes[sl], self.scale[sl], self.min[sl], out, nibbles)

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

    def _kernel_stores(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> bool:
        return False  # quantized on store: _store_new, through the kernel's quantizer

    def _store_rows(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._store(0, layer, 0, k, slice(row, row + k.shape[0]))
        self._store(1, layer, 0, v, slice(row, row + v.shape[0]))

    def _store_row_block(self, layer: int, n: int, col: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._store(0, layer, col, k, slice(0, n))
        self._store(1, layer, col, v, slice(0, n))

    def _store_columns(self, layer: int, rows: torch.Tensor, cols: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> None:
        for r, c in zip(rows.tolist(), cols.tolist()):  # one vector a row: few, at decode
            self._store(0, layer, c, k[r : r + 1], slice(r, r + 1))
            self._store(1, layer, c, v[r : r + 1], slice(r, r + 1))

    def _attend_rows(self, layer: int, q: torch.Tensor, length: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q's rows (the group's first q.shape[0]) over their first
        `length` tokens."""
        n = q.shape[0]
        if self.native is not None and self.native.supports(q, self.codes[0, layer], self.fmt.group, self.fmt.bits):
            parts = [tuple(x[which, layer, :n, :, :length] for x in (self.codes, self.scale, self.min))
                     for which in (0, 1)]
            return self.native.quantized(q, parts[0], parts[1], mask, self.spec.scale, self.fmt.bits, self.fmt.group)
        b, hq, _, d = q.shape
        hk = self.spec.kv_heads
        qg = q.float().view(b, hk, hq // hk, d) * self.spec.scale
        chunks = [(a, min(a + CHUNK, length)) for a in range(0, length, CHUNK)]
        scores = torch.cat([qg @ self._load(0, layer, a, z, n).transpose(-1, -2) for a, z in chunks], dim=-1)
        if mask is not None:
            scores = scores + (mask.view(b, hk, hq // hk, length) if mask.shape[1] == hq else mask)
        p = torch.softmax(scores, dim=-1)
        out = sum(p[..., a:z] @ self._load(1, layer, a, z, n) for a, z in chunks)
        return out.view(b, hq, 1, d).to(q.dtype)

"""Decode attention over the compute node's own KV cache in one kernel: one query per
row, each row reading only its own columns [0, limit], the cache read where it lies (16
bits, or 8/4-bit codes dequantized in registers), no mask tensor and no copy.

Why: a decode step's attention reads the whole cache once, so its floor is the cache's
bytes over HBM bandwidth. The unfused path (model.attend over kv_cache.read_rows) reads
a quantized cache, writes it back in 16 bits, reads that again and materializes the
scores; on the H200 it ran at under half the floor (BENCHMARKS.md, T2).

The kernel (Triton, flash-decoding): a program per (row, KV head, split of the
columns); the query heads that share a KV head (grouped-query attention) are the rows of
one tensor-core dot, padded to 16; an online softmax over blocks of BLOCK_N columns;
with several splits (few rows: not enough programs for the GPU) each split writes its
partial max, sum and output and `_combine` merges them. Everything is on the device and
of fixed shape, so a captured decode step (slot_graphs.py) replays it.

Elsewhere (CPU, `--device mock-cuda`, no Triton) `reference` computes the same math
with torch ops; it is also what the kernel is tested against."""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from strata.model.kv_quant import KVFormat

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

BLOCK_N = 64  # columns per step of a program's loop
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
MIN_HEADS = 16  # a tensor-core dot needs 16 rows: the query heads of a KV head, padded


@dataclasses.dataclass(frozen=True)
class CachePlanes:
    """One layer's keys or values as a cache store holds them.

    16 bits (`fmt` None): `values` [rows, kv_heads, columns, head_dim] in the compute
    dtype. Quantized: `values` the codes [columns, rows, kv_heads, code_width] uint8,
    `scale` and `w_min` [columns, rows, kv_heads, groups] float16 (token-major, as
    kv_cache._QuantLayers keeps them). Views are fine: strides are read, not assumed."""

    values: torch.Tensor
    fmt: KVFormat | None = None
    scale: torch.Tensor | None = None
    w_min: torch.Tensor | None = None

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(row, head, column) strides of `t`, in its elements."""
        if self.fmt is None:
            return t.stride(0), t.stride(1), t.stride(2)
        return t.stride(1), t.stride(2), t.stride(0)

    def dense(self, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows, kv_heads, columns, head_dim] in `dtype` (the reference's input)."""
        if self.fmt is None:
            return self.values[:rows, :, :columns].to(dtype)
        parts = (p[:columns, :rows] for p in (self.values, self.scale, self.w_min))
        return self.fmt.dequantize(*parts, out_dtype=dtype).permute(1, 2, 0, 3)


def available(q: torch.Tensor, fmt: KVFormat | None) -> bool:
    """Whether the Triton kernel runs for this query and cache format: on CUDA, 16-bit
    (the tensor-core dot; float32 would run it in TF32), head_dim and the groups powers
    of two (tl.arange), head_dim at least 16."""
    head_dim = q.shape[-1]
    def pow2(n: int) -> bool:
        return n >= 1 and n & (n - 1) == 0
    shape_ok = head_dim >= 16 and pow2(head_dim) and (fmt is None or (pow2(fmt.group) and pow2(fmt.groups)))
    return (triton is not None and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and shape_ok)


def decode_attention(q: torch.Tensor, k: CachePlanes, v: CachePlanes, limit: torch.Tensor, columns: int,
                     scale: float, slopes: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * q.K^T (+ ALiBi)) V for one query per row.

    q [rows, heads, 1, head_dim]; `limit` [rows] long on q's device: the last column
    each row reads; `columns`: the columns a row may read at most (> every limit);
    `slopes` [heads] float32 or None. Returns [rows, heads, 1, head_dim] in q's dtype."""
    if available(q, k.fmt):
        return _triton(q, k, v, limit, columns, scale, slopes)
    return reference(q, k, v, limit, columns, scale, slopes)


def reference(q, k: CachePlanes, v: CachePlanes, limit, columns: int, scale: float, slopes=None) -> torch.Tensor:
    """The same attention with torch ops, in float32."""
    rows, heads, _, d = q.shape
    keys, values = (c.dense(rows, columns, torch.float32) for c in (k, v))
    group = heads // keys.shape[1]
    keys, values = (x.repeat_interleave(group, dim=1) for x in (keys, values))
    cols = torch.arange(columns, device=q.device)
    s = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale  # [rows, heads, 1, columns]
    if slopes is not None:
        s = s + slopes.to(q.device).float()[None, :, None, None] * cols.float()
    s = s.masked_fill(cols[None, None, None, :] > limit.view(-1, 1, 1, 1), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), values).to(q.dtype)


def _splits(programs: int, columns: int, device: torch.device) -> int:
    """Column splits so that the grid has about two programs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(math.ceil(2 * sms / programs), math.ceil(columns / (4 * BLOCK_N))))


def _triton(q, k: CachePlanes, v: CachePlanes, limit, columns: int, scale: float, slopes, splits: int | None = None):
    rows, heads, _, d = q.shape
    kv_heads = k.values.shape[1] if k.fmt is None else k.values.shape[2]
    group = heads // kv_heads
    splits = splits or _splits(rows * kv_heads, columns, q.device)
    per_split = math.ceil(columns / splits / BLOCK_N) * BLOCK_N
    splits = math.ceil(columns / per_split)
    q3 = q.squeeze(2)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    acc = torch.empty(splits, rows, heads, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(2, splits, rows, heads, dtype=torch.float32, device=q.device)
    fmt = k.fmt
    bits = 16 if fmt is None else fmt.bits
    sk = k.scale if fmt is not None else k.values  # placeholders where unquantized
    mk = k.w_min if fmt is not None else k.values
    sv = v.scale if fmt is not None else v.values
    mv = v.w_min if fmt is not None else v.values
    c_strides = k.strides(k.values)
    s_strides = k.strides(sk) if fmt is not None else (0, 0, 0)
    _decode_kernel[(rows, kv_heads, splits)](
        q3, k.values, v.values, sk, mk, sv, mv, limit, slopes if slopes is not None else q3, acc, ml,
        scale, q3.stride(0), q3.stride(1), *c_strides, *s_strides, per_split, splits * rows * heads,
        G=group, GP=max(MIN_HEADS, triton.next_power_of_2(group)), D=d, BITS=bits,
        GROUP=fmt.group if fmt is not None else d, NG=fmt.groups if fmt is not None else 1,
        BLOCK_N=BLOCK_N, ALIBI=slopes is not None, DYNAMIC_LOOP=not _INTERPRET,
        TRIPS=per_split // BLOCK_N if _INTERPRET else 0, num_warps=4, num_stages=2)
    return _combine(acc, ml[0], ml[1]).to(q.dtype).view(rows, heads, 1, d)


def _combine(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Merge the splits' partial outputs: acc [splits, rows, heads, d] unnormalized, m
    and l [splits, rows, heads] each split's max and sum (a split with no columns: -inf, 0)."""
    if acc.shape[0] == 1:
        return acc[0] / l[0].unsqueeze(-1)
    top = m.amax(dim=0)
    w = torch.exp(m - top)  # 0 for an empty split
    return (acc * w.unsqueeze(-1)).sum(0) / (l * w).sum(0).unsqueeze(-1)


if triton is not None:

    @triton.jit
    def _load_block(base, s_base, m_base, t, tmask, c_tok, s_tok, D: tl.constexpr, BITS: tl.constexpr,
                    GROUP: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
        """Columns t of one row and KV head as [BLOCK_N, D] in DTYPE."""
        if BITS == 16:
            d = tl.arange(0, D)
            x = tl.load(base + t[:, None] * c_tok + d[None, :], mask=tmask[:, None], other=0.0)
            return x.to(DTYPE)
        g = tl.arange(0, NG)
        e = tl.arange(0, GROUP)
        idx = g[None, :, None] * GROUP + e[None, None, :]  # [1, NG, GROUP]: element index
        m3 = tmask[:, None, None]
        if BITS == 8:
            code = tl.load(base + t[:, None, None] * c_tok + idx, mask=m3, other=0).to(tl.float32)
        else:  # two codes a byte, the even element in the high nibble
            byte = tl.load(base + t[:, None, None] * c_tok + (idx >> 1), mask=m3, other=0).to(tl.int32)
            code = tl.where((idx & 1) == 0, byte >> 4, byte & 15).to(tl.float32)
        s_off = t[:, None, None] * s_tok + g[None, :, None]
        sc = tl.load(s_base + s_off, mask=m3, other=0.0).to(tl.float32)
        mn = tl.load(m_base + s_off, mask=m3, other=0.0).to(tl.float32)
        return tl.reshape(code * sc + mn, (BLOCK_N, D)).to(DTYPE)

    @triton.jit
    def _block(q, m_i, l_i, acc, n0, end, k_base, v_base, ks, km, vs, vm, c_tok, s_tok, scale, slope,
               D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
               ALIBI: tl.constexpr):
        """One block of columns [n0, n0 + BLOCK_N) (those >= end masked) into the online softmax."""
        t = n0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        t64 = t.to(tl.int64)
        k = _load_block(k_base, ks, km, t64, tmask, c_tok, s_tok, D, BITS, GROUP, NG, BLOCK_N, q.dtype)
        s = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK_N] float32
        if ALIBI:
            s += slope[:, None] * t[None, :].to(tl.float32)
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = _load_block(v_base, vs, vm, t64, tmask, c_tok, s_tok, D, BITS, GROUP, NG, BLOCK_N, q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, limit_ptr, slopes_ptr, acc_ptr,
                       ml_ptr, scale, q_row, q_head, c_row, c_head, c_tok, s_row, s_head, s_tok, per_split,
                       l_offset, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       BITS: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr,
                       ALIBI: tl.constexpr, DYNAMIC_LOOP: tl.constexpr, TRIPS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        limit = tl.load(limit_ptr + row)
        start = split * per_split
        end = tl.minimum(start + per_split, limit + 1)
        h = tl.arange(0, GP)
        hmask = h < G
        qh = kvh * G + h  # this program's query heads
        d = tl.arange(0, D)
        q = tl.load(q_ptr + row * q_row + qh[:, None] * q_head + d[None, :], mask=hmask[:, None], other=0.0)
        slope = tl.load(slopes_ptr + qh, mask=hmask & ALIBI, other=0.0).to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        k_base = k_ptr + row * c_row + kvh * c_head
        v_base = v_ptr + row * c_row + kvh * c_head
        s_at = row * s_row + kvh * s_head
        if DYNAMIC_LOOP:  # the GPU: a loop over this split's blocks, software-pipelined
            for n0 in range(start, end, BLOCK_N):
                m_i, l_i, acc = _block(q, m_i, l_i, acc, n0, end, k_base, v_base, ks_ptr + s_at, km_ptr + s_at,
                                       vs_ptr + s_at, vm_ptr + s_at, c_tok, s_tok, scale, slope, D, BITS, GROUP,
                                       NG, BLOCK_N, ALIBI)
        else:  # Triton's CPU interpreter takes no tensor as a loop bound: every block, those past the end skipped
            for i in range(0, TRIPS):  # TRIPS: per_split // BLOCK_N, a constant only here
                if start + i * BLOCK_N < end:
                    m_i, l_i, acc = _block(q, m_i, l_i, acc, start + i * BLOCK_N, end, k_base, v_base, ks_ptr + s_at,
                                           km_ptr + s_at, vs_ptr + s_at, vm_ptr + s_at, c_tok, s_tok, scale, slope,
                                           D, BITS, GROUP, NG, BLOCK_N, ALIBI)
        # partials: acc [splits, rows, heads, D]; m, l [2, splits, rows, heads]
        rows_heads = tl.num_programs(0) * (tl.num_programs(1) * G)
        at = split * rows_heads + row * (tl.num_programs(1) * G) + qh
        tl.store(acc_ptr + at[:, None] * D + d[None, :], acc, mask=hmask[:, None])
        tl.store(ml_ptr + at, m_i, mask=hmask)
        tl.store(ml_ptr + l_offset + at, l_i, mask=hmask)

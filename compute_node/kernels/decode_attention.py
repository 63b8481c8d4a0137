"""Decode attention over the compute node's own KV cache in one kernel: one query per
row, each row reading only its own columns [0, limit], the cache read where it lies (16
bits, or 8/4-bit codes dequantized in registers), no mask tensor and no copy.

Why: a decode step's attention reads the whole cache once, so its floor is the cache's
bytes over HBM bandwidth. The unfused path (model.attend over kv_cache.read_rows) reads
a quantized cache, writes it back in 16 bits, reads that again and materializes the
scores; on the H200 it ran at under half the floor (BENCHMARKS.md, T2).

The kernel (Triton, flash-decoding): a program per (row, KV head, split of the
columns); the query heads that share a KV head (grouped-query attention) are the rows of
one tensor-core dot, padded to 16 (over a quantized cache, one dot per group of
elements over its codes, the group's scale and min applied to the result); an online softmax over blocks of BLOCK_N columns;
with several splits (few rows: too few programs to keep the GPU's memory busy) each split writes its
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

BLOCK_N = 64  # columns per step of a program's loop, 16-bit cache
# the same over a quantized cache, by bits (the H200 at T2's shape: INT8 fastest at 64,
# INT4 at 128; BENCHMARKS.md)
QBLOCK_N = {8: 64, 4: 128}
PROGRAMS_PER_SM = 8  # column splits are added until the grid has about this many programs per SM
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


def pow2(n: int) -> bool:
    """n is a power of two (Triton's tl.arange takes only those)."""
    return n >= 1 and n & (n - 1) == 0


def available(q: torch.Tensor, fmt: KVFormat | None) -> bool:
    """Whether the Triton kernel runs for this query and cache format: on CUDA, 16-bit
    (the tensor-core dot; float32 would run it in TF32), head_dim and the groups powers
    of two (tl.arange), head_dim at least 16."""
    head_dim = q.shape[-1]
    # quantized: one or two groups a vector, each at least 32 elements (16 a half at INT4)
    shape_ok = head_dim >= 16 and pow2(head_dim) and (fmt is None or (pow2(fmt.group) and fmt.groups <= 2
                                                                       and fmt.group >= 32))
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


def _splits(programs: int, columns: int, block: int, device: torch.device) -> int:
    """Column splits so that the grid has about PROGRAMS_PER_SM programs per SM (few
    rows: a program's blocks run one after another), at most one block a split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(math.ceil(PROGRAMS_PER_SM * sms / programs), math.ceil(columns / block)))


def _triton(q, k: CachePlanes, v: CachePlanes, limit, columns: int, scale: float, slopes, splits: int | None = None):
    rows, heads, _, d = q.shape
    kv_heads = k.values.shape[1] if k.fmt is None else k.values.shape[2]
    group = heads // kv_heads
    fmt = k.fmt
    block = BLOCK_N if fmt is None else QBLOCK_N[fmt.bits]
    splits = splits or _splits(rows * kv_heads, columns, block, q.device)
    per_split = math.ceil(columns / splits / block) * block
    splits = math.ceil(columns / per_split)
    q3 = q.squeeze(2)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    acc = torch.empty(splits, rows, heads, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(2, splits, rows, heads, dtype=torch.float32, device=q.device)
    common = dict(G=group, GP=max(MIN_HEADS, triton.next_power_of_2(group)), BLOCK_N=block,
                  ALIBI=slopes is not None, DYNAMIC_LOOP=not _INTERPRET,
                  TRIPS=per_split // block if _INTERPRET else 0, num_warps=4, num_stages=2)
    slopes = slopes if slopes is not None else q3
    if fmt is None:
        _decode_kernel[(rows, kv_heads, splits)](
            q3, k.values, v.values, limit, slopes, acc, ml, scale, q3.stride(0), q3.stride(1),
            *k.strides(k.values), per_split, splits * rows * heads, D=d, **common)
    else:
        _decode_quant_kernel[(rows, kv_heads, splits)](
            q3, k.values, v.values, k.scale, k.w_min, v.scale, v.w_min, limit, slopes, acc, ml, scale,
            q3.stride(0), q3.stride(1), *k.strides(k.values), *k.strides(k.scale), per_split,
            splits * rows * heads, D=d, BITS=fmt.bits, GROUP=fmt.group, NG=fmt.groups, **common)
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
    def _softmax_step(s, t, tmask, m_i, l_i, scale, slope, ALIBI: tl.constexpr):
        """Scores s [GP, BLOCK_N] of columns t into the online softmax: (p, alpha, m, l)."""
        s = s * scale
        if ALIBI:
            s += slope[:, None] * t[None, :].to(tl.float32)
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _block(q, m_i, l_i, acc, n0, end, k_base, v_base, c_tok, scale, slope, D: tl.constexpr,
               BLOCK_N: tl.constexpr, ALIBI: tl.constexpr):
        """16-bit cache: columns [n0, n0 + BLOCK_N) (those >= end masked) into the online softmax."""
        t = n0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        off = t.to(tl.int64)[:, None] * c_tok + tl.arange(0, D)[None, :]
        k = tl.load(k_base + off, mask=tmask[:, None], other=0.0)
        p, alpha, m_i, l_i = _softmax_step(tl.dot(q, tl.trans(k)), t, tmask, m_i, l_i, scale, slope, ALIBI)
        v = tl.load(v_base + off, mask=tmask[:, None], other=0.0)
        return m_i, l_i, acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, limit_ptr, slopes_ptr, acc_ptr, ml_ptr, scale, q_row, q_head,
                       c_row, c_head, c_tok, per_split, l_offset, G: tl.constexpr, GP: tl.constexpr,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr, DYNAMIC_LOOP: tl.constexpr,
                       TRIPS: tl.constexpr):
        """A 16-bit cache [rows, kv_heads, columns, D]."""
        row = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        start = split * per_split
        end = tl.minimum(start + per_split, tl.load(limit_ptr + row) + 1)
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
        if DYNAMIC_LOOP:  # the GPU: a loop over this split's blocks, software-pipelined
            for n0 in range(start, end, BLOCK_N):
                m_i, l_i, acc = _block(q, m_i, l_i, acc, n0, end, k_base, v_base, c_tok, scale, slope, D, BLOCK_N,
                                       ALIBI)
        else:  # Triton's CPU interpreter takes no tensor as a loop bound: every block, those past the end skipped
            for i in range(0, TRIPS):  # TRIPS: per_split // BLOCK_N, a constant only here
                if start + i * BLOCK_N < end:
                    m_i, l_i, acc = _block(q, m_i, l_i, acc, start + i * BLOCK_N, end, k_base, v_base, c_tok, scale,
                                           slope, D, BLOCK_N, ALIBI)
        # partials: acc [splits, rows, heads, D]; m, l [2, splits, rows, heads]
        at = (split * tl.num_programs(0) + row) * (tl.num_programs(1) * G) + qh
        tl.store(acc_ptr + at[:, None] * D + d[None, :], acc, mask=hmask[:, None])
        tl.store(ml_ptr + at, m_i, mask=hmask)
        tl.store(ml_ptr + l_offset + at, l_i, mask=hmask)

    @triton.jit
    def _codes(b, HALF: tl.constexpr, BITS: tl.constexpr, dtype: tl.constexpr):
        """Codes of one half of a group from its bytes (INT4: the even elements are the high nibbles)."""
        if BITS == 4:
            b = (b >> 4) if HALF == 0 else (b & 15)
        return b.to(dtype)  # at most 255: exact in 16 bits

    @triton.jit
    def _group_scores(q0, q1, qsum, b, sc, mn, BITS: tl.constexpr):
        """Scores [GP, BLOCK_N] of one group of elements: its codes' dots scaled, plus min x sum(q)."""
        d = tl.dot(q0, tl.trans(_codes(b, 0, BITS, q0.dtype)))
        if BITS == 4:
            d += tl.dot(q1, tl.trans(_codes(b, 1, BITS, q0.dtype)))
        return d * sc[None, :] + qsum[:, None] * mn[None, :]

    @triton.jit
    def _quant_block(q00, q01, q10, q11, qs0, qs1, m_i, l_i, a00, a01, a10, a11, n0, end, k_base, v_base, ks, km,
                     vs, vm, c_tok, s_tok, scale, slope, BITS: tl.constexpr, NG: tl.constexpr, W: tl.constexpr,
                     BLOCK_N: tl.constexpr, ALIBI: tl.constexpr):
        """Quantized cache: columns [n0, n0 + BLOCK_N) into the online softmax, one or
        two groups of elements (q_g, a_g), each as tensor-core dots over its codes with
        the group's scale and min applied to the dots' results:
            q.k = sum_g scale_g (q_g . codes_g) + min_g sum(q_g)
            sum_t p_t v_t[g] = sum_t (p_t scale_tg) codes_t[g] + sum_t p_t min_tg
        INT4 splits each group in two halves (q_g0, q_g1; a_g0, a_g1): the even
        elements (high nibbles) and the odd ones."""
        t = n0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        t64 = t.to(tl.int64)
        w = tl.arange(0, W)[None, :]
        at = t64[:, None] * c_tok + w  # [BLOCK_N, W]: group 0's bytes; group 1's at + W
        m2 = tmask[:, None]
        kb0 = tl.load(k_base + at, mask=m2, other=0)
        s = _group_scores(q00, q01, qs0, kb0, tl.load(ks + t64 * s_tok, mask=tmask, other=0.0).to(tl.float32),
                          tl.load(km + t64 * s_tok, mask=tmask, other=0.0).to(tl.float32), BITS)
        if NG == 2:
            kb1 = tl.load(k_base + at + W, mask=m2, other=0)
            s += _group_scores(q10, q11, qs1, kb1, tl.load(ks + t64 * s_tok + 1, mask=tmask, other=0.0).to(tl.float32),
                               tl.load(km + t64 * s_tok + 1, mask=tmask, other=0.0).to(tl.float32), BITS)
        p, alpha, m_i, l_i = _softmax_step(s, t, tmask, m_i, l_i, scale, slope, ALIBI)
        dtype = q00.dtype
        vb0 = tl.load(v_base + at, mask=m2, other=0)
        sv = tl.load(vs + t64 * s_tok, mask=tmask, other=0.0).to(tl.float32)
        mv = tl.load(vm + t64 * s_tok, mask=tmask, other=0.0).to(tl.float32)
        pv = (p * sv[None, :]).to(dtype)
        pm = tl.sum(p * mv[None, :], 1)[:, None]
        a00 = a00 * alpha[:, None] + tl.dot(pv, _codes(vb0, 0, BITS, dtype)) + pm
        if BITS == 4:
            a01 = a01 * alpha[:, None] + tl.dot(pv, _codes(vb0, 1, BITS, dtype)) + pm
        if NG == 2:
            vb1 = tl.load(v_base + at + W, mask=m2, other=0)
            sv = tl.load(vs + t64 * s_tok + 1, mask=tmask, other=0.0).to(tl.float32)
            mv = tl.load(vm + t64 * s_tok + 1, mask=tmask, other=0.0).to(tl.float32)
            pv = (p * sv[None, :]).to(dtype)
            pm = tl.sum(p * mv[None, :], 1)[:, None]
            a10 = a10 * alpha[:, None] + tl.dot(pv, _codes(vb1, 0, BITS, dtype)) + pm
            if BITS == 4:
                a11 = a11 * alpha[:, None] + tl.dot(pv, _codes(vb1, 1, BITS, dtype)) + pm
        return m_i, l_i, a00, a01, a10, a11

    @triton.jit
    def _decode_quant_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, km_ptr, vs_ptr, vm_ptr, limit_ptr, slopes_ptr, acc_ptr,
                             ml_ptr, scale, q_row, q_head, c_row, c_head, c_tok, s_row, s_head, s_tok, per_split,
                             l_offset, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                             GROUP: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr,
                             DYNAMIC_LOOP: tl.constexpr, TRIPS: tl.constexpr):
        """A quantized cache of one or two groups a vector: codes [columns, rows,
        kv_heads, code_width] (and the groups' scales and mins [columns, rows, kv_heads,
        NG]) as kv_cache._QuantLayers keeps them."""
        HALVES: tl.constexpr = 2 if BITS == 4 else 1
        W: tl.constexpr = GROUP // HALVES  # elements of a group in one half: the dots' depth
        row = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        start = split * per_split
        end = tl.minimum(start + per_split, tl.load(limit_ptr + row) + 1)
        h = tl.arange(0, GP)
        hmask = h < G
        qh = kvh * G + h
        e = tl.arange(0, W)[None, :] * HALVES  # [1, W]: element k of a half, in its group
        q_at = q_ptr + row * q_row + qh[:, None] * q_head + e
        m2 = hmask[:, None]
        q00 = tl.load(q_at, mask=m2, other=0.0)
        q01 = tl.load(q_at + 1, mask=m2 & (HALVES == 2), other=0.0)
        q10 = tl.load(q_at + GROUP, mask=m2 & (NG == 2), other=0.0)
        q11 = tl.load(q_at + GROUP + 1, mask=m2 & (NG == 2) & (HALVES == 2), other=0.0)
        qs0 = tl.sum(q00.to(tl.float32), 1) + tl.sum(q01.to(tl.float32), 1)
        qs1 = tl.sum(q10.to(tl.float32), 1) + tl.sum(q11.to(tl.float32), 1)
        slope = tl.load(slopes_ptr + qh, mask=hmask & ALIBI, other=0.0).to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        a00 = tl.zeros([GP, W], tl.float32)
        a01 = tl.zeros([GP, W], tl.float32)
        a10 = tl.zeros([GP, W], tl.float32)
        a11 = tl.zeros([GP, W], tl.float32)
        k_base = k_ptr + row * c_row + kvh * c_head
        v_base = v_ptr + row * c_row + kvh * c_head
        s_at = row * s_row + kvh * s_head
        ks, km, vs, vm = ks_ptr + s_at, km_ptr + s_at, vs_ptr + s_at, vm_ptr + s_at
        if DYNAMIC_LOOP:
            for n0 in range(start, end, BLOCK_N):
                m_i, l_i, a00, a01, a10, a11 = _quant_block(
                    q00, q01, q10, q11, qs0, qs1, m_i, l_i, a00, a01, a10, a11, n0, end, k_base, v_base, ks, km, vs,
                    vm, c_tok, s_tok, scale, slope, BITS, NG, W, BLOCK_N, ALIBI)
        else:
            for i in range(0, TRIPS):
                if start + i * BLOCK_N < end:
                    m_i, l_i, a00, a01, a10, a11 = _quant_block(
                        q00, q01, q10, q11, qs0, qs1, m_i, l_i, a00, a01, a10, a11, start + i * BLOCK_N, end, k_base,
                        v_base, ks, km, vs, vm, c_tok, s_tok, scale, slope, BITS, NG, W, BLOCK_N, ALIBI)
        at = (split * tl.num_programs(0) + row) * (tl.num_programs(1) * G) + qh  # [GP]
        out = acc_ptr + at[:, None] * D + e
        tl.store(out, a00, mask=m2)
        if HALVES == 2:
            tl.store(out + 1, a01, mask=m2)
        if NG == 2:
            tl.store(out + GROUP, a10, mask=m2)
            if HALVES == 2:
                tl.store(out + GROUP + 1, a11, mask=m2)
        tl.store(ml_ptr + at, m_i, mask=hmask)
        tl.store(ml_ptr + l_offset + at, l_i, mask=hmask)

"""Keys or values into a quantized device cache in one kernel: read the 16-bit vectors
once, write their codes and each group's scale and min where the cache keeps them
(strata/model/kv_quant.py's format, kv_cache._QuantLayers' token-major layout).

Why: the torch path (KVFormat.quantize, then an indexed copy into the planes) makes a
float32 copy of a permuted prompt and some ten passes over it; at T2's prefill (128
prompts of 512 tokens, 48 layers) that cost about a second on the H200 (BENCHMARKS.md).

The arithmetic is strata/model/quant.py's, in float32: min and max per group, scale =
(max - min) / (2**bits - 1) (at least float16's smallest normal), codes = round((x -
min) / scale) clamped, rounding half to even; scale and min stored as float16. On CPU,
`--device mock-cuda` or without Triton the torch path runs instead."""

from __future__ import annotations

import os

import torch

from compute_node.kernels.decode_attention import pow2
from strata.model.kv_quant import KVFormat

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
BLOCK_T = 16  # tokens a program quantizes
FP16_TINY = torch.finfo(torch.float16).tiny


def available(x: torch.Tensor, fmt: KVFormat) -> bool:
    shape_ok = pow2(fmt.group) and pow2(fmt.groups) and fmt.group >= 2
    return triton is not None and (x.is_cuda or _INTERPRET) and shape_ok


def quantize_into(x: torch.Tensor, fmt: KVFormat, codes: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor,
                  rows: torch.Tensor, col0: torch.Tensor) -> None:
    """x [m, kv_heads, n, head_dim] (any strides, head_dim contiguous) into the planes
    ([columns, cache rows, kv_heads, ...]): input row i's token t goes to cache row
    rows[i], column col0[i] + t. `rows`, `col0` [m] long on x's device."""
    m, heads, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    _quantize_kernel[(m * heads, triton.cdiv(n, BLOCK_T))](
        x, codes, scale, w_min, rows, col0, n, heads, x.stride(0), x.stride(1), x.stride(2),
        codes.stride(0), codes.stride(1), codes.stride(2), scale.stride(0), scale.stride(1), scale.stride(2),
        BITS=fmt.bits, GROUP=fmt.group, NG=fmt.groups, BLOCK_T=BLOCK_T, TINY=FP16_TINY, num_warps=4)


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _quantize_kernel(x_ptr, c_ptr, s_ptr, m_ptr, rows_ptr, col0_ptr, n, heads, x_row, x_head, x_tok,
                         c_tok, c_row, c_head, s_tok, s_row, s_head, BITS: tl.constexpr, GROUP: tl.constexpr,
                         NG: tl.constexpr, BLOCK_T: tl.constexpr, TINY: tl.constexpr):
        HALVES: tl.constexpr = 2 if BITS == 4 else 1
        W: tl.constexpr = GROUP // HALVES
        QMAX: tl.constexpr = 2 ** BITS - 1
        i = tl.program_id(0) // heads
        h = (tl.program_id(0) % heads).to(tl.int64)
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < n
        t64 = t.to(tl.int64)
        g = tl.arange(0, NG)
        k = tl.arange(0, W)
        # element (t, g, k) of half j: g * GROUP + k * HALVES + j
        e = g[None, :, None] * GROUP + k[None, None, :] * HALVES
        x_at = x_ptr + i.to(tl.int64) * x_row + h * x_head + t64[:, None, None] * x_tok + e
        m3 = tmask[:, None, None]
        x0 = tl.load(x_at, mask=m3, other=0.0).to(tl.float32)
        if HALVES == 2:
            x1 = tl.load(x_at + 1, mask=m3, other=0.0).to(tl.float32)
            lo = tl.minimum(tl.min(x0, 2), tl.min(x1, 2))
            hi = tl.maximum(tl.max(x0, 2), tl.max(x1, 2))
        else:
            lo = tl.min(x0, 2)
            hi = tl.max(x0, 2)
        sc = tl.maximum((hi - lo) / QMAX, TINY)  # [BLOCK_T, NG]
        c0 = tl.minimum(tl.maximum(_round_half_even((x0 - lo[:, :, None]) / sc[:, :, None]), 0.0), QMAX)
        if HALVES == 2:
            c1 = tl.minimum(tl.maximum(_round_half_even((x1 - lo[:, :, None]) / sc[:, :, None]), 0.0), QMAX)
            byte = (c0.to(tl.int32) << 4) | c1.to(tl.int32)
        else:
            byte = c0.to(tl.int32)
        row = tl.load(rows_ptr + i)
        col = tl.load(col0_ptr + i) + t64  # [BLOCK_T]
        c_at = c_ptr + col[:, None, None] * c_tok + row * c_row + h * c_head + g[None, :, None] * W + k[None, None, :]
        tl.store(c_at, byte.to(tl.uint8), mask=m3)
        s_at = col[:, None] * s_tok + row * s_row + h * s_head + g[None, :]
        tl.store(s_ptr + s_at, sc.to(tl.float16), mask=tmask[:, None])
        tl.store(m_ptr + s_at, lo.to(tl.float16), mask=tmask[:, None])

"""Fused group-wise dequantization: one pass, reading packed codes plus the group's
scale and min, writing 16-bit weights (DESIGN.md "Formats"; DeepSpeed's nibble order:
even index in the high nibble). On CUDA a Triton kernel; elsewhere strata.model.quant."""

from __future__ import annotations

import torch

from strata.model import quant

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None


if triton is not None:

    @triton.jit
    def _dequant_kernel(data_ptr, scale_ptr, min_ptr, out_ptr, n, BITS: tl.constexpr, GROUP: tl.constexpr,
                        BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if BITS == 4:
            byte = tl.load(data_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
            q = tl.where((offs & 1) == 0, byte >> 4, byte & 15)
        else:
            q = tl.load(data_ptr + offs, mask=mask, other=0).to(tl.int32)
        g = offs // GROUP
        s = tl.load(scale_ptr + g, mask=mask, other=0).to(tl.float32)
        m = tl.load(min_ptr + g, mask=mask, other=0).to(tl.float32)
        w = q.to(tl.float32) * s + m
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, bits: int, group_size: int,
               out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """[out, in] weights in out_dtype from packed parts on any device."""
    if triton is None or not data.is_cuda:
        w = quant.dequantize(data, scale, w_min, bits, group_size, out_dtype=out_dtype)
        return w if out is None else out.copy_(w)
    rows = data.shape[0]
    cols = data.shape[1] * (2 if bits == 4 else 1)
    if out is None:
        out = torch.empty((rows, cols), dtype=out_dtype, device=data.device)
    n = rows * cols
    block = 4096
    _dequant_kernel[(triton.cdiv(n, block),)](data, scale, w_min, out, n, BITS=bits, GROUP=group_size,
                                              BLOCK=block, num_warps=8)
    return out

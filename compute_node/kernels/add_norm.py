"""Layer norm and RMSNorm in one pass over the rows, alone (`norm`) or with the residual
add before them (`add_norm`: s = h + a, y = norm(s), the pre-norm decoder's
`h = residual + attention; x = norm(h)` in model.py).

At prefill these rows are wide (B x prompt rows of the hidden size) and HBM-bound:
torch's layer norm runs at 2.5 TB/s there, its RMSNorm (six fp32 ops) at 0.3 TB/s,
and the add is a pass of its own; this kernel runs at ~4 TB/s and saves the add's
re-read (BENCHMARKS.md, fifteenth session: bench/prefill_ops.py).

A Triton kernel, one row a program, on CUDA only (`available`); model.py runs the
torch ops elsewhere. The rounding is theirs: the sum is rounded to the compute dtype
before the norm reads it, statistics in fp32, and RMSNorm rounds the normalized row
before the weight multiplies it (as transformers' LlamaRMSNorm and model.torch_norm)."""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

MAX_WIDTH = 32768  # one row in one program's registers


def available(x: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and 0 < x.shape[-1] <= MAX_WIDTH
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
         rms: bool) -> torch.Tensor:
    """norm(x) over the last dimension: layer norm (weight and bias optional), or RMSNorm
    with `rms` (weight required)."""
    return _run(x, None, weight, bias, eps, rms)[1]


def add_norm(h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + a, norm(h + a)); h and a of one shape and dtype."""
    if h.shape != a.shape or h.dtype != a.dtype:
        raise ValueError(f"add_norm: {tuple(h.shape)} {h.dtype} and {tuple(a.shape)} {a.dtype} differ")
    return _run(h, a, weight, bias, eps, rms)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _run(h, a, weight, bias, eps: float, rms: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    if rms and weight is None:
        raise ValueError("RMSNorm needs its weight")
    width = h.shape[-1]
    h2 = _rows(h)
    a2 = _rows(a) if a is not None else h2
    y = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    s = torch.empty_like(y) if a is not None else y  # the sum's output (unused without an add)
    if h2.shape[0]:
        block = triton.next_power_of_2(width)
        _norm_kernel[(h2.shape[0],)](
            h2, a2, s, y, weight if weight is not None else y, bias if bias is not None else y,
            width, h2.stride(0), a2.stride(0), eps, ADD=a is not None, RMS=rms, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK=block, num_warps=max(4, min(16, block // 512)))
    return (s.view(h.shape) if a is not None else None), y.view(h.shape)


if triton is not None:

    @triton.jit
    def _norm_kernel(h_ptr, a_ptr, s_ptr, y_ptr, w_ptr, b_ptr, width, h_stride, a_stride, eps,
                     ADD: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0)
        if ADD:
            a = tl.load(a_ptr + row * a_stride + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + a.to(tl.float32)).to(s_ptr.dtype.element_ty)  # rounded, as torch's add
            tl.store(s_ptr + row * width + cols, x, mask=mask)
        x = x.to(tl.float32)
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
            y = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
        else:
            mean = tl.sum(x, axis=0) / width
            d = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / width + eps)
            y = d * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * width + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

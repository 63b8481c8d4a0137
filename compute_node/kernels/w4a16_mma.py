"""The register-fed W4A16 kernel (w4a16_mma.cu) from Python: which problems it takes,
its launch shape, and the call. `w4a16.int4_linear` runs it where its per-shape decision
says MMA, the compute node's kernel choice allows it (compute_node/kernels/choice.py:
the run plan's `w4a16_mma`) and `supports` agrees; its Triton kernel everywhere else."""

from __future__ import annotations

import ctypes

import torch

from compute_node.kernels import cuda_build

DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1}
_BLOCKS_PER_SM = {(4, 3): 4, (4, 4): 3, (8, 3): 2, (8, 4): 2}  # (warps, stages): the kernel's __launch_bounds__
CHUNK_K = 512  # split-K granularity: 8 groups of 64


_P, _I = ctypes.c_void_p, ctypes.c_int
_KERNEL = cuda_build.Launcher(
    "w4a16_mma", "strata_w4a16_m64", [_I, _I, _I, _P, ctypes.c_long, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P],
    lambda cap: f"{cap[0]}{cap[1]}" if cap[0] >= 8 else None)  # cp.async and bf16 mma.sync need sm_80


def prepare(device: torch.device) -> bool:
    """Builds (or finds) the kernel for this GPU now; whether it is available."""
    return _KERNEL.on(device) is not None


MAX_ROWS = 64  # rows of x one call takes (the wgmma kernel: its MAX_ROWS; more: int4_linear splits them)


def shape_fits(n: int, k: int, group_size: int, n_multiple: int = 128) -> bool:
    """The shape part of `problem_fits` (both CUDA kernels): groups of 64, K a multiple of
    512, N of `n_multiple`. Decided once per shape; the tensors' checks come per call."""
    return group_size == 64 and k % CHUNK_K == 0 and n % n_multiple == 0


def _aligned(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def problem_fits(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, n_multiple: int, max_rows: int = MAX_ROWS) -> bool:
    """What both CUDA kernels (this one and w4a16_wgmma) need: x2 [M <= max_rows, K] bf16/fp16
    on CUDA with unit column stride, groups of 64, K a multiple of 512, N of `n_multiple`,
    contiguous fp16 scale and min, bias (if any) in x's dtype, 16-byte aligned."""
    m, k = x2.shape
    n = data.shape[0]
    if not (x2.is_cuda and x2.dtype in DTYPE_CODE and 0 < m <= max_rows and shape_fits(n, k, group_size, n_multiple)):
        return False
    if x2.stride(1) != 1 or x2.stride(0) % 8:
        return False
    if scale.dtype != torch.float16 or w_min.dtype != torch.float16:
        return False
    parts = (data, scale, w_min) + (() if bias is None else (bias,))
    if not all(t.is_contiguous() for t in parts) or (bias is not None and bias.dtype != x2.dtype):
        return False
    return _aligned(x2, *parts)


def supports(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, group_size: int,
             bias: torch.Tensor | None) -> bool:
    """Whether this kernel takes the problem (`problem_fits` with N a multiple of 128) and
    is built for x2's GPU. Whether it may run at all is the caller's kernel choice."""
    return problem_fits(x2, data, scale, w_min, group_size, bias, 128) and _KERNEL.on(x2.device) is not None


# Split-K: about 4.5 blocks per SM, each at least 2 chunks (16 K steps) long, so the
# pipeline's fill and the partials' write are spread over enough work. On OPT-30B's four
# shapes at 64 rows (H100) this picks the fastest of a grid of 14 (stages, split) pairs
# on three shapes and one within 10% of it on the fourth, 21504 x 7168 (5 splits where
# 2 are best; bench/bench_w4a16.py, BENCHMARKS.md seventh session).
BLOCKS_PER_SM_TARGET = 4.5
MIN_CHUNKS_PER_SPLIT = 2


def launch_shape(n: int, k: int, num_sms: int, warps: int = 0, split: int = 0,
                 stages: int = 0) -> tuple[int, int, int, int]:
    """(warps, stages, chunks per split, splits): 4 warps (128 columns a block), a
    4-deep cp.async ring, and split-K as above; `warps`, `split` and `stages` override."""
    warps, stages = warps or 4, stages or 4
    tiles = n // (32 * warps)
    chunks = k // CHUNK_K
    if split:
        per_split = -(-chunks // split)
    else:
        want = -(-int(BLOCKS_PER_SM_TARGET * num_sms) // tiles)
        per_split = min(chunks, max(MIN_CHUNKS_PER_SPLIT, chunks // want))
    return warps, stages, per_split, -(-chunks // per_split)


def linear(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor,
           bias: torch.Tensor | None, num_sms: int, warps: int = 0, split: int = 0, stages: int = 0) -> torch.Tensor:
    """y [M, N] = x2 @ W^T + bias, for a problem `supports` took."""
    m, k = x2.shape
    n = data.shape[0]
    warps, stages, per_split, splits = launch_shape(n, k, num_sms, warps, split, stages)
    if (warps, stages) not in _BLOCKS_PER_SM or n % (32 * warps):
        raise ValueError(f"w4a16_mma: no kernel for {warps} warps, {stages} stages at N {n}")
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device) if splits > 1 else None
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    err = _KERNEL.on(x2.device)(
        DTYPE_CODE[x2.dtype], warps, stages, x2.data_ptr(), x2.stride(0), data.data_ptr(), scale.data_ptr(),
        w_min.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        None if part is None else part.data_ptr(), m, n, k, per_split, splits, stream)
    if err:
        raise RuntimeError(f"w4a16_mma: CUDA error {err} launching M={m} N={n} K={k} warps={warps} splits={splits}")
    return y

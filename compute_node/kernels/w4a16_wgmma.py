"""The wgmma W4A16 kernel (w4a16_wgmma.cu, Hopper sm_90a) from Python: which problems it
takes, its launch shape, and the call. On an sm_90 GPU `w4a16.int4_linear` runs it at
33-128 rows (as 64 or 128 rows of X a block: `tokens`) ahead of w4a16_mma.cu's mma.sync
kernel (which takes up to 64), where the compute node's kernel
choice allows it (compute_node/kernels/choice.py: the run plan's `w4a16_wgmma`; without
it the mma.sync kernel runs, without both the Triton kernel)."""

from __future__ import annotations

import ctypes
import functools

import torch

from compute_node.kernels import cuda_build, w4a16_mma

# rows of X a block takes (wgmma's n) -> {(warpgroups, m64 tiles a warpgroup, cp.async
# stages): resident blocks an SM (registers, shared memory)}
SHAPES = {64: {(1, 2, 6): 2, (2, 1, 6): 2, (2, 1, 8): 2, (2, 2, 6): 1},
          128: {(2, 1, 4): 2, (2, 1, 6): 1, (4, 1, 4): 1, (1, 2, 4): 2}}
DEFAULT_SHAPE = {64: (1, 2, 6), 128: (2, 1, 4)}
MAX_ROWS = 128  # rows of x one call takes


def tokens_for(m: int) -> int:
    """The rows of X a block takes for an M-row problem: 64, or 128 above 64."""
    return 64 if m <= 64 else 128
MIN_CHUNKS_PER_SPLIT = 2
CHUNK_BYTES_PER_COLUMN = 512 // 2 + 512 // 64 * 4  # a 512-wide K chunk of one weight row: nibbles, scale, min


_P, _I = ctypes.c_void_p, ctypes.c_int
_KERNEL = cuda_build.Launcher(
    "w4a16_wgmma", "strata_w4a16_wgmma",
    [_I, _I, _I, _I, _I, _P, ctypes.c_long, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P],
    lambda cap: "90a" if cap == (9, 0) else None)  # wgmma is sm_90a's


def prepare(device: torch.device) -> bool:
    """Builds (or finds) the kernel for this GPU now; whether it is available."""
    return _KERNEL.on(device) is not None


def built(device: torch.device) -> bool:
    """Whether the kernel is built for this GPU (after `prepare`, a lookup)."""
    return _KERNEL.on(device) is not None


def supports(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, group_size: int,
             bias: torch.Tensor | None) -> bool:
    """Whether the kernel takes this problem (w4a16_mma.problem_fits with up to MAX_ROWS
    rows and N a multiple of 128) and is built for x2's GPU. Whether it may run at all is
    the caller's kernel choice."""
    return (w4a16_mma.problem_fits(x2, data, scale, w_min, group_size, bias, 128, MAX_ROWS)
            and _KERNEL.on(x2.device) is not None)


def split_for(tiles: int, chunks: int, slots: int, block_n: int, m: int = 64) -> tuple[int, int]:
    """(chunks per split, splits) for `tiles` column blocks of `block_n` over `chunks`
    512-wide K chunks on `slots` resident blocks, by bytes: each wave of blocks costs a
    full wave's weight bytes however many slots it fills (the kernel is memory-bound), and
    each split past the first writes and reads back fp32 partials [m, N]. Fewer splits on
    a tie; each split at least MIN_CHUNKS_PER_SPLIT chunks long (where K has them)."""
    block_chunk = block_n * CHUNK_BYTES_PER_COLUMN
    partials = 8 * m * tiles * block_n  # fp32, written once and read once
    best = None
    for want in range(1, chunks + 1):
        per = -(-chunks // want)
        if per < min(MIN_CHUNKS_PER_SPLIT, chunks):
            break
        splits = -(-chunks // per)
        cost = -(-tiles * splits // slots) * per * slots * block_chunk + (partials * splits if splits > 1 else 0)
        if best is None or (cost, splits) < best[0]:
            best = ((cost, splits), per, splits)
    return best[1], best[2]


@functools.lru_cache(maxsize=256)  # called per matmul on eager decode paths; split_for loops over K's chunks
def launch_shape(n: int, k: int, num_sms: int, wg: int = 0, tm: int = 0, stages: int = 0,
                 split: int = 0, m: int = 64) -> tuple[int, int, int, int, int]:
    """(warpgroups, tiles, stages, chunks per split, splits) for M rows: DEFAULT_SHAPE of
    its `tokens_for` (64 rows: 128-column blocks of one warpgroup with two m64 tiles, a
    6-deep ring; 128: two warpgroups of one tile, a 4-deep ring), split-K by `split_for`.
    Nonzero arguments override."""
    tokens = tokens_for(m)
    d_wg, d_tm, d_stages = DEFAULT_SHAPE[tokens]
    wg, tm, stages = wg or d_wg, tm or d_tm, stages or d_stages
    chunks = k // w4a16_mma.CHUNK_K
    if split:
        per = -(-chunks // split)
    else:
        bn = 64 * wg * tm
        per, _ = split_for(n // bn, chunks, num_sms * SHAPES[tokens].get((wg, tm, stages), 1), bn, m)
    return wg, tm, stages, per, -(-chunks // per)


def linear(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor,
           bias: torch.Tensor | None, num_sms: int, wg: int = 0, tm: int = 0, stages: int = 0,
           split: int = 0) -> torch.Tensor:
    """y [M, N] = x2 @ W^T + bias, for a problem `supports` took."""
    m, k = x2.shape
    n = data.shape[0]
    tokens = tokens_for(m)
    wg, tm, stages, per_split, splits = launch_shape(n, k, num_sms, wg, tm, stages, split, m)
    if (wg, tm, stages) not in SHAPES[tokens] or n % (64 * wg * tm):
        raise ValueError(f"w4a16_wgmma: no kernel for {wg} warpgroups x {tm} tiles, {stages} stages at N {n} "
                         f"with {tokens} rows of X")
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device) if splits > 1 else None
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    err = _KERNEL.on(x2.device)(
        w4a16_mma.DTYPE_CODE[x2.dtype], tokens, wg, tm, stages, x2.data_ptr(), x2.stride(0), data.data_ptr(),
        scale.data_ptr(), w_min.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        None if part is None else part.data_ptr(), m, n, k, per_split, splits, stream)
    if err:
        raise RuntimeError(f"w4a16_wgmma: CUDA error {err} launching M={m} N={n} K={k} shape=({wg}, {tm}, "
                           f"{stages}) splits={splits}")
    return y

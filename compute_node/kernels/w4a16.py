"""Fused W4A16 linear: Y[M, N] = X[M, K] @ W^T (+ bias) reading the packed INT4 weight
directly (strata.model.quant's format: group-wise asymmetric, `w = q * scale + min`, groups of
`group_size` along K, `data` [N, K // 2] uint8 with the EVEN k in the HIGH nibble).

Design (decode sizes, M = 1..256):

* One program computes a [BLOCK_M, BLOCK_N] tile of Y over a range of K. The K loop
  walks BLOCK_K columns per step, cut into sub-tiles of KS = min(group_size, BLOCK_K)
  columns so each sub-tile lies in exactly one quantization group: its scale and min
  are one value per output row n, no reshapes.
* A sub-tile's packed bytes [BLOCK_N, KS/2] split into the high nibbles (even k) and
  the low nibbles (odd k). Then (constexpr JOIN):
    False - X's sub-tile is split in registers (reshape + tl.split) into its even and
            odd columns: two half-dots X_even @ W_even^T + X_odd @ W_odd^T;
    True  - the two halves are joined back into k order (tl.join + reshape): one dot on
            X's contiguous sub-tile.
  fp32 accumulation on tensor cores (tl.dot).
* WIDE (with JOIN): the step's BLOCK_K / KS group sub-tiles (1, 2 or 4) are joined into
  one [BLOCK_N, BLOCK_K] tile, so a step is one dot instead of one per group; X's
  columns are permuted once per call (`wide_order`) into the joined tile's order.
* Two ways to apply scale/min (constexpr ALGEBRAIC):
    False - dequantize in registers (q * s + m in fp32, rounded to X's dtype), then dot;
            bit-for-bit the same weights as `strata.model.quant.dequantize(..., x.dtype)`.
    True  - dot on offset codes (128 + q in bf16, 1024 + q in fp16: exact), then per
            group acc += s[n] * (X_g @ C_g^T) + (m[n] - offset * s[n]) * rowsum(X_g);
            less ALU per weight when BLOCK_M is small, and more accurate.
* ASM (CUDA only; the interpreter runs the plain path): nibbles become floats by PTX
  (prmt + lop3 put each nibble under the exponent of 128 / 1024), and the dequantized
  weights come from packed bf16x2 / f16x2 FMAs with s and m rounded to X's dtype (one
  rounding of q * s + m). About a third fewer instructions in the K loop than the fp32
  path.
* SWAP computes the transposed tile (W @ X^T, the weight as the MMA's M side), which
  suits small M on some GPUs; the result is the same.
* Split-K when the (M, N) tiles alone cannot fill the GPU (N = 7168 at decode): each
  split writes fp32 partials to a workspace [SPLIT, M, N] and a small kernel sums them,
  adds the bias and casts (deterministic, no atomics).
* Block sizes come from a small heuristic table (`pick_config`), not autotuning, so a
  shape always runs the same kernel; `int4_linear(..., config=...)` overrides it
  (bench/bench_w4a16.py --sweep / --grid measure alternatives). `decide` caches the
  table's answer per (bucket of rows, N, K, group size, SMs, kernel choice): a matmul
  looks its decision up, it does not make it again.
* The device functions (operands, steps, the dot) are in w4a16_tiles.py.

At 33-64 rows on CUDA a register-fed CUDA kernel runs instead where the kernel choice
allows it, it is built and it takes the problem (w4a16_wgmma.cu on sm_90, else
w4a16_mma.cu: no dequantized weight in shared memory); at 65-128 rows the wgmma kernel
takes them in one call (each weight dequantized once), the mma.sync kernel in 64-row
chunks. The choice (choice.py) is made
once at the compute node's start from its run plan and device; direct callers get
`choice.DEFAULT` (both, where built).

On CPU (or without Triton) `int4_linear` falls back to `strata.model.quant.dequantize` +
`torch.nn.functional.linear`; with TRITON_INTERPRET=1 the kernel itself runs on CPU
tensors (slow; tests only).
"""

from __future__ import annotations

import functools
import os
import types
from typing import Mapping

import torch
import torch.nn.functional as F

from compute_node.kernels import choice as kernel_choice, w4a16_mma, w4a16_wgmma
from compute_node.kernels.choice import KernelChoice
from strata.model import quant

try:  # Triton ships with CUDA builds of PyTorch only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines
    triton = None

_DTYPES = (torch.float16, torch.bfloat16)


if triton is not None:
    from compute_node.kernels.w4a16_tiles import join_step, mma, split_step, wide_tile

    @triton.jit
    def _w4a16_kernel(
        x_ptr, d_ptr, s_ptr, mn_ptr, b_ptr, y_ptr,
        M, N, K, ITERS_PER_SPLIT,
        stride_xm, stride_xk, stride_dn, stride_dk,
        stride_sn, stride_sg, stride_mn, stride_mg,
        stride_ys, stride_ym, stride_yn,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        KS: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, ALGEBRAIC: tl.constexpr,
        SWAP: tl.constexpr, JOIN: tl.constexpr, ASM: tl.constexpr, WIDE: tl.constexpr, DOT_F32: tl.constexpr,
        NUM_STAGES: tl.constexpr,
    ):
        # m fastest: the programs sharing one weight tile run side by side (L2 reuse).
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        offs_h = tl.arange(0, KS // 2)  # half a sub-tile: byte columns / even (odd) k
        offs_ks = tl.arange(0, KS)

        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
        d_rows = d_ptr + offs_n.to(tl.int64)[:, None] * stride_dn  # [BN, 1]
        s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn  # [BN]
        mn_rows = mn_ptr + offs_n.to(tl.int64) * stride_mn

        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        k_iters = K // BLOCK_K
        it0 = pid_k * ITERS_PER_SPLIT
        it1 = tl.minimum(it0 + ITERS_PER_SPLIT, k_iters)
        for it in tl.range(it0, it1, num_stages=NUM_STAGES):
            if WIDE:  # the step's sub-tiles joined into one [BN, BLOCK_K] tile: one dot per step
                xt = tl.load(x_rows + (it * BLOCK_K + tl.arange(0, BLOCK_K))[None, :] * stride_xk,
                             mask=mask_m[:, None], other=0.0)  # X' (columns permuted to the tile's order)
                w = wide_tile(d_rows, s_rows, mn_rows, it * BLOCK_K, offs_h, mask_n, stride_dk, stride_sg,
                              stride_mg, x_ptr.dtype.element_ty, GROUP, BLOCK_N, BLOCK_K, KS, ASM, DOT_F32)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                acc = mma(acc, xt, w, SWAP)
            else:
                for sub in tl.static_range(BLOCK_K // KS):
                    k0 = it * BLOCK_K + sub * KS
                    g = k0 // GROUP
                    packed = tl.load(d_rows + ((k0 // 2) + offs_h)[None, :] * stride_dk,
                                     mask=mask_n[:, None], other=0)  # [BN, KS/2] uint8
                    # X's sub-tile, one contiguous load
                    xt = tl.load(x_rows + (k0 + offs_ks)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
                    s = tl.load(s_rows + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
                    mn = tl.load(mn_rows + g * stride_mg, mask=mask_n, other=0.0).to(tl.float32)
                    if JOIN:  # the weight sub-tile in k order: (even, odd) nibbles interleaved, one dot
                        acc = join_step(acc, xt, packed, s, mn, x_ptr.dtype.element_ty, BLOCK_N, KS,
                                        ALGEBRAIC, SWAP, ASM, DOT_F32)
                    else:  # X split in registers into its even and odd columns, two half-dots
                        acc = split_step(acc, xt, packed, s, mn, x_ptr.dtype.element_ty, BLOCK_M, KS,
                                         ALGEBRAIC, SWAP, ASM, DOT_F32)

        if SWAP:
            y_off = offs_n.to(tl.int64)[:, None] * stride_yn + offs_m.to(tl.int64)[None, :] * stride_ym
            y_mask = mask_n[:, None] & mask_m[None, :]
        else:
            y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
            y_mask = mask_m[:, None] & mask_n[None, :]
        if PARTIAL:  # split-K: fp32 partial sums, reduced by _splitk_reduce_kernel
            tl.store(y_ptr + pid_k.to(tl.int64) * stride_ys + y_off, acc, mask=y_mask)
        else:
            if HAS_BIAS:
                bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                if SWAP:
                    acc += bias[:, None]
                else:
                    acc += bias[None, :]
            tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _splitk_reduce_kernel(ws_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(SPLIT):
            acc += tl.load(ws_ptr + i * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# Triton's interpreter switch, read once: Triton itself reads it when the kernels above are
# decorated, at import, so a later change would not reach them anyway.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    return _INTERPRETING


@functools.lru_cache(maxsize=16)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_to_fill(tiles: int, k_iters: int, num_sms: int, at_least: int = 1) -> int:
    """Power-of-two split-K: the smallest whose programs fill a wave of `num_sms` (and
    reach `at_least`), keeping at least 4 K steps per split."""
    split = 1
    while (tiles * split < num_sms or split < at_least) and k_iters // (split * 2) >= 4:
        split *= 2
    return split


def pick_config(m: int, n: int, k: int, group_size: int, num_sms: int = 132) -> dict:
    """Block sizes, split-K and variant for one problem (a fixed table, no autotuning)."""
    cfg = {"ALGEBRAIC": False, "SWAP": False, "JOIN": False, "ASM": False, "WIDE": False, "num_warps": 4,
           "num_stages": 3, "MMA": False, "MMA_KERNEL": "", "MMA_WARPS": 0, "MMA_SPLIT": 0,
           "MMA_STAGES": 0, "MMA_WG": 0, "MMA_TM": 0}
    if m > 32 and k % 128 == 0 and group_size == 64:
        # 33-64 rows: a register-fed CUDA kernel where one is built and takes the problem
        # (on sm_90 w4a16_wgmma.cu, else w4a16_mma.cu; MMA_KERNEL "wgmma" or "mma" picks
        # one); 65-128 rows: the wgmma kernel alone (int4_linear gives the mma.sync kernel
        # chunks of at most 64); else this Triton table.
        cfg["MMA"] = m <= w4a16_wgmma.MAX_ROWS
        # 64-row tiles, 128 output columns, nibbles unpacked by PTX into bf16x2/f16x2 FMAs;
        # 64-column steps split 2 ways, or for a long K (fc2) 128-column steps with two
        # groups joined into one dot, split to fill a wave. On each of OPT-30B's four
        # shapes at 64 rows these take 7-57% less time a call than the narrow split-8
        # tiles below, measured in one process (per-call times vary 1.5-3x between H100
        # hosts; BENCHMARKS.md, sixth session).
        cfg.update(BLOCK_M=64, BLOCK_N=128, JOIN=True, ASM=True)
        if k < 2 * n:
            return dict(cfg, BLOCK_K=64, SPLIT_K=2, num_warps=8)
        split = split_to_fill(-(-m // 64) * -(-n // 128), k // 128, num_sms)
        return dict(cfg, BLOCK_K=128, WIDE=True, SPLIT_K=split)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    wide = block_m < 64
    # Above 32 rows (shapes the table above does not take), narrow tiles split 8 ways
    # along K: among the plain tiles, the best of a greedy sweep on OPT-30B's four shapes
    # at 64 rows (bench/bench_w4a16.py).
    block_n = 128 if n >= 128 and wide else 64
    block_k = 128 if k % 128 == 0 and wide else 64
    # Fill about one wave of SMs (8 splits above 32 rows); keep at least 4 K steps per split.
    split = split_to_fill(-(-m // block_m) * -(-n // block_n), k // block_k, num_sms, 1 if wide else 8)
    return dict(cfg, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split)


def row_chunks(m: int, most: int) -> list[tuple[int, int]]:
    """[a, z) spans splitting m rows into as few chunks of at most `most` as can be, of
    even sizes (128 -> 64 + 64, 100 -> 50 + 50)."""
    count = -(-m // most)
    edges = [m * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def rows_bucket(m: int) -> int:
    """The row counts `pick_config` tells apart: 16, 32 or 64 up to 64 rows (its block
    rows), above that whole 64-row tiles. pick_config(rows_bucket(m), ...) ==
    pick_config(m, ...)."""
    return 16 if m <= 16 else 32 if m <= 32 else -(-m // 64) * 64


@functools.lru_cache(maxsize=4096)
def decide(bucket: int, n: int, k: int, group_size: int, num_sms: int,
           kernels: KernelChoice = kernel_choice.DEFAULT) -> Mapping:
    """One shape's decision, made at its first matmul and kept (read-only): `pick_config`
    for the bucket of rows (`rows_bucket`), with MMA only where an allowed CUDA kernel
    takes the shape (else the Triton kernel, without a per-call look at the CUDA ones)."""
    cfg = pick_config(bucket, n, k, group_size, num_sms)
    cfg["MMA"] = bool(cfg["MMA"]) and kernels.takes_shape(n, k, group_size)
    return types.MappingProxyType(cfg)


def wide_order(x: torch.Tensor, block_k: int, ks: int) -> torch.Tensor:
    """x [M, K] with each BLOCK_K block's columns in the order of `wide_tile`'s joined
    weight tile (a copy; x itself where one sub-tile spans the block)."""
    ng = block_k // ks
    if ng == 1:
        return x
    m, k = x.shape
    if ng == 2:  # [g, c] -> [c, g]
        return x.reshape(m, k // block_k, 2, ks).permute(0, 1, 3, 2).reshape(m, k)
    # g = 2 * o + i; [o, i, c] -> [c, i, o]
    return x.reshape(m, k // block_k, 2, 2, ks).permute(0, 1, 4, 3, 2).reshape(m, k)


def kernel_supported(x: torch.Tensor, k: int, group_size: int) -> bool:
    """Whether `int4_linear` runs the Triton kernel (else the dequantize + F.linear
    fallback): Triton importable, x fp16/bf16 on CUDA (or any device under
    TRITON_INTERPRET=1), K a multiple of 64, group_size a power of two >= 32."""
    if triton is None or x.dtype not in _DTYPES:
        return False
    if not (x.is_cuda or _interpreting()):
        return False
    pow2 = group_size & (group_size - 1) == 0
    return k % 64 == 0 and pow2 and group_size >= 32


def _check(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, group_size: int,
           bias: torch.Tensor | None) -> tuple[int, int]:
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"int4_linear: group_size must be a positive int, got {group_size!r}")
    if not x.is_floating_point():
        raise ValueError(f"int4_linear: x must be floating point (float16/bfloat16), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("int4_linear: x must have at least 1 dimension [..., K]")
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"int4_linear: data must be 2-D uint8 [N, K//2], got {data.dtype} {tuple(data.shape)}")
    n, k = data.shape[0], data.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"int4_linear: x's last dim {x.shape[-1]} != K {k} (data {tuple(data.shape)} packs K//2)")
    if k % group_size != 0:
        raise ValueError(f"int4_linear: K {k} is not a multiple of group_size {group_size}")
    groups = (n, k // group_size)
    for name, t in (("scale", scale), ("w_min", w_min)):
        if tuple(t.shape) != groups:
            raise ValueError(f"int4_linear: {name} must have shape [N, K//group_size] = {list(groups)}, "
                             f"got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"int4_linear: {name} must be floating point (float16), got {t.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"int4_linear: bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise ValueError(f"int4_linear: bias must be floating point, got {bias.dtype}")
    devices = {t.device for t in (x, data, scale, w_min) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"int4_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    return n, k


def cuda_rows(x2: torch.Tensor, kernels: KernelChoice) -> int:
    """Rows one CUDA kernel call takes: the wgmma kernel's MAX_ROWS where it may run and
    is built for x2's GPU, else the mma.sync kernel's."""
    if "wgmma" in kernels.names and x2.is_cuda and w4a16_wgmma.built(x2.device):
        return w4a16_wgmma.MAX_ROWS
    return w4a16_mma.MAX_ROWS


def _cuda_linear(x2: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, num_sms: int, cfg: Mapping,
                 kernels: KernelChoice = kernel_choice.DEFAULT) -> torch.Tensor | None:
    """The result of the first CUDA kernel `kernels` allows (MMA_KERNEL: only that one)
    that takes the problem, or None where none does."""
    kernel = cfg["MMA_KERNEL"]
    if kernel not in ("", *kernel_choice.MODULES):
        raise ValueError(f"int4_linear: MMA_KERNEL is '', 'wgmma' or 'mma', got {kernel!r}")
    for name in kernels.names:
        if kernel and name != kernel:
            continue
        module = kernel_choice.MODULES[name]
        if not module.supports(x2, data, scale, w_min, group_size, bias):
            continue
        if name == "wgmma":
            return module.linear(x2, data, scale, w_min, bias, num_sms, cfg["MMA_WG"], cfg["MMA_TM"],
                                 cfg["MMA_STAGES"], cfg["MMA_SPLIT"])
        return module.linear(x2, data, scale, w_min, bias, num_sms, cfg["MMA_WARPS"], cfg["MMA_SPLIT"],
                             cfg["MMA_STAGES"])
    return None


def int4_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, config: dict | None = None,
                kernels: KernelChoice | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for the INT4 weight W [N, K] given as its packed parts
    (data uint8 [N, K//2], scale and w_min fp16 [N, K//group_size]).

    x: [..., K] float16 or bfloat16; the result is [..., N] in x's dtype. `config`
    overrides keys of `pick_config` (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, ALGEBRAIC,
    SWAP, num_warps, num_stages; MMA to take or skip the CUDA kernels, MMA_KERNEL to pick
    one, MMA_WARPS (mma.sync), MMA_WG and MMA_TM (wgmma), MMA_STAGES and MMA_SPLIT for
    their launch). `kernels`: the CUDA kernels that may run (compute_node/kernels/choice.py;
    None: choice.DEFAULT). Raises ValueError when the parts do not agree."""
    n, k = _check(x, data, scale, w_min, group_size, bias)
    if not kernel_supported(x, k, group_size):
        w = quant.dequantize(data, scale, w_min, 4, group_size, out_dtype=x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    num_sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 4
    kernels = kernel_choice.DEFAULT if kernels is None else kernels
    tile = cuda_rows(x2, kernels)
    if m > tile and not config and decide(rows_bucket(tile), n, k, group_size, num_sms, kernels)["MMA"]:
        # the CUDA kernels' tiles of rows (128 on the wgmma kernel, else 64), once per
        # chunk of rows: each reads the packed layer again, still far fewer bytes than a
        # dense copy written and read
        parts = [int4_linear(x2[a:z], data, scale, w_min, group_size, bias, kernels=kernels)
                 for a, z in row_chunks(m, tile)]
        return torch.cat(parts).reshape(*lead, n)
    cfg = decide(rows_bucket(m), n, k, group_size, num_sms, kernels)
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"int4_linear: unknown config keys {sorted(unknown)}")
        cfg = {**cfg, **config}
    if cfg["MMA"]:
        y = _cuda_linear(x2, data, scale, w_min, group_size, bias, num_sms, cfg, kernels)
        if y is not None:
            return y.reshape(*lead, n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_k = cfg["BLOCK_K"]
    ks = min(group_size, block_k)
    if k % block_k != 0 or block_k % ks != 0 or (ks < group_size and group_size % block_k != 0):
        raise ValueError(f"int4_linear: BLOCK_K {block_k} does not fit K {k} / group_size {group_size}")
    wide = bool(cfg["WIDE"])
    if wide:
        if cfg["ALGEBRAIC"] or block_k // ks not in (1, 2, 4):
            raise ValueError(f"int4_linear: WIDE needs ALGEBRAIC off and BLOCK_K / sub-tile in (1, 2, 4), "
                             f"got BLOCK_K {block_k}, sub-tile {ks}")
        x2 = wide_order(x2, block_k, ks)
    k_iters = k // block_k
    split = max(1, min(int(cfg["SPLIT_K"]), k_iters))
    iters_per_split = triton.cdiv(k_iters, split)
    split = triton.cdiv(k_iters, iters_per_split)  # no empty splits
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    if split > 1:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        stride_ys = out.stride(0)
    else:
        out, stride_ys = y, 0
    bias_arg = bias if bias is not None else y  # any pointer; unused without HAS_BIAS
    _w4a16_kernel[grid](
        x2, data, scale, w_min, bias_arg, out,
        m, n, k, iters_per_split,
        x2.stride(0), x2.stride(1), data.stride(0), data.stride(1),
        scale.stride(0), scale.stride(1), w_min.stride(0), w_min.stride(1),
        stride_ys, out.stride(-2), out.stride(-1),
        GROUP=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, KS=ks,
        HAS_BIAS=bias is not None, PARTIAL=split > 1, ALGEBRAIC=bool(cfg["ALGEBRAIC"]), SWAP=bool(cfg["SWAP"]),
        JOIN=bool(cfg["JOIN"]), ASM=bool(cfg["ASM"]) and not _interpreting(), WIDE=wide,
        DOT_F32=_interpreting(), NUM_STAGES=cfg["num_stages"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](out, bias_arg, y, m * n, n, SPLIT=split,
                                                            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return y.reshape(*lead, n)


MERGED_QKV = "qkv.merged"  # a layer's (PackedInt4, bias or None) for q, k, v as one matrix


class PackedInt4:
    """An INT4 weight [N, K] kept packed on the device; `linear` runs the fused kernel
    under the compute node's kernel choice (`kernels`, made once at its start). The model
    calls it where it would call F.linear on a dense weight."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, group_size: int,
                 kernels: KernelChoice = kernel_choice.DEFAULT):
        self.data, self.scale, self.w_min, self.group_size = data, scale, w_min, group_size
        self.kernels = kernels

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, self.data, self.scale, self.w_min, self.group_size, bias, kernels=self.kernels)

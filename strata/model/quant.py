"""Group-wise asymmetric min-max weight quantization (the DeepSpeed / FlexGen scheme).

A 2-D weight [out, in] is cut into groups of `group_size` consecutive elements along
`in` (DeepSpeed's `group_dim=1`). Per group, in float32:

    scale = (max - min) / (2**bits - 1)
    q     = clamp(round((w - min) / scale), 0, 2**bits - 1)
    w'    = q * scale + min

`scale` and `min` are stored as float16, shape [out, in // group_size]. A constant
group (max == min) gets the smallest normal float16 as its scale, so every code is 0
and it dequantizes to `min`.

Packing: INT8 codes are `data` [out, in] uint8. INT4 codes are two per byte, in the
order of DeepSpeed's `Quantizer._compress_uint8_to_uint4`: element 2k in the high
nibble, element 2k+1 in the low nibble, `data` [out, in // 2] uint8.

Pure torch, device-agnostic: `dequantize` runs unchanged on CUDA tensors.
"""

from __future__ import annotations

import torch

from strata.runtime.errors import ErrorKind, StrataError

BITS = (4, 8)


def quantizable(shape: tuple[int, ...] | torch.Size, group_size: int) -> bool:
    """Whether a weight of `shape` can be quantized with `group_size` at 4 and 8 bits:
    2-D, `in_features` a multiple of `group_size` and even (INT4 packs pairs)."""
    if len(shape) != 2 or group_size <= 0:
        return False
    in_features = shape[1]
    return in_features > 0 and in_features % group_size == 0 and in_features % 2 == 0


def _check(shape: tuple[int, ...] | torch.Size, bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"quantization bits must be 4 or 8, got {bits}")
    if group_size <= 0:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"group_size must be positive, got {group_size}")
    if len(shape) != 2:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"only 2-D weights are quantized, got shape {tuple(shape)}")
    if shape[1] % group_size != 0:
        raise StrataError(
            ErrorKind.INVALID_ARGUMENT,
            f"in_features {shape[1]} of shape {tuple(shape)} is not a multiple of group_size {group_size}",
        )
    if bits == 4 and shape[1] % 2 != 0:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"INT4 needs an even in_features, got shape {tuple(shape)}")


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [out, in]; returns (data uint8, scale fp16, min fp16).

    Raises StrataError(INVALID_ARGUMENT) for bits not in {4, 8}, a non-2-D weight, or
    `in` not a multiple of `group_size`."""
    _check(w.shape, bits, group_size)
    out_features, in_features = w.shape
    q_max = 2**bits - 1
    groups = w.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    w_min = groups.amin(dim=-1, keepdim=True)
    w_max = groups.amax(dim=-1, keepdim=True)
    scale = ((w_max - w_min) / q_max).clamp_min(torch.finfo(torch.float16).tiny)
    codes = ((groups - w_min) / scale).round_().clamp_(0, q_max).to(torch.uint8)
    codes = codes.reshape(out_features, in_features)
    data = pack_int4(codes) if bits == 4 else codes
    return data, scale.squeeze(-1).to(torch.float16), w_min.squeeze(-1).to(torch.float16)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], last dim even -> bytes: even index high nibble, odd low."""
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [..., n] bytes -> [..., 2n] codes."""
    high = data >> 4
    low = data & 0x0F
    return torch.stack((high, low), dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)


def dequantize(
    data: torch.Tensor,
    scale: torch.Tensor,
    min: torch.Tensor,  # noqa: A002 - the stored part's name
    bits: int,
    group_size: int,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Rebuild the weight [out, in] from its parts: `q * scale + min` per group,
    computed in float32 on the parts' device and returned as `out_dtype`."""
    if bits not in BITS:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"quantization bits must be 4 or 8, got {bits}")
    codes = unpack_int4(data) if bits == 4 else data
    out_features, in_features = codes.shape
    if in_features % group_size != 0 or scale.shape != (out_features, in_features // group_size):
        raise StrataError(
            ErrorKind.INVALID_ARGUMENT,
            f"quantized parts do not agree: codes {tuple(codes.shape)}, scale {tuple(scale.shape)}, "
            f"group_size {group_size}",
        )
    groups = codes.reshape(out_features, in_features // group_size, group_size).to(torch.float32)
    w = groups * scale.to(torch.float32).unsqueeze(-1) + min.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_features, in_features).to(out_dtype)


def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, int]:
    """Shape of the `data` part for a logical weight shape [out, in]."""
    out_features, in_features = shape
    return (out_features, in_features // 2) if bits == 4 else (out_features, in_features)


def random_packed(
    shape: tuple[int, ...],
    bits: int,
    group_size: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (data, scale, min) for a logical weight `shape` [out, in], for dummy
    weights in benchmarks: random codes, scale about 0.04 / 2**bits (0.0025 at INT4),
    min about -scale * 2**(bits-1), so values span roughly +-0.02.

    Random numbers are drawn on the generator's device (or `device` without one) and
    moved to `device`."""
    _check(shape, bits, group_size)
    out_features, in_features = shape
    gen_device = generator.device if generator is not None else torch.device(device)
    data = torch.randint(0, 256, packed_shape(shape, bits), dtype=torch.uint8, generator=generator, device=gen_device)
    jitter = torch.rand((out_features, in_features // group_size), generator=generator, device=gen_device)
    scale = (0.04 / 2**bits) * (0.75 + 0.5 * jitter)
    w_min = -scale * 2 ** (bits - 1)
    return data.to(device), scale.to(torch.float16).to(device), w_min.to(torch.float16).to(device)

"""The quantized KV cache format, shared by the KV store's host cache
(kv_store/quantized.py) and the compute node's device cache (LocalSlots,
compute_node/slot_kv.py, over compute_node/kv_cache.py's layer stores).

Every cached key or value vector (one token of one head: head_dim numbers) is quantized
group-wise along head_dim with strata/model/quant.py's scheme: codes [..., head_dim] uint8
at INT8 or [..., head_dim // 2] at INT4 (two per byte), and a float16 scale and min
[..., head_dim // group] per vector. The leading dims are the caller's layout; both
functions keep them.
"""

from __future__ import annotations

import dataclasses

import torch

from strata.model import quant
from strata.runtime.errors import ErrorKind, StrataError

KV_BITS = (4, 8, 16)  # 16: not quantized, the cache holds the compute dtype
DEFAULT_GROUP = 64


def check_bits(bits: int) -> None:
    if bits not in KV_BITS:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"KV cache bits must be 4, 8 or 16, got {bits}")


def default_group(head_dim: int) -> int:
    """64 elements a group where that divides head_dim, else the whole head_dim."""
    return DEFAULT_GROUP if head_dim % DEFAULT_GROUP == 0 else head_dim


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """How one cached vector is stored: `bits` 8 or 4, groups of `group` elements."""

    bits: int
    head_dim: int
    group: int

    def __post_init__(self) -> None:
        d, g = self.head_dim, self.group
        if self.bits not in quant.BITS or g <= 0 or d <= 0 or d % g or (self.bits == 4 and d % 2):
            raise StrataError(ErrorKind.INVALID_ARGUMENT,
                              f"KV quantization {self.bits} bits, group {g} of head_dim {d}")

    @property
    def code_width(self) -> int:
        """Bytes of codes per vector."""
        return self.head_dim if self.bits == 8 else self.head_dim // 2

    @property
    def groups(self) -> int:
        return self.head_dim // self.group

    @property
    def vector_bytes(self) -> int:
        """Bytes per stored vector: codes plus the fp16 scale and min of each group."""
        return self.code_width + 2 * 2 * self.groups

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., head_dim] -> (codes [..., code_width], scale, min [..., groups])."""
        lead = x.shape[:-1]
        data, scale, w_min = quant.quantize(x.reshape(-1, self.head_dim), self.bits, self.group)
        return data.view(*lead, -1), scale.view(*lead, -1), w_min.view(*lead, -1)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
        """Inverse of `quantize`: [..., head_dim] in out_dtype (float32 arithmetic on
        this many vectors only, so callers pass chunks)."""
        lead = codes.shape[:-1]
        rows = codes.reshape(-1, self.code_width)
        w = quant.dequantize(rows, scale.reshape(rows.shape[0], -1), w_min.reshape(rows.shape[0], -1), self.bits,
                             self.group, out_dtype=out_dtype)
        return w.view(*lead, self.head_dim)

    def dequantize_into(self, codes: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor, out: torch.Tensor,
                        nibbles: torch.Tensor | None = None) -> torch.Tensor:
        """`dequantize` into `out` [..., head_dim] float32, a buffer the caller reuses
        (fresh memory per call costs page faults). The same float32 arithmetic, so the
        same numbers. `nibbles`: a uint8 buffer shaped like `codes`, for INT4."""
        if self.bits == 8:
            out.copy_(codes)
        else:
            nibbles = torch.empty_like(codes) if nibbles is None else nibbles
            out[..., 0::2].copy_(torch.bitwise_right_shift(codes, 4, out=nibbles))
            out[..., 1::2].copy_(torch.bitwise_and(codes, 15, out=nibbles))
        groups = out.unflatten(-1, (self.groups, self.group))
        groups.mul_(scale.unsqueeze(-1)).add_(w_min.unsqueeze(-1))
        return out

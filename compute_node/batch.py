"""Turning a request's prompts into padded micro-batches. Torch-light, no I/O."""

from __future__ import annotations

import dataclasses

import torch

from strata.arch import ModelDims
from strata.errors import ErrorKind, StrataError


@dataclasses.dataclass
class MicroBatch:
    index: list[int]  # positions of its sequences in the request
    ids: torch.Tensor  # [b, T] left-padded prompt ids
    pad: torch.Tensor  # [b] left padding of each sequence
    h: torch.Tensor | None = None  # hidden states between layers
    pos: torch.Tensor | None = None  # position ids of the current step (RoPE)
    kv: object = None  # compute_node.kv_cache.KVCache


def validate(prompts: list[list[int]], max_new_tokens: int, dims: ModelDims, max_batch: int) -> None:
    if not prompts:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, "no prompts given")
    if len(prompts) > max_batch:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{len(prompts)} prompts exceed the batch limit {max_batch}")
    if max_new_tokens < 1:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, "max_new_tokens must be at least 1")
    for i, p in enumerate(prompts):
        if not p:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"prompt {i} is empty")
        bad = [t for t in p if t < 0 or t >= dims.vocab]
        if bad:
            raise StrataError(
                ErrorKind.INVALID_ARGUMENT, f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {dims.vocab})"
            )
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > dims.max_positions:
        raise StrataError(
            ErrorKind.INVALID_ARGUMENT,
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"{dims.max_positions} positions",
        )


def split(prompts: list[list[int]], micro_batches: int, pad_id: int) -> list[MicroBatch]:
    """Micro-batches of nearly equal size, in request order, each left-padded to its
    own longest prompt (shorter micro-batches waste less)."""
    n = len(prompts)
    m = max(1, min(micro_batches, n))
    bounds = [round(k * n / m) for k in range(m + 1)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        group = prompts[a:b]
        t = max(len(p) for p in group)
        ids = torch.full((len(group), t), pad_id, dtype=torch.long)
        pad = torch.empty(len(group), dtype=torch.long)
        for r, p in enumerate(group):
            ids[r, t - len(p) :] = torch.tensor(p, dtype=torch.long)
            pad[r] = t - len(p)
        out.append(MicroBatch(index=list(range(a, b)), ids=ids, pad=pad))
    return out


def positions(pad: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Position ids of columns [start, start+length) for left-padded rows (padding: 0)."""
    cols = torch.arange(start, start + length, device=pad.device)[None, :]
    return (cols - pad[:, None]).clamp(min=0)

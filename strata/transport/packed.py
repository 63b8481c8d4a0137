"""Prompts packed along the token axis: [1, heads, sum(lengths), head_dim], sequence i's
tokens after those of 0..i-1. The compute node prefills joining prompts in this layout
(compute_node/slot_kv.py) and AppendRequest carries it to the KV store with their rows
and lengths (kv_store/group_cache.py); both take runs of equal-length sequences as one
batch."""

from __future__ import annotations

import torch


def runs(lengths: list[int], rows: list[int] | None = None) -> list[tuple[int, int]]:
    """[i, j) spans of consecutive sequences of one length (and, given `rows`, in
    consecutive rows: one block of the destination)."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and lengths[j] == lengths[i] and (rows is None or rows[j] == rows[j - 1] + 1):
            j += 1
        spans.append((i, j))
        i = j
    return spans


def stacked(x: torch.Tensor, start: int, m: int, n: int) -> torch.Tensor:
    """m sequences of n tokens from token `start` of packed x [1, heads, T, head_dim], as
    a [m, heads, n, head_dim] view."""
    return x[0, :, start : start + m * n].unflatten(1, (m, n)).transpose(0, 1)

"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the most likely token ids [B], left on the logits' device."""
    return logits.float().argmax(dim=-1)


def choose(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (on the CPU)."""
    if s.greedy:
        return greedy_ids(logits).cpu()
    logits = logits.float()
    logits = logits / max(s.temperature, 1e-5)
    if s.top_k > 0:
        k = min(s.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

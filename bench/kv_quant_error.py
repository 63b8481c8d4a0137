"""Logit error of a quantized KV cache against the float cache, on the tiny random
models (OPT, BLOOM, Llama): the compute node's Runner and scheduler in one process
(tests/in_process.py) with the KV store's cache classes (kv_store/group_cache.py,
kv_store/quantized.py) standing where the KV store would be. Prints one JSON line per
model and precision.

    PYTHONPATH=. python3 bench/kv_quant_error.py
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import tiny_models  # noqa: E402
from compute_node.slot_kv import packed_attention  # noqa: E402
from in_process import InProcess  # noqa: E402
from kv_store.group_cache import GroupCache, GroupSpec  # noqa: E402
from kv_store.quantized import QuantizedGroupCache  # noqa: E402
from tools.convert import convert  # noqa: E402

PROMPTS = [[5, 17, 33, 100, 7, 9] * 4, [44, 3, 250] * 5, list(range(12, 40))]


class _View:
    def __init__(self, positions, idle):
        self.n, self.positions, self.idle = len(positions), positions, idle


class StoreSlots:
    """A group's slots (compute_node/slot_kv.py's interface) over the KV store's cache
    classes, in process: prefill attends on the "device", decode in the store's cache."""

    overlaps = False  # decode_start computes the attention

    def __init__(self, s, bits: int):
        spec = GroupSpec(num_layers=s.num_layers, batch=s.slots, num_heads=s.num_heads, head_dim=s.head_dim,
                         max_tokens=s.capacity, dtype=torch.float32, scale=s.scale, alibi=s.alibi,
                         num_kv_heads=s.kv_heads, kv_bits=bits)
        self.s, self.c = s, (QuantizedGroupCache if bits < 16 else GroupCache)(spec)

    def view(self, positions, idle):
        return _View(positions, idle)

    def prefill(self, layer, joining, q, k, v):
        out = packed_attention(self.s, joining, q, k, v, lambda rows, ks, vs: None)
        self.c.append_rows(layer, joining.rows, joining.lengths, k.contiguous(), v.contiguous())
        return out

    def decode_start(self, layer, view, q, k, v):
        return self.c.attend_at(layer, q.contiguous(), k.contiguous(), v.contiguous(), view.positions, view.idle)

    def decode_finish(self, handle):
        return handle


def logits_of(shards, bits: int, steps: int = 8) -> tuple[torch.Tensor, list[list[int]]]:
    node = InProcess(shards, capacity=64, slots=lambda s: StoreSlots(s, bits))
    seen, original = [], node.family.logits

    def record(*args):
        out = original(*args)
        seen.append(out.detach().clone())
        return out

    node.family.logits = record
    tokens = node.generate(PROMPTS, steps)
    return torch.cat(seen), tokens


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("opt", "bloom", "llama"):
            hf = pathlib.Path(tmp) / family
            getattr(tiny_models, f"make_{family}")(hf)
            shards = hf.parent / f"{family}-s16"
            convert(hf, shards, bits=16)
            ref, ref_tokens = logits_of(shards, 16)
            for bits in (8, 4):
                got, tokens = logits_of(shards, bits)
                n = min(len(got), len(ref))
                err = (got[:n] - ref[:n]).abs()
                print(json.dumps({"model": f"tiny-{family}", "kv_bits": bits, "max_abs_logit_err": round(err.max().item(), 5),
                                  "mean_abs_logit_err": round(err.mean().item(), 6),
                                  "logit_std": round(ref.std().item(), 4), "same_greedy_tokens": tokens == ref_tokens}))


if __name__ == "__main__":
    main()

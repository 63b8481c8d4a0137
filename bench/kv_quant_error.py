"""Logit error of a quantized KV cache against the float cache, on the tiny random
models (OPT, BLOOM, Llama): the engine in one process with the KV store's cache
classes (kv_store/attention.py, kv_store/quantized.py) standing where the KV store
would be. Prints one JSON line per model and precision.

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
from compute_node.engine import Engine  # noqa: E402
from compute_node.layer_weights import LayerWeights  # noqa: E402
from compute_node.model import attend, attention_bias  # noqa: E402
from compute_node.sampling import Sampling  # noqa: E402
from compute_node.weights import HostWeights  # noqa: E402
from kv_store.attention import GroupCache, GroupSpec  # noqa: E402
from kv_store.quantized import QuantizedGroupCache  # noqa: E402
from weight_store.convert import convert  # noqa: E402

PROMPTS = [[5, 17, 33, 100, 7, 9] * 4, [44, 3, 250] * 5, list(range(12, 40))]


class StoreKV:
    """The KVCache protocol over the KV store's cache classes, in process."""

    def __init__(self, shape, bits: int):
        spec = GroupSpec(num_layers=shape.num_layers, batch=shape.pad.numel(), num_heads=shape.num_heads,
                         head_dim=shape.head_dim, max_tokens=shape.max_tokens, dtype=torch.float32,
                         scale=shape.scale, alibi=shape.slopes is not None, pad=tuple(shape.pad.tolist()),
                         num_kv_heads=shape.num_kv_heads, kv_bits=bits)
        self.s, self.c = shape, (QuantizedGroupCache if bits < 16 else GroupCache)(spec)

    def prefill(self, layer, q, k, v):
        t = k.shape[2]
        self.c.append(layer, k.contiguous(), v.contiguous())
        return attend(q, k, v, attention_bias(self.s.pad, t, t, self.s.slopes, q.dtype), self.s.scale)

    def decode_start(self, layer, q, k, v):
        return self.c.attend(layer, q.contiguous(), k.contiguous(), v.contiguous())

    def decode_finish(self, handle):
        return handle

    def free(self):
        pass


def logits_of(shards, bits: int, steps: int = 8) -> torch.Tensor:
    host = HostWeights.from_directory(shards)
    lw = LayerWeights(host, torch.device("cpu"), torch.float32, set(range(host.manifest.num_layers)))
    engine = Engine(lw, lambda shape: StoreKV(shape, bits))
    seen, original = [], engine.family.logits

    def record(*args):
        out = original(*args)
        seen.append(out.detach().clone())
        return out

    engine.family.logits = record
    tokens = [list(s) for s in engine.generate(PROMPTS, steps, Sampling(greedy=True))]
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

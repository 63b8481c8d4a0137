"""`strata demo`: the README's main job, with no network and no arguments.

Makes a small random-weight OPT model and tokenizer in a cache dir, converts it to
INT4 shards, serves it with the three services, generates for a few prompts, prints
tokens/s, and stops."""

from __future__ import annotations

import pathlib
import time

PROMPTS = ["the quick brown fox", "memory tiers keep the slowest link", "hello world", "weights are stored as"]
NEW_TOKENS = 24


def cache_dir() -> pathlib.Path:
    from strata.runtime import paths

    return paths.cache_dir("demo")


def run(args) -> int:
    from deploy.client import generate, request_for
    from deploy.demo_model import make_demo_opt
    from deploy.launcher import ServeOptions, Services
    from deploy.serve_plan import resolve
    from strata.model.manifest import Manifest
    from tools.convert import convert

    root = cache_dir()
    hf, shards = root / "opt-demo-v2-hf", root / "opt-demo-v2-int4"  # v2: the model's vocabulary is its tokenizer's
    print("strata demo: the weights are RANDOM (a small OPT made locally), so the text is gibberish.")
    if not (hf / "config.json").exists():
        print(f"making a random OPT checkpoint in {hf}")
        make_demo_opt(hf, hidden_size=256, num_attention_heads=8, num_hidden_layers=4, ffn_dim=1024,
                      max_position_embeddings=256)
    if not (shards / "manifest.json").exists():
        print(f"converting to INT4 shards in {shards}")
        convert(hf, shards, bits=4, group_size=64)
    kv_offload = not args.kv_local
    plan = resolve(Manifest.load(shards), gpu_weight_share=1.0, kv_offload=kv_offload)
    services = Services(ServeOptions(model_dir=str(shards), plan=plan, listen="127.0.0.1:0", device=args.device,
                                     kv_capacity_bytes=256 << 20))
    address = services.start()
    names = "weight store, KV store, compute node" if kv_offload else "weight store, compute node (KV local)"
    print(f"services up ({names}); listening on {address}")
    try:
        t0 = time.perf_counter()
        result = generate(address, request_for(PROMPTS, NEW_TOKENS, stop_at_eos=False), timeout=300)
        wall = time.perf_counter() - t0
    finally:
        services.stop()
    for prompt, text in zip(PROMPTS, result.texts):
        print(f"  {prompt!r} -> {text!r}")
    n = sum(len(t) for t in result.tokens)
    print(f"{n} tokens in {wall:.2f} s: {n / wall:.1f} tokens/s "
          f"(prefill {result.prefill_s:.3f} s, decode {result.decode_s:.3f} s)")
    print("To run a real checkpoint: strata convert HF_DIR OUT_DIR --quant-bits 4; "
          "strata serve OUT_DIR; strata generate --endpoint 127.0.0.1:50551 --prompt 'Hello' --max-new-tokens 32")
    return 0

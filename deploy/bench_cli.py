"""The `strata bench` flags, named as in DeepSpeed ZeRO-Inference's run_model.py."""

from __future__ import annotations

from deploy.plan_cli import KV_BITS_HELP, kv_bits_arg
from strata.policy.run_plan import parse_kv_kernel_defines


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="throughput benchmark (one JSON line)")
    b.add_argument("--model", required=True, help="converted model dir, or a shape name such as facebook/opt-30b")
    b.add_argument("--dummy", action="store_true", help="random packed weights made in their tier; no disk")
    b.add_argument("--batch-size", type=int, default=None, help="default: the planner's choice on a GPU, else 8")
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=32)
    b.add_argument("--cpu-offload", action="store_true", help="all weights in the host tier (GPU share 0)")
    b.add_argument("--disk-offload", action="store_true",
                   help="streamed layers read from disk every pass (with --dummy: written to --offload-dir first)")
    b.add_argument("--host-budget-gb", type=float, default=0.0,
                   help="host memory for the weights (host tier + staging slots); layers beyond it stay on disk")
    b.add_argument("--offload-dir", default="",
                   help="where --dummy weights for the disk tier are written (default: $STRATA_CACHE or "
                        "~/.cache/strata, under offload/)")
    b.add_argument("--disk-read-gbps", type=float, default=0.0,
                   help="disk read speed for the floor (e.g. measured with dd); default: the profile's")
    b.add_argument("--kv-offload", action="store_true", help="KV cache in the KV store, attention on its CPU")
    b.add_argument("--quant-bits", type=int, default=4, choices=[4, 8, 16])
    b.add_argument("--kv-bits", type=kv_bits_arg, default=16,
                   help=KV_BITS_HELP + "; auto is 16 where the placement is pinned")
    b.add_argument("--group-size", type=int, default=64)
    b.add_argument("--pin-memory", type=int, default=1, help="accepted for compatibility; the host tier is always pinned")
    b.add_argument("--gpu-weight-share", type=float, default=None,
                   help="share of layers resident on the GPU (with --micro-batches: a pinned placement; "
                        "without either, on a GPU the planner chooses)")
    b.add_argument("--micro-batches", type=int, default=None, help="micro-batches per loaded layer")
    b.add_argument("--prefill-chunk-tokens", type=int, default=0,
                   help="prompt tokens prefilled through a layer at once (default: the planner's choice, else "
                        "a micro-batch's slots x their length)")
    b.add_argument("--prefill-tokens-per-pass", type=int, default=0,
                   help="prompt tokens a pass prefills, at most: the batch's prompts go in over several passes "
                        "that also decode the first ones (0 = all in the first pass)")
    b.add_argument("--profile", help="hardware profile for the planner and the floor (default: this machine's; "
                                     "measured if missing when the planner needs it)")
    b.add_argument("--device", default="cuda")
    b.add_argument("--kv-capacity-gb", type=float, default=0.0,
                   help="KV store capacity with --kv-offload; 0 = what the batch needs, plus 5%%")
    b.add_argument("--kv-threads", type=int, default=0, help="KV store attention threads; 0 = its default")
    b.add_argument("--kv-attention", choices=["native", "sdpa"], default="native",
                   help="KV store decode attention: its own kernel or PyTorch SDPA")
    b.add_argument("--no-decode-graphs", action="store_true", help="decode eagerly, without CUDA graph replay")
    b.add_argument("--w4a16-kernels", choices=["auto", "wgmma", "mma", "triton"], default="auto",
                   help="CUDA W4A16 kernels the compute node may run for decode's INT4 matmuls (auto: every one "
                        "built for the GPU; triton: neither)")
    b.add_argument("--kv-kernel-defines", type=parse_kv_kernel_defines, default={}, metavar="'PF_TOKENS=0 PF_HINT=2'",
                   help="the KV store attention kernel's prefetch macros (an experiment; default: the kernel's own)")
    b.add_argument("--json", action="store_true", help="no progress bar; only the JSON line")
    b.add_argument("--warmup", choices=["auto", "short", "none"], default="auto",
                   help="the request before the timed one: short (= auto) is 8-token prompts of the timed batch "
                        "size, 4 new tokens (kernels built, decode graphs of the batch's buckets captured; the "
                        "compute node keeps its slots and graphs for its life); none = no warm-up")
    b.add_argument("--no-warmup", dest="warmup", action="store_const", const="none", help="= --warmup none")
    b.add_argument("--output", help="also append the JSON line to this file")
    b.add_argument("--clients", type=int, default=0,
                   help="after the single call: this many concurrent clients, one prompt each, through the served "
                        "endpoint (the JSON gains a 'clients' object)")
    b.add_argument("--prompt-len-dist", default="",
                   help="with --clients: prompt lengths, uniform:A:B (tokens; at most --prompt-len); default fixed")
    b.add_argument("--gen-len-dist", default="",
                   help="with --clients: new tokens per client, uniform:A:B (at most --gen-len); default fixed")
    b.add_argument("--prompts-jsonl", default="",
                   help="with --clients: prompts from a JSONL file ({\"prompt\": ids or text, \"max_tokens\": n})")
    b.add_argument("--batch-requests", type=int, default=0,
                   help="after the single call: this many --prompt-len/--gen-len requests through `strata batch` "
                        "(its own process, against the served endpoint; the JSON gains a 'batch' object)")
    b.set_defaults(fn=lambda ns: __import__("deploy.bench", fromlist=["main"]).main(ns))

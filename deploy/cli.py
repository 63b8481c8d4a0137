"""`strata` command line: convert, serve, generate, demo, bench."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from deploy.plan_cli import KV_BITS_HELP, kv_bits_arg
from strata import logs
from strata.errors import StrataError


def _convert(a) -> int:
    from weight_store.convert import convert

    ds = None
    if a.ds_config:
        with open(a.ds_config) as f:
            ds = json.load(f)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("converting", total=None)
        m = convert(a.src, a.dst, bits=a.quant_bits, group_size=a.group_size, ds_config=ds,
                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    print(f"converted {a.src} -> {a.dst}: {m.num_layers} layers")
    return 0


def serve_options(a):
    """The services' options from the flags; on a GPU with no placement flag, the
    planner's placement (deploy/serve_plan.py)."""
    from deploy import serve_plan
    from deploy.launcher import ServeOptions

    opts = ServeOptions(
        model_dir=a.model, listen=a.listen, device=a.device, kv_offload=a.kv_offload, kv_bits=a.kv_bits or 16,
        kv_capacity_bytes=int(a.kv_capacity_gb * (1 << 30)),
        gpu_weight_share=1.0 if a.gpu_weight_share is None else a.gpu_weight_share,
        micro_batches=a.micro_batches or 1, dtype=a.dtype, rpc_timeout_s=a.rpc_timeout, transport=a.transport,
        disk_offload=a.disk_offload, host_budget_bytes=int(a.host_budget_gb * (1 << 30)),
        decode_graphs=not a.no_decode_graphs, http=a.http, log_level=a.log_level, log_json=a.log_json,
    )
    return opts if serve_plan.pinned(a) else serve_plan.planned_options(a, opts)


def _serve(a) -> int:
    from deploy.launcher import Services

    services = Services(serve_options(a))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        address = services.start()
    except StrataError as e:
        print(f"strata serve: {e}", file=sys.stderr)
        return 1
    print(f"listening on {address}", flush=True)
    if services.http_address:
        print(f"HTTP API on http://{services.http_address}", flush=True)
    while not stop.wait(0.5):
        dead = services.dead()
        if dead:
            print(f"strata serve: {', '.join(dead)} exited; stopping", file=sys.stderr)
            services.stop()
            return 1
    services.stop()
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 0, got {text!r}")
    return n


def _generate(a) -> int:
    from deploy.client import generate, request_for

    prompts = a.prompts or []
    if not prompts:
        print("strata generate: give at least one --prompt or --prompt-ids", file=sys.stderr)
        return 2
    req = request_for(prompts, a.max_new_tokens, greedy=a.greedy or a.temperature == 0, temperature=a.temperature,
                      top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_at_eos=not a.ignore_eos, stop=a.stop)
    try:
        if len(prompts) == 1 and not a.ids and a.tokenizer:  # one text, printed as it streams
            return _stream_text(a, prompts[0])
        result = generate(a.endpoint, req, timeout=a.timeout)
    except StrataError as e:
        print(f"strata generate: {e}", file=sys.stderr)
        return 1
    for toks, text in zip(result.tokens, result.texts):
        print(" ".join(str(t) for t in toks) if a.ids else text.replace("\n", " "))
    return 0



def _stream_text(a, prompt) -> int:
    """One prompt's text, decoded here with the model's tokenizer (--tokenizer), printed as it streams."""
    from strata.client import Client, Retry

    sampling = dict(greedy=a.greedy or a.temperature == 0, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed, stop_at_eos=not a.ignore_eos, stop=a.stop)
    with Client(a.endpoint, timeout=a.timeout or None, api_key=getattr(a, "api_key", None) or None,
                tls_ca=getattr(a, "tls_ca", None) or None, retry=Retry(attempts=1), tokenizer=a.tokenizer) as c:
        for d in c.stream([prompt], a.max_new_tokens, **sampling):
            print(d.texts[0].replace("\n", " "), end="", flush=True)
    print()
    return 0

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata", description="Strata: big models on one GPU, fast.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint -> pre-quantized layer shards")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--quant-bits", type=int, default=4, choices=[4, 8, 16])
    c.add_argument("--group-size", type=int, default=64)
    c.add_argument("--ds-config", help="DeepSpeed config JSON with a weight_quantization section")
    c.set_defaults(fn=_convert)

    s = sub.add_parser("serve", help="start weight store, KV store and compute node")
    s.add_argument("model", help="converted model directory")
    add_serve_flags(s)
    s.add_argument("--http", metavar="HOST:PORT", default="",
                   help="also serve the OpenAI-compatible HTTP API and /metrics there (a fourth process, gateway/)")
    s.set_defaults(fn=_serve)

    g = sub.add_parser("generate", help="generate from a running server")
    g.add_argument("--endpoint", required=True)
    g.add_argument("--prompt", dest="prompts", action="append", type=str)
    g.add_argument("--prompt-ids", dest="prompts", action="append", type=_parse_ids)
    g.add_argument("--max-new-tokens", type=_count, required=True)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ids", action="store_true", help="print generated token ids instead of text")
    g.add_argument("--tokenizer", default="", metavar="DIR",
                   help="the model's directory: a single prompt's text is decoded here and printed as it streams")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable); not included in the text")
    g.add_argument("--timeout", type=float, default=None)
    g.set_defaults(fn=_generate)

    d = sub.add_parser("demo", help="random small OPT: convert to INT4, serve, generate, report tokens/s")
    d.add_argument("--device", default="cpu")
    d.add_argument("--kv-local", action="store_true", help="KV cache on the compute device (no KV store)")
    d.set_defaults(fn=lambda a: __import__("deploy.demo", fromlist=["run"]).run(a))

    from deploy.bench_cli import add_bench_parser  # noqa: PLC0415

    add_bench_parser(sub)
    from deploy.batch import add_batch_parser

    add_batch_parser(sub)
    from deploy.plan_cli import add_plan_parser
    add_plan_parser(sub)
    return p


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--listen", default="127.0.0.1:50551", help="host:port or unix:///path (port 0 = any free port)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--kv-offload", action="store_true", help="KV cache in the KV store, attention on its CPU")
    s.add_argument("--kv-capacity-gb", type=float, default=2.0, help="host memory for the KV cache, faulted in at start")
    s.add_argument("--kv-bits", type=kv_bits_arg, default=16,
                   help=KV_BITS_HELP + " (GPU or KV store); auto is 16 where the placement is pinned")
    s.add_argument("--gpu-weight-share", type=float, default=None,
                   help="share of layers resident on the device (default 1; on a GPU with no placement flag "
                        "the planner chooses the placement for --plan-prompt-len/--plan-gen-len/--plan-batch)")
    s.add_argument("--disk-offload", action="store_true",
                   help="streamed layers stay on disk, read through staging slots every pass")
    s.add_argument("--host-budget-gb", type=float, default=0.0,
                   help="host memory for the weights' host tier (0 = no limit); layers beyond it stay on disk")
    s.add_argument("--micro-batches", type=int, default=None, help="micro-batches per loaded layer (default 1)")
    s.add_argument("--plan-prompt-len", type=int, default=512, help="workload the planner plans for")
    s.add_argument("--plan-gen-len", type=int, default=32)
    s.add_argument("--plan-batch", type=int, default=None, help="default: the batch the planner finds best")
    s.add_argument("--profile", help="hardware profile for the planner (default: this machine's)")
    s.add_argument("--dtype", default="", choices=["", "float16", "bfloat16", "float32"])
    s.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline of every call between services")
    s.add_argument("--transport", choices=["shm", "bytes"], default="shm",
                   help="weights over shared memory, or as bytes (a store on another host)")
    s.add_argument("--no-decode-graphs", action="store_true", help="decode eagerly (no CUDA graph replay)")
    logs.add_arguments(s)  # passed on to the three services


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except StrataError as e:
        print(f"strata {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`strata` command line: convert, serve, generate, demo, bench."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading

from deploy.plan_cli import KV_BITS_HELP, kv_bits_arg
from strata.runtime import logs
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import rpc


def _convert(a) -> int:
    from tools.convert import convert

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
    if not os.path.isfile(os.path.join(a.dst, "tokenizer.json")):
        print(f"strata convert: warning: {a.src} has no tokenizer.json, so the converted model takes and gives "
              "token ids only (strata generate --prompt-ids ... --ids)", file=sys.stderr)
    return 0


def serve_options(a):
    """The services' options from the flags, with the run plan resolved once: pinned by
    the placement flags, or on a GPU with none, the planner's (deploy/serve_plan.py)."""
    from deploy import serve_plan
    from deploy.launcher import ServeOptions

    plan, kv_bytes = serve_plan.serve_plan(a)
    return ServeOptions(
        model_dir=a.model, plan=plan, listen=a.listen, device=a.device,
        kv_capacity_bytes=max(kv_bytes, int(a.kv_capacity_gb * (1 << 30))),
        max_request_bytes=a.max_request_bytes, max_prompt_tokens=a.max_prompt_tokens,
        max_prompt_chars=a.max_prompt_chars, prefill_chunk_tokens=a.prefill_chunk_tokens, api_key=a.api_key, tls_cert=a.tls_cert, tls_key=a.tls_key,
        health_timeout_s=a.health_timeout, rpc_timeout_s=a.rpc_timeout, transport=a.transport,
        http=a.http, log_level=a.log_level, log_json=a.log_json,
    )


def _check_serve_flags(a) -> int:
    """Flags refused before anything starts: returns an exit code (0 = fine)."""
    if not rpc.is_loopback(a.listen) and not a.api_key and not a.insecure:
        print(f"strata serve: --listen {a.listen} can be reached from other hosts: give --api-key (or "
              f"${rpc.API_KEY_ENV}), or --insecure to serve anyone who can connect", file=sys.stderr)
        return 2
    if a.http and not rpc.is_loopback(a.http) and not a.api_key and not a.insecure:
        print(f"strata serve: --http {a.http} can be reached from other hosts: give --api-key (or "
              f"${rpc.API_KEY_ENV}), or --insecure to serve anyone who can connect", file=sys.stderr)
        return 2
    if bool(a.tls_cert) != bool(a.tls_key):
        print("strata serve: TLS needs both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"strata serve: --device {a.device}, but no CUDA device was found (torch {torch.__version__}); "
                  "use --device cpu", file=sys.stderr)
            return 1
    return 0


def _serve(a) -> int:
    from deploy.launcher import Services

    code = _check_serve_flags(a)
    if code:
        return code
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
        print(f"HTTP API on {'https' if a.tls_cert else 'http'}://{services.http_address}", flush=True)
    while not stop.wait(0.5):
        dead = services.dead()
        if dead:
            print(f"strata serve: {', '.join(dead)} exited; stopping", file=sys.stderr)
            services.stop()
            return 1
        hung = services.unresponsive()
        if hung:
            print(f"strata serve: {', '.join(hung)} answered no health check for {a.health_timeout:g} s; stopping",
                  file=sys.stderr)
            services.stop()
            return 1
    services.stop()
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    big = next((t for t in ids if not -(1 << 63) <= t < 1 << 63), None)
    if big is not None:
        raise argparse.ArgumentTypeError(f"token id {big} is not a 64-bit integer")
    return ids


def _whole(limit: int):
    """An argument type: a whole number in [0, limit)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = -1
        if not 0 <= n < limit:
            raise argparse.ArgumentTypeError(f"takes a whole number from 0 to {limit - 1}, got {text!r}")
        return n

    return parse


_count = _whole(1 << 32)


def _number(low: float, high: float = math.inf):
    """An argument type: a finite number in [low, high]."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and low <= x <= high):
            span = f"from {low:g} to {high:g}" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"takes a finite number {span}, got {text!r}")
        return x

    return parse


def _text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8: {text.encode('utf-8', 'surrogateescape')!r}") from None
    return text


def _generate(a) -> int:
    from deploy.client import generate, has_tokenizer, request_for

    prompts = a.prompts or []
    if not prompts:
        print("strata generate: give at least one --prompt or --prompt-ids", file=sys.stderr)
        return 2
    req = request_for(prompts, a.max_new_tokens, greedy=a.greedy or a.temperature == 0, temperature=a.temperature,
                      top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_at_eos=not a.ignore_eos, stop=a.stop)
    timeout = a.timeout or None
    try:
        if len(prompts) == 1 and not a.ids:  # one text, printed as it streams
            return _stream_text(a, prompts[0])
        result = generate(a.endpoint, req, timeout=timeout, api_key=a.api_key, tls_ca=a.tls_ca)
        if not a.ids and any(result.tokens) and not any(result.texts) and not has_tokenizer(
                a.endpoint, timeout, a.api_key, a.tls_ca):  # asked only where no text came back
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "the model has no tokenizer.json, so it cannot give "
                              "text: add --ids to print the generated token ids")
    except StrataError as e:
        print(f"strata generate: {e}", file=sys.stderr)
        return 1
    for toks, text in zip(result.tokens, result.texts):
        print(" ".join(str(t) for t in toks) if a.ids else text.replace("\n", " "))
    return 0



def _stream_text(a, prompt) -> int:
    """One prompt's text, printed as it streams: the server's text deltas, or decoded here
    with the model's tokenizer (--tokenizer)."""
    from strata.api.client import Client, Retry

    sampling = dict(greedy=a.greedy or a.temperature == 0, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    seed=a.seed, stop_at_eos=not a.ignore_eos, stop=a.stop)
    result = None
    with Client(a.endpoint, timeout=a.timeout or None, api_key=getattr(a, "api_key", None) or None,
                tls_ca=getattr(a, "tls_ca", None) or None, retry=Retry(attempts=1), tokenizer=a.tokenizer or None) as c:
        for d in c.stream([prompt], a.max_new_tokens, **sampling):
            print(d.texts[0].replace("\n", " "), end="", flush=True)
            result = d.result
    if result is not None and any(result.tokens) and not any(result.texts):
        from deploy.client import has_tokenizer

        if not has_tokenizer(a.endpoint, a.timeout or None, a.api_key, a.tls_ca):
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "the model has no tokenizer.json, so it cannot give "
                              "text: add --ids to print the generated token ids")
    print()
    return 0

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata", description="Strata: big models on one GPU, fast.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint -> pre-quantized layer shards")
    c.add_argument("src", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)")
    c.add_argument("dst", help="output directory (must not exist; appears only when complete)")
    c.add_argument("--quant-bits", type=int, default=4, choices=[4, 8, 16],
                   help="bits per weight of the layer linears (16 = not quantized; default 4)")
    c.add_argument("--group-size", type=int, default=64, help="weights per quantization group (default 64)")
    c.add_argument("--ds-config", help="DeepSpeed config JSON with a weight_quantization section")
    c.set_defaults(fn=_convert)

    s = sub.add_parser("serve", help="start weight store, KV store and compute node")
    s.add_argument("model", help="converted model directory")
    add_serve_flags(s)
    s.add_argument("--http", metavar="HOST:PORT", default="",
                   help="also serve the OpenAI-compatible HTTP API and /metrics there (a fourth process, gateway/)")
    s.set_defaults(fn=_serve)

    g = sub.add_parser("generate", help="generate from a running server")
    g.add_argument("--endpoint", required=True, help="the compute node's address: host:port (as serve prints it)")
    g.add_argument("--prompt", dest="prompts", action="append", type=_text, help="a text prompt (repeatable)")
    g.add_argument("--prompt-ids", dest="prompts", action="append", type=_parse_ids,
                   help="a prompt as comma-separated token ids (repeatable)")
    g.add_argument("--max-new-tokens", type=_count, required=True, help="tokens to generate per prompt, at most")
    g.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    g.add_argument("--temperature", type=_number(0.0), default=1.0,
                   help="sampling temperature, a number >= 0 (0 = greedy; default 1)")
    g.add_argument("--top-k", type=_count, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=_number(0.0, 1.0), default=1.0,
                   help="sample among the most likely tokens whose probabilities sum to p, 0 to 1 (0 or 1 = all)")
    g.add_argument("--seed", type=_whole(1 << 64), default=0, help="sampling seed, 0 to 2^64-1")
    g.add_argument("--ids", action="store_true", help="print generated token ids instead of text")
    g.add_argument("--tokenizer", default="", metavar="DIR",
                   help="the model's directory: a single prompt's text is decoded here and printed as it streams")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--stop", action="append", default=[], type=_text,
                   help="stop sequence (repeatable); not included in the text")
    g.add_argument("--timeout", type=_number(0.0), default=600.0,
                   help="seconds the whole call may take (default 600; 0 = no limit)")
    g.add_argument("--api-key", default=os.environ.get(rpc.API_KEY_ENV, ""),
                   help=f"sent as 'authorization: Bearer KEY' (default ${rpc.API_KEY_ENV})")
    g.add_argument("--tls-ca", default="", help="PEM root certificate file: connect over TLS, trusting it")
    g.set_defaults(fn=_generate)

    d = sub.add_parser("demo", help="random small OPT: convert to INT4, serve, generate, report tokens/s")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    d.add_argument("--kv-local", action="store_true", help="KV cache on the compute device (no KV store)")
    d.set_defaults(fn=lambda a: __import__("deploy.demo", fromlist=["run"]).run(a))

    from deploy.bench_cli import add_bench_parser  # noqa: PLC0415

    add_bench_parser(sub)
    from deploy.batch import add_batch_parser

    add_batch_parser(sub)
    from deploy.plan_cli import add_plan_parser
    from deploy.profile_cli import add_profile_parser

    add_plan_parser(sub)
    add_profile_parser(sub)
    return p


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--listen", default="127.0.0.1:50551", help="host:port or unix:///path (port 0 = any free port)")
    s.add_argument("--device", default="cpu",
                   help="compute device: cpu, cuda[:N], or mock-cuda (CPU tensors through the CUDA paths' logic, "
                        "for tests) (default cpu)")
    s.add_argument("--kv-offload", action="store_true", help="KV cache in the KV store, attention on its CPU")
    s.add_argument("--kv-capacity-gb", type=float, default=2.0, help="host memory for the KV cache in GiB, faulted in at start (default 2)")
    s.add_argument("--kv-bits", type=kv_bits_arg, default=16,
                   help=KV_BITS_HELP + " (GPU or KV store); auto is 16 where the placement is pinned")
    s.add_argument("--gpu-weight-share", type=float, default=None,
                   help="share of layers resident on the device, 0 to 1 (default 1; on a GPU with no placement flag "
                        "the planner chooses the placement for --plan-prompt-len/--plan-gen-len/--plan-batch)")
    s.add_argument("--disk-offload", action="store_true",
                   help="streamed layers stay on disk, read through staging slots every pass")
    s.add_argument("--host-budget-gb", type=float, default=0.0,
                   help="host memory for the weights' host tier in GiB (0 = no limit); layers beyond it stay on disk")
    s.add_argument("--micro-batches", type=int, default=None, help="micro-batches per loaded layer (default 1)")
    s.add_argument("--plan-prompt-len", type=int, default=512, help="prompt tokens per sequence the planner plans for")
    s.add_argument("--plan-gen-len", type=int, default=32, help="tokens generated per prompt, planned for")
    s.add_argument("--plan-batch", type=int, default=None, help="sequences per batch the planner plans for (default: the batch it finds best)")
    s.add_argument("--profile", help="hardware profile JSON file for the planner (default: this machine's)")
    s.add_argument("--dtype", default="", choices=["", "float16", "bfloat16", "float32"],
                   help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    s.add_argument("--rpc-timeout", type=float, default=30.0,
                   help="deadline of every call between services, in seconds (default 30)")
    s.add_argument("--transport", choices=["shm", "bytes"], default="shm",
                   help="weights over shared memory, or as bytes (a store on another host)")
    s.add_argument("--no-decode-graphs", action="store_true", help="decode eagerly (no CUDA graph replay)")
    from compute_node.validation import add_request_limit_flags

    add_request_limit_flags(s)
    s.add_argument("--insecure", action="store_true",
                   help="allow a --listen address other hosts can reach without an --api-key")
    s.add_argument("--tls-cert", default="", help="PEM certificate file: serve over TLS (with --tls-key)")
    s.add_argument("--tls-key", default="", help="PEM private key file of --tls-cert")
    s.add_argument("--health-timeout", type=float, default=60.0,
                   help="seconds a service may answer no health check before serve stops all (0 = only exits)")
    s.add_argument("--max-batch", type=int, default=None,
                   help="sequences run at once, from any number of calls (default: the planned batch, or 16)")
    s.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens (prompt + generated) a sequence may hold (default: the planned prompt + generation "
                        "lengths, or 2048 capped by the model's positions)")
    s.add_argument("--prefill-chunk-tokens", type=int, default=0,
                   help="prompt tokens through a layer at once (0 = a micro-batch's slots x max-seq-len); with the "
                        "KV cache on the device a longer prompt goes in a chunk a pass while the others decode")
    s.add_argument("--prefill-tokens-per-pass", type=int, default=0,
                   help="prompt tokens a pass prefills, at most: the other admitted prompts wait for the next "
                        "passes, which also decode the first ones, so a large request's prefill overlaps its "
                        "decode (0 = every admitted prompt at once)")
    s.add_argument("--max-queue", type=int, default=0,
                   help="sequences waiting for a slot before calls get RESOURCE_EXHAUSTED (0 = max(64, 8 x batch))")
    logs.add_arguments(s)  # passed on to the three services


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except StrataError as e:
        print(f"strata {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # exit 2, as for the other usage-level endings (issue 18)
        print(f"strata {args.command}: interrupted", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`strata bench --clients N`: N concurrent clients, one prompt each, against the served
endpoint (the compute node's scheduler batches them), beside the single-call figure of
the same placement.

Lengths are fixed (`--prompt-len`, `--gen-len`), drawn (`--prompt-len-dist
uniform:32:1024`, `--gen-len-dist uniform:16:256`) or read from a JSONL file of prompts
(`--prompts-jsonl`, one `{"prompt": [ids] | "text", "max_tokens": n}` per line). The
fixed lengths size the server's sequence slots: drawn lengths must fit within them.

Reported: generated tokens/s over the whole run (first call sent to last call done),
time to first token and time per output token (p50, p99, as each client saw them),
and the mean batch occupancy over the run's passes (the compute node's Stats)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time

import grpc

from deploy.client import OPTIONS, request_for
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.wire import generate_pb2, generate_pb2_grpc

CHANNELS = 8  # client connections the calls are spread over


@dataclasses.dataclass(frozen=True)
class ClientLoad:
    clients: int
    prompt_len: str  # "512", or "uniform:A:B"
    gen_len: str
    prompts_jsonl: str = ""
    seed: int = 0


def draw(spec: str, rng: random.Random) -> int:
    """A length from a spec: an integer, or uniform:A:B (inclusive)."""
    if spec.startswith("uniform:"):
        _, lo, hi = spec.split(":")
        return rng.randint(int(lo), int(hi))
    return int(spec)


def largest(spec: str) -> int:
    return int(spec.split(":")[-1])


def workload(load: ClientLoad, vocab: int) -> list[tuple[list[int] | str, int]]:
    """(prompt, max new tokens) per client."""
    rng = random.Random(load.seed)
    if load.prompts_jsonl:
        out = []
        with open(load.prompts_jsonl) as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    out.append((d["prompt"], int(d.get("max_tokens") or draw(load.gen_len, rng))))
        return [out[i % len(out)] for i in range(load.clients)]
    return [([rng.randrange(4, vocab) for _ in range(draw(load.prompt_len, rng))], draw(load.gen_len, rng))
            for _ in range(load.clients)]


async def _one(stub, prompt, new: int, timeout: float) -> tuple[float, float, float, int]:
    """(start, first token, end, tokens) of one call, times from time.perf_counter()."""
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    call = stub.Generate(request_for([prompt], new, stop_at_eos=False), timeout=timeout)
    async for resp in call:
        if resp.done:
            break
        if resp.tokens and resp.tokens[0] >= 0:
            tokens += 1
            if not first:
                first = time.perf_counter()
    return t0, first, time.perf_counter(), tokens


async def _all(address: str, work, timeout: float):
    channels = [grpc.aio.insecure_channel(address, options=OPTIONS) for _ in range(CHANNELS)]
    try:
        stubs = [generate_pb2_grpc.GeneratorStub(c) for c in channels]
        calls = [_one(stubs[i % CHANNELS], p, n, timeout) for i, (p, n) in enumerate(work)]
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for c in channels:
            await c.close()


def _stats(address: str) -> dict[str, float]:
    with grpc.insecure_channel(address) as ch:
        return dict(generate_pb2_grpc.GeneratorStub(ch).Stats(generate_pb2.StatsRequest(), timeout=10).values)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(address: str, load: ClientLoad, vocab: int, timeout: float = 3600) -> dict:
    work = workload(load, vocab)
    before = _stats(address)
    t0 = time.perf_counter()
    results = asyncio.run(_all(address, work, timeout))
    wall = time.perf_counter() - t0
    after = _stats(address)
    failed = [r for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    if not done:
        raise StrataError(ErrorKind.INTERNAL, f"every client call failed: {failed[0]!r}")
    tokens = sum(r[3] for r in done)
    ttft = [r[1] - r[0] for r in done if r[1]]
    tpot = [(r[2] - r[1]) / (r[3] - 1) for r in done if r[3] > 1]
    steps = after["steps_total"] - before["steps_total"]
    occupancy = ((after["batch_occupancy"] * after["steps_total"] - before["batch_occupancy"] * before["steps_total"])
                 / steps if steps else 0.0)
    return {
        "clients": load.clients,
        "prompt_len_dist": load.prompt_len,
        "gen_len_dist": load.gen_len,
        "prompts_jsonl": load.prompts_jsonl or None,
        "failed_calls": len(failed),
        "first_failure": repr(failed[0])[:300] if failed else None,
        "generated_tokens": tokens,
        "prompt_tokens": sum(len(p) if isinstance(p, list) else 0 for p, _ in work),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(_pct(ttft, 0.5), 4),
        "ttft_p99_s": round(_pct(ttft, 0.99), 4),
        "tpot_p50_s": round(_pct(tpot, 0.5), 5),
        "tpot_p99_s": round(_pct(tpot, 0.99), 5),
        "ttft_mean_s": round(statistics.fmean(ttft), 4) if ttft else 0.0,
        "passes": int(steps),
        "mean_batch_occupancy": round(occupancy, 4),
    }

"""`strata bench --batch-requests N`: an offline job through the real `strata batch`.

After the timed single call, N OpenAI batch lines (/v1/completions, token-id prompts of
--prompt-len, `max_tokens` --gen-len, greedy, `ignore_eos` so every request makes its
full length as the single call does) are written to a file and `strata batch` runs on
them as its own process against the served endpoint, exactly as a user runs it. The
figure is completion tokens over the job's wall time, process start included, beside
the single call's tokens/s at the same placement."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys
import tempfile
import time

from strata.runtime.errors import ErrorKind, StrataError


def write_input(path: pathlib.Path, n: int, prompt_len: int, gen_len: int, vocab: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": "bench", "prompt": [rng.randrange(4, vocab) for _ in range(prompt_len)],
                    "max_tokens": gen_len, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")


def read_output(path: pathlib.Path) -> tuple[int, int, int]:
    """(answered lines, lines with an error, completion tokens) of a batch output file."""
    answered = errors = tokens = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        answered += 1
        response = r.get("response") or {}
        if r.get("error") or response.get("status_code") != 200:
            errors += 1
            continue
        tokens += int(response["body"]["usage"]["completion_tokens"])
    return answered, errors, tokens


def run(address: str, n: int, prompt_len: int, gen_len: int, vocab: int, timeout: float = 3600) -> dict:
    with tempfile.TemporaryDirectory(prefix="strata-bench-batch-") as tmp:
        src, out = pathlib.Path(tmp, "in.jsonl"), pathlib.Path(tmp, "out.jsonl")
        write_input(src, n, prompt_len, gen_len, vocab)
        cmd = [sys.executable, "-m", "deploy.cli", "batch", str(src), str(out), "--endpoint", address, "--no-progress"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise StrataError(ErrorKind.INTERNAL, f"strata batch exited {proc.returncode}: {proc.stderr[-400:]}")
        answered, errors, tokens = read_output(out)
    return {
        "requests": n,
        "answered": answered,
        "errors": errors,
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "summary": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "",
    }

"""`strata batch`: an OpenAI batch file through a served tiny model. Killed with
SIGKILL midway (and its last line torn) then run again, the output has every
custom_id exactly once and equals a clean run's (greedy); bad lines are answered in
the output and never stop the job."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import tiny_models
from serving import Server

pytestmark = pytest.mark.slow
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
ROOT = pathlib.Path(__file__).resolve().parents[2]
WORDS = ["hello world", "the quick brown fox", "a stack of memory", "weights are stored", "attention over"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tools.convert import convert

    hf = tmp_path_factory.mktemp("batch") / "hf"
    tiny_models.make_opt(hf)
    cfg = hf / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "chat_template": TEMPLATE}))
    shards = hf.parent / "shards"
    convert(hf, shards, bits=16)
    server = Server(shards)
    yield server.address, shards
    assert server.stop() == 0


def batch_input(path, n=40):
    lines = []
    for i in range(n):
        if i % 10 == 3:
            body = {"model": "m", "messages": [{"role": "user", "content": WORDS[i % 5]}], "max_tokens": 12,
                    "temperature": 0}
            lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        else:
            body = {"model": "m", "prompt": f"{WORDS[i % 5]} {i}", "max_tokens": 12, "temperature": 0}
            lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body})
    text = "\n".join(json.dumps(x) for x in lines)
    text += '\n{"custom_id": "broken", "body": \n'  # not JSON
    text += json.dumps({"custom_id": "two", "method": "POST", "url": "/v1/completions",
                        "body": {"model": "m", "prompt": "x", "n": 2}}) + "\n"
    text += json.dumps({"custom_id": "r0", "url": "/v1/completions", "body": {"model": "m", "prompt": "dup"}}) + "\n"
    path.write_text(text)
    return n


def batch(src, dst, endpoint, model):
    return [sys.executable, "-m", "deploy.cli", "batch", str(src), str(dst), "--endpoint", endpoint, "--model",
            str(model), "--concurrency", "4", "--no-progress"]


def outputs(path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {}
    for r in rows:
        key = r["custom_id"] or f"line {r['error']['line']}"
        assert key not in by_id, f"{key} written twice"
        body = r["response"]["body"] if r["response"] else r["error"]
        by_id[key] = (r["response"] and r["response"]["status_code"],
                      [c.get("text", c.get("message")) for c in body.get("choices", [])], body.get("usage"))
    return by_id


def test_killed_midway_and_resumed_equals_a_clean_run(served, tmp_path):
    endpoint, shards = served
    src = tmp_path / "in.jsonl"
    n = batch_input(src)

    clean = tmp_path / "clean.jsonl"
    done = subprocess.run(batch(src, clean, endpoint, shards), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = outputs(clean)
    assert len(expected) == n + 3
    assert all(expected[f"r{i}"][0] == 200 and expected[f"r{i}"][1] for i in range(n))
    assert expected["two"][0] == 400
    assert {k for k in expected if k.startswith("line ")} == {f"line {n + 1}", f"line {n + 3}"}  # not JSON, dup

    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(batch(src, out, endpoint, shards), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 5 <= written < n, f"not killed midway ({written} of {n + 3} lines written)"
    with out.open("a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "r')  # a line cut by the kill

    again = subprocess.run(batch(src, out, endpoint, shards), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert outputs(out) == expected

    once_more = subprocess.run(batch(src, out, endpoint, shards), cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
    assert once_more.returncode == 0 and outputs(out) == expected  # nothing left to do, nothing written twice

"""`strata serve --log-level/--log-json` reaches all three services."""

import json
import re
import signal
import subprocess
import sys

import tiny_models
from serving import ROOT, device_flags, strata

# gRPC's C core writes its own lines (absl format) straight to stderr, past Python's logging
NATIVE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")


def json_records(stderr: str) -> list[dict]:
    records = []
    for line in stderr.splitlines():
        if NATIVE.match(line):
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return records


def test_serve_passes_log_flags_to_the_three_services(tmp_path_factory):
    _, shards = tiny_models.converted("opt", tmp_path_factory)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", str(shards), "--listen", "127.0.0.1:0", "--kv-offload",
         "--log-json", "--log-level", "debug", *device_flags()],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            proc.kill()
            raise AssertionError(f"serve did not start: {line!r} {proc.communicate()[1][-3000:]}")
        address = line.split("listening on ", 1)[1].strip()
        done = strata("generate", "--endpoint", address, "--max-new-tokens", "2", "--greedy", "--ids",
                      "--prompt-ids", "5,17,33")
        assert done.returncode == 0, done.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    records = json_records(err)  # every line on stderr is one JSON object
    assert {r["service"] for r in records} == {"weight_store", "kv_store", "compute_node"}
    assert any(r["level"] == "debug" for r in records)  # the level reached them too

"""`strata serve --log-level/--log-json` reaches all three services."""

import json
import signal
import subprocess
import sys

import tiny_models
from serving import ROOT, device_flags, strata


def test_serve_passes_log_flags_to_the_three_services(tmp_path_factory):
    _, shards = tiny_models.converted("opt", tmp_path_factory)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", str(shards), "--listen", "127.0.0.1:0", "--kv-offload",
         "--log-json", "--log-level", "debug", *device_flags()],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
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
    records = [json.loads(line) for line in err.splitlines()]  # every line on stderr is one JSON object
    assert {r["service"] for r in records} == {"weight_store", "kv_store", "compute_node"}
    assert any(r["level"] == "debug" for r in records)  # the level reached them too
    assert any(r["service"] == "compute_node" and r["message"].startswith("generate:") for r in records)

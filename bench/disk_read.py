"""Sustained shard reads of the weight store's disk tier against `dd iflag=direct` on
the same files, in one run (issue 6's bar: >= 90% of dd).

    python3 bench/disk_read.py DIR [--rounds 2] [--no-verify]

DIR is a converted model directory (e.g. the dummy shards `strata bench --dummy
--disk-offload` writes). dd reads every layer file once (bs=4M, O_DIRECT), then a
weight store started with --disk-offload reads every layer through StageShard the
way the compute node does (all staging slots in flight, cycling), then dd again.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.model.manifest import Manifest  # noqa: E402
from strata.transport import shm  # noqa: E402
from strata.transport.wire import common_pb2, weight_store_pb2, weight_store_pb2_grpc  # noqa: E402


def dd_read(files: list[pathlib.Path]) -> float:
    """bytes/s of dd reading every file in turn with O_DIRECT."""
    total, t0 = 0, time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct"], check=True, capture_output=True)
        total += f.stat().st_size
    return total / (time.perf_counter() - t0)


def start_store(model: pathlib.Path, verify: bool) -> tuple[subprocess.Popen, str, str]:
    session = "diskbench" + shm.new_session_id()
    sock = f"unix://{tempfile.mkdtemp(prefix='ws-')}/ws.sock"
    cmd = [sys.executable, "-m", "weight_store", "--model", str(model), "--listen", sock, "--session", session,
           "--disk-offload"] + ([] if verify else ["--no-verify"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    with grpc.insecure_channel(sock) as ch:
        stub = weight_store_pb2_grpc.WeightStoreStub(ch)
        for _ in range(600):  # up to a minute, whether the store is not up yet or still loading
            try:
                if stub.Health(common_pb2.HealthRequest(), timeout=1).ready:
                    return proc, sock, session
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stderr.read())


def store_read(sock: str, layers: list[str], rounds: int) -> dict:
    """Every layer staged `rounds` times, all slots busy, as the compute node does."""
    with grpc.insecure_channel(sock) as ch:
        stub = weight_store_pb2_grpc.WeightStoreStub(ch)
        staging = stub.LocateShards(weight_store_pb2.LocateShardsRequest(), timeout=30).staging
        order = layers * rounds
        inflight, total, read_s = [], 0, 0.0
        t0 = time.perf_counter()
        for i, name in enumerate(order):
            if len(inflight) == staging.slots:
                r = inflight.pop(0).result()
                total, read_s = total + r.location.byte_size, read_s + r.read_s
            req = weight_store_pb2.StageShardRequest(shard=name, slot=i % staging.slots)
            inflight.append(stub.StageShard.future(req, timeout=120))
        for f in inflight:
            r = f.result()
            total, read_s = total + r.location.byte_size, read_s + r.read_s
        wall = time.perf_counter() - t0
    return {"bytes": total, "wall_s": wall, "bytes_per_s": total / wall, "slots": staging.slots}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-verify", action="store_true")
    a = p.parse_args()
    model = pathlib.Path(a.model)
    m = Manifest.load(model)
    layers = [f"layer.{i}" for i in range(m.num_layers)]
    files = [model / m.shards[n].file for n in layers]
    dd1 = dd_read(files)
    proc, sock, session = start_store(model, not a.no_verify)
    try:
        store = store_read(sock, layers, a.rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shm.sweep(session)
    dd2 = dd_read(files)
    dd = (dd1 + dd2) / 2
    print(json.dumps({
        "bench": "disk_read", "model": str(model), "layer_bytes": sum(f.stat().st_size for f in files),
        "dd_direct_bytes_per_s": [round(dd1), round(dd2)], "store": store, "verify": not a.no_verify,
        "store_over_dd": round(store["bytes_per_s"] / dd, 3), "reader": "weight store --disk-offload (StageShard)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()

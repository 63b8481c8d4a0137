"""Control-plane cost of one decode attention through the KV store, apart from the
attention itself (issue 3: under 5% of a decode step).

    python3 bench/rpc_overhead.py [--calls 500] [--step-s S --calls-per-step N]

Starts a real KV store process and drives it through the compute node's own client
path (`RemoteSlots`: staging q/k/v in the exchange region, the Attend RPC, the reply),
on a cache so small that the attention is negligible: one sequence, one head of 64,
one cached token and the new one. The mean time per call is the per-call control
overhead (gRPC, shared-memory staging, request handling, queueing on the store's
compute thread).
With --step-s and --calls-per-step (a measured decode step and its Attend calls,
layers x micro-batches) it also prints the overhead's share of that step.
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

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compute_node.exchange import Exchange  # noqa: E402
from compute_node.peers import KVStoreClient  # noqa: E402
from compute_node.slot_kv import Joining, RemoteSlots, SlotShape  # noqa: E402
from strata.transport import shm  # noqa: E402


def start_store(session: str) -> tuple[subprocess.Popen, str]:
    address = f"unix://{tempfile.mkdtemp(prefix='kv-')}/kv.sock"
    proc = subprocess.Popen([sys.executable, "-m", "kv_store", "--listen", address, "--session", session,
                             "--capacity-bytes", str(64 << 20)], cwd=ROOT)
    client = KVStoreClient(address, 30.0)
    for _ in range(300):
        try:
            if client.health().ready:
                return proc, address
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("KV store did not start")


def measure(calls: int, layers: int = 1) -> dict:
    session = "rpcbench" + shm.new_session_id()
    proc, address = start_store(session)
    client = KVStoreClient(address, 30.0)
    exchange = Exchange(client, session, 16 << 20)
    try:
        shape = SlotShape(layers, 1, 1, 64, slots=1, capacity=8, scale=0.125, alibi=False)
        kv = RemoteSlots(shape, torch.float32, torch.device("cpu"), client, exchange)
        q = torch.randn(1, 1, 1, 64)
        kv.prefill(0, Joining([0], [1]), q, q, q)
        view = kv.view([1], [])  # every call writes column 1 and attends over the two cached tokens
        for _ in range(5):  # warm up the channel and the store's thread
            kv.decode_finish(kv.decode_start(0, view, q, q, q))
        t0 = time.perf_counter()
        for _ in range(calls):
            kv.decode_finish(kv.decode_start(0, view, q, q, q))
        per_call = (time.perf_counter() - t0) / calls
        kv.free()
    finally:
        exchange.close()
        client.close()
        proc.terminate()
        proc.wait(timeout=30)
        shm.sweep(session)
    return {"per_call_s": per_call, "calls": calls}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--step-s", type=float, default=0.0, help="a measured decode step (seconds)")
    ap.add_argument("--calls-per-step", type=int, default=0, help="its Attend calls: layers x micro-batches")
    a = ap.parse_args()
    r = measure(a.calls)
    r.update(cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if a.step_s and a.calls_per_step:
        r.update(step_s=a.step_s, calls_per_step=a.calls_per_step,
                 overhead_share=a.calls_per_step * r["per_call_s"] / a.step_s)
    print(json.dumps(r))


if __name__ == "__main__":
    main()

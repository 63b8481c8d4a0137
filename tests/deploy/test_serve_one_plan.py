"""`strata serve` resolves one run plan, writes it into its run directory, and all three
services read that file (`--plan`); each then reports what it does, and they agree: the
weight store's device layers are the compute node's resident layers are the plan's."""

import json
import pathlib
import signal

import grpc
import pytest

import tiny_models
from serving import Server
from strata.api.client import Client
from strata.policy.run_plan import RunPlan
from strata.transport.wire import common_pb2, kv_store_pb2_grpc, weight_store_pb2_grpc

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250]]
NEW = 6


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    hf, out = tiny_models.converted("opt", tmp_path_factory)
    return out, tiny_models.greedy_reference(hf, PROMPTS, NEW)


def flag(cmdline: list[str], name: str) -> str:
    return cmdline[cmdline.index(name) + 1]


def health(address: str, stub_cls) -> str:
    with grpc.insecure_channel(address) as channel:
        return stub_cls(channel).Health(common_pb2.HealthRequest(), timeout=10).detail


def test_the_three_services_read_one_plan_and_report_the_same_resident_layers(converted):
    shards, expected = converted
    server = Server(shards, "--device", "cpu", "--kv-offload", "--gpu-weight-share", "0.5", "--micro-batches", "2",
                    "--max-batch", "4", "--max-seq-len", "64")
    try:
        procs = {m: server.child(f"-m {m}").cmdline() for m in ("weight_store", "kv_store", "compute_node")}
        paths = {flag(c, "--plan") for c in procs.values()}
        assert len(paths) == 1  # one file, read by all three
        plan = RunPlan.load(paths.pop())
        assert plan.kv_home == "kv_store" and plan.micro_batches == 2 and plan.max_batch == 4
        assert plan.max_seq_len == 64 and 0 < len(plan.resident_layers) < plan.num_layers
        for c in procs.values():  # the plan decides; no placement flag rides beside it
            assert not {"--gpu-share", "--gpu-weight-share", "--kv-bits", "--micro-batches", "--max-batch"} & set(c)

        detail = health(flag(procs["weight_store"], "--listen"), weight_store_pb2_grpc.WeightStoreStub)
        tiers = json.loads(detail.split("; layers ", 1)[1])
        assert tiers["device"] == list(plan.resident_layers)
        assert tiers["host"] == list(plan.streamed_layers) and tiers["disk"] == []
        kv = health(flag(procs["kv_store"], "--listen"), kv_store_pb2_grpc.KVStoreStub)
        assert "plan: KV at 16 bits" in kv

        with Client(server.address, timeout=60) as c:
            result = c.generate(PROMPTS, max_new_tokens=NEW, greedy=True)
            stats, _ = c.stats()
        assert result.tokens == expected  # streamed layers, resident ones read once from disk, KV in the KV store
        assert stats["plan_resident_layers"] == len(plan.resident_layers)
        assert sorted(int(k.split(":")[1]) for k in stats if k.startswith("resident_layer:")) == tiers["device"]
        assert stats["plan_micro_batches"] == 2 and stats["plan_kv_bits"] == 16 and stats["decode_graphs"] == 0
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert not pathlib.Path(flag(procs["compute_node"], "--plan")).parent.exists()  # the run directory is gone

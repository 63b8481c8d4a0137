"""The weight store's disk tier as a real process: which shards stay on disk under a
host budget or --disk-offload, StageShard reading a shard's file bytes into a
staging slot, and its errors by status code."""

import grpc
import pytest

from fake_shards import write_model
from strata.model.manifest import align
from strata.transport import shm
from strata.transport.wire import weight_store_pb2
from test_weight_store_server import Service


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("disk") / "model"
    return directory, write_model(directory, seed=2)


@pytest.fixture(scope="module")
def offloaded(model):
    svc = Service(model[0], "--disk-offload")
    svc.wait_ready()
    yield svc
    svc.stop()


def locate(svc):
    return svc.stub.LocateShards(weight_store_pb2.LocateShardsRequest(), timeout=10)


def stage(svc, shard, slot):
    return svc.stub.StageShard(weight_store_pb2.StageShardRequest(shard=shard, slot=slot), timeout=10)


def test_disk_offload_keeps_every_layer_on_disk_and_stages_its_file_bytes(offloaded, model):
    directory, manifest = model
    resp = locate(offloaded)
    on_disk = {loc.shard for loc in resp.locations if loc.on_disk}
    assert on_disk == {"layer.0", "layer.1"}
    assert resp.staging.slots == 3 and resp.staging.slot_bytes >= max(manifest.shards[n].size for n in on_disk)
    region = shm.Region.attach(resp.staging.region)
    try:
        for slot, name in [(0, "layer.1"), (2, "layer.0"), (0, "layer.0")]:
            got = stage(offloaded, name, slot)
            loc = got.location
            assert loc.region == resp.staging.region and loc.offset == slot * resp.staging.slot_bytes
            want = (directory / manifest.shards[name].file).read_bytes()
            assert region.bytes_view(loc.offset, loc.byte_size).numpy().tobytes() == want
            assert got.read_s > 0
    finally:
        region.close()


def test_stage_shard_errors_by_status_code(offloaded):
    cases = [
        (("layer.0", 3), grpc.StatusCode.INVALID_ARGUMENT, "slot 3"),
        (("embed", 0), grpc.StatusCode.FAILED_PRECONDITION, "host tier"),
        (("layer.9", 0), grpc.StatusCode.NOT_FOUND, "layer.9"),
    ]
    for (shard, slot), code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            stage(offloaded, shard, slot)
        assert e.value.code() == code and text in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        offloaded.stub.ReadShard(weight_store_pb2.ReadShardRequest(shard="layer.0"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_host_budget_caches_the_first_layers_and_leaves_the_rest_on_disk(model):
    directory, manifest = model
    sizes = {n: align(s.size) for n, s in manifest.shards.items()}
    slot = max(sizes["layer.0"], sizes["layer.1"])
    budget = sizes["embed"] + sizes["head"] + 3 * slot + sizes["layer.0"]  # room for one layer
    svc = Service(directory, "--host-budget-gb", repr(budget / 2**30))
    try:
        svc.wait_ready()
        resp = locate(svc)
        assert {loc.shard: loc.on_disk for loc in resp.locations} == {
            "embed": False, "head": False, "layer.0": False, "layer.1": True}
    finally:
        svc.stop()


def test_a_budget_below_embeddings_and_staging_is_refused_with_the_shortfall(model):
    directory, _ = model
    svc = Service(directory, "--host-budget-gb", repr(4096 / 2**30))
    code = svc.proc.wait(timeout=60)
    _, err = svc.stop()
    assert code == 1
    assert "host budget" in err and "short" in err


def tiers(svc) -> dict:
    """The layers' tiers the weight store reports at the end of its health detail."""
    import json

    from strata.transport.wire import common_pb2

    return json.loads(svc.stub.Health(common_pb2.HealthRequest(), timeout=10).detail.split("; layers ", 1)[1])


def test_a_run_plan_places_the_layers_and_the_store_reports_them(model, tmp_path):
    """--plan: the resident layer is read once from disk (never in the host tier), the
    plan's disk layer every pass; Health says so by index."""
    from strata.policy.run_plan import RunPlan

    directory, _ = model
    path = tmp_path / "plan.json"
    RunPlan(num_layers=2, resident_layers=(0,)).save(path)
    svc = Service(directory, "--plan", str(path))
    try:
        svc.wait_ready()
        assert {loc.shard: loc.on_disk for loc in locate(svc).locations} == {
            "embed": False, "head": False, "layer.0": True, "layer.1": False}
        assert tiers(svc) == {"device": [0], "host": [1], "disk": []}
    finally:
        svc.stop()
    RunPlan(num_layers=2, disk_layers=(1,)).save(path)
    svc = Service(directory, "--plan", str(path))
    try:
        svc.wait_ready()
        assert tiers(svc) == {"device": [], "host": [0], "disk": [1]}
    finally:
        svc.stop()


def test_a_plan_for_another_model_or_with_placement_flags_is_refused(model, tmp_path):
    from strata.policy.run_plan import RunPlan

    directory, _ = model
    path = tmp_path / "plan.json"
    RunPlan(num_layers=3).save(path)
    svc = Service(directory, "--plan", str(path))
    assert svc.proc.wait(timeout=60) == 1
    assert "run plan: num_layers the plan is for 3 layers, the model has 2" in svc.stop()[1]
    svc = Service(directory, "--plan", str(path), "--disk-offload")
    assert svc.proc.wait(timeout=60) == 2
    assert "--plan places the shards" in svc.stop()[1]

"""The weight store as a real process: manifest, shard locations in shared memory,
the bytes fallback, errors by status code, a clear refusal of a bad model directory
or a corrupt shard, and a clean stop on SIGTERM that leaves no region behind."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import pytest

from strata.model.manifest import Manifest
from strata.transport import shm
from strata.transport.wire import common_pb2, weight_store_pb2, weight_store_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[2]
from fake_shards import write_model


class Service:
    """`python -m weight_store` in a subprocess, with a stub on its unix socket."""

    def __init__(self, model_dir, *extra: str):
        self.session = "test" + shm.new_session_id()
        self.sock = os.path.join(tempfile.mkdtemp(prefix="ws-", dir="/tmp"), "ws.sock")
        self.address = f"unix://{self.sock}"
        model = ["--model", str(model_dir)] if model_dir else []
        cmd = [sys.executable, "-m", "weight_store", *model, "--listen", self.address,
               "--session", self.session, "--reader-threads", "2", *extra]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 1 << 30)])
        self.stub = weight_store_pb2_grpc.WeightStoreStub(self.channel)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"weight store exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if self.stub.Health(common_pb2.HealthRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError("weight store did not become ready")

    def regions(self) -> list[str]:
        return sorted(p.name for p in shm.SHM_DIR.glob(f"strata-{self.session}-*"))

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        finally:
            self.channel.close()
            shm.sweep(self.session)
        return self.proc.returncode, err


@pytest.fixture
def model(tmp_path):
    directory = tmp_path / "model"
    return directory, write_model(directory)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served") / "model"
    return directory, write_model(directory, seed=1)


@pytest.fixture(scope="module")
def service(served_model):
    """One process shared by the read-only tests."""
    svc = Service(served_model[0])
    svc.wait_ready()
    yield svc
    svc.stop()


def test_get_manifest_returns_the_manifest_json(service, served_model):
    got = service.stub.GetManifest(weight_store_pb2.GetManifestRequest(), timeout=10)
    assert Manifest.from_json(got.manifest_json) == served_model[1]
    assert json.loads(got.manifest_json)["format"] == "strata-shards/1"
    assert got.tokenizer_json == ""


def test_located_shards_in_the_region_equal_the_shard_files(service, served_model):
    directory, manifest = served_model
    resp = service.stub.LocateShards(weight_store_pb2.LocateShardsRequest(), timeout=10)
    assert [loc.shard for loc in resp.locations] == list(manifest.shards)
    region = shm.Region.attach(resp.locations[0].region)
    try:
        for loc in resp.locations:
            want = (directory / manifest.shards[loc.shard].file).read_bytes()
            assert loc.byte_size == len(want) and loc.offset % 4096 == 0
            assert region.bytes_view(loc.offset, loc.byte_size).numpy().tobytes() == want
    finally:
        region.close()


def test_locate_some_shards_in_the_order_asked(service):
    resp = service.stub.LocateShards(weight_store_pb2.LocateShardsRequest(shards=["head", "layer.0"]), timeout=10)
    assert [loc.shard for loc in resp.locations] == ["head", "layer.0"]


def test_read_shard_bytes_fallback_equals_the_file(service, served_model):
    directory, manifest = served_model
    for name, shard in manifest.shards.items():
        got = service.stub.ReadShard(weight_store_pb2.ReadShardRequest(shard=name), timeout=10)
        assert got.data == (directory / shard.file).read_bytes()


def test_unknown_shard_is_not_found(service):
    for call, request in [
        (service.stub.LocateShards, weight_store_pb2.LocateShardsRequest(shards=["layer.0", "layer.99"])),
        (service.stub.ReadShard, weight_store_pb2.ReadShardRequest(shard="layer.99")),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            call(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "layer.99" in e.value.details()


def test_sigterm_exits_zero_and_leaves_no_region(model):
    svc = Service(model[0])
    svc.wait_ready()
    assert len(svc.regions()) == 1
    svc.proc.send_signal(signal.SIGTERM)
    code = svc.proc.wait(timeout=30)
    leftover = svc.regions()
    _, err = svc.stop()
    assert code == 0, err
    assert leftover == []


def test_missing_model_directory_exits_2_with_a_clear_message(tmp_path):
    svc = Service(tmp_path / "nowhere")
    svc.proc.wait(timeout=30)
    code, err = svc.stop()
    assert code == 2
    assert "nowhere" in err and "does not exist" in err and "Traceback" not in err


def test_corrupt_shard_stops_the_process_at_start_naming_the_file(model):
    directory, manifest = model
    path = directory / manifest.shards["layer.1"].file
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    svc = Service(directory)
    svc.proc.wait(timeout=60)
    leftover = svc.regions()
    code, err = svc.stop()
    assert code not in (0, None)
    assert str(path) in err and "sha256 mismatch" in err and "Traceback" not in err
    assert leftover == []


def test_corrupt_shard_without_preload_is_data_loss_on_locate(model):
    directory, manifest = model
    path = directory / manifest.shards["layer.1"].file
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    svc = Service(directory, "--no-preload")
    try:
        svc.wait_ready()
        ok = svc.stub.LocateShards(weight_store_pb2.LocateShardsRequest(shards=["layer.0"]), timeout=10)
        assert ok.locations[0].shard == "layer.0"
        with pytest.raises(grpc.RpcError) as e:
            svc.stub.LocateShards(weight_store_pb2.LocateShardsRequest(shards=["layer.1"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS and str(path) in e.value.details()
    finally:
        code, err = svc.stop()
    assert code == 0, err


def test_serves_a_converted_tiny_opt(tiny_opt, tmp_path):
    convert = pytest.importorskip("tools.convert")
    out = tmp_path / "tiny-opt-int4"
    convert.convert(tiny_opt, out, bits=4, group_size=64)
    manifest = Manifest.load(out)
    svc = Service(out)
    try:
        svc.wait_ready()
        got = svc.stub.GetManifest(weight_store_pb2.GetManifestRequest(), timeout=10)
        assert Manifest.from_json(got.manifest_json) == manifest
        resp = svc.stub.LocateShards(weight_store_pb2.LocateShardsRequest(), timeout=10)
        region = shm.Region.attach(resp.locations[0].region)
        try:
            for loc in resp.locations:
                want = (out / manifest.shards[loc.shard].file).read_bytes()
                assert region.bytes_view(loc.offset, len(want)).numpy().tobytes() == want
        finally:
            region.close()
    finally:
        code, err = svc.stop()
    assert code == 0, err


def test_dummy_shape_is_served_without_files():
    svc = Service("", "--dummy", "facebook/opt-125m")
    try:
        svc.wait_ready(timeout=120)
        got = svc.stub.GetManifest(weight_store_pb2.GetManifestRequest(), timeout=10)
        manifest = Manifest.from_json(got.manifest_json)
        assert manifest.num_layers == 12
        loc = svc.stub.LocateShards(weight_store_pb2.LocateShardsRequest(shards=["layer.3"]), timeout=10).locations[0]
        assert loc.byte_size == manifest.shards["layer.3"].size
        region = shm.Region.attach(loc.region)
        try:
            assert region.bytes_view(loc.offset, loc.byte_size).numpy().any()
        finally:
            region.close()
    finally:
        code, err = svc.stop()
    assert code == 0, err


def test_unknown_dummy_shape_exits_2():
    svc = Service("", "--dummy", "no/such-model")
    svc.proc.wait(timeout=60)
    code, err = svc.stop()
    assert code == 2 and "no/such-model" in err and "Traceback" not in err

"""Faults on real files and processes: a truncated, corrupted or missing shard, an I/O
error reading one (a shard path that is a directory: EISDIR; a file without read
permission), each as a StrataError naming the shard file and the offset, and as a
gRPC status code through the weight store process; a disk that fills during
conversion (a file size limit on the converter process: EFBIG) leaves no output."""

import os
import pathlib
import resource
import signal
import subprocess
import sys

import grpc
import pytest

from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import shm
from strata.transport.wire import weight_store_pb2
from tools import convert as cv
from weight_store import diskspace
from weight_store.host_tier import HostTier
from weight_store.reader import PreadReader

from fake_shards import write_model
from test_weight_store_server import Service

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def model(tmp_path):
    directory = tmp_path / "model"
    return directory, write_model(directory)


@pytest.fixture
def reader():
    r = PreadReader(threads=2, chunk_bytes=8192)
    yield r
    r.close()


def make_unreadable(path: pathlib.Path) -> None:
    """Mode 000; skips the test where this process reads it anyway (root, CAP_DAC_OVERRIDE)."""
    path.chmod(0)
    try:
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        return
    pytest.skip("this process reads files whatever their mode (root)")


def read_error(reader, path, offset: int, length: int) -> StrataError:
    with pytest.raises(StrataError) as e:
        reader.read_into(str(path), bytearray(length), offset, length)
    return e.value


# ---------------------------------------------------------------- the reader


def test_truncated_shard_names_file_offset_and_end(tmp_path, reader):
    path = tmp_path / "layer_0002.bin"
    path.write_bytes(os.urandom(10000))
    err = read_error(reader, path, 8192, 4096)
    assert err.kind is ErrorKind.DATA_LOSS
    assert str(path) in err.message and "truncated" in err.message
    assert "offset 8192" in err.message and "ends at byte 10000" in err.message


def test_file_that_ends_during_the_read_names_the_offset(reader):
    """/dev/null: no size to check up front, so the read itself finds the end."""
    err = read_error(reader, "/dev/null", 12288, 4096)
    assert err.kind is ErrorKind.DATA_LOSS
    assert "/dev/null" in err.message and "offset 12288" in err.message and "truncated" in err.message


def test_missing_shard_names_file_and_offset(tmp_path, reader):
    path = tmp_path / "layer_0005.bin"
    err = read_error(reader, path, 4096, 100)
    assert err.kind is ErrorKind.DATA_LOSS
    assert str(path) in err.message and "missing" in err.message and "offset 4096" in err.message


def test_shard_that_is_a_directory_is_an_io_error_naming_file_offset_and_errno(tmp_path, reader):
    path = tmp_path / "layer_0001.bin"
    path.mkdir()
    err = read_error(reader, path, 4096, 8192)
    assert err.kind is ErrorKind.DATA_LOSS
    assert str(path) in err.message and "offset 4096" in err.message and "EISDIR" in err.message


def test_unreadable_shard_is_permission_denied(tmp_path, reader):
    path = tmp_path / "layer_0001.bin"
    path.write_bytes(bytes(8192))
    make_unreadable(path)
    err = read_error(reader, path, 0, 8192)
    assert err.kind is ErrorKind.PERMISSION_DENIED
    assert str(path) in err.message and "EACCES" in err.message


def corrupt(directory: pathlib.Path, manifest, shard: str) -> tuple[pathlib.Path, int]:
    """Flips a byte in the middle of the shard's first part; returns file and offset."""
    part = next(iter(manifest.shards[shard].tensors.values())).parts["data"]
    path = directory / manifest.shards[shard].file
    raw = bytearray(path.read_bytes())
    offset = part.offset + part.length // 2
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))
    return path, part.offset


def load_error(directory, manifest, shard: str) -> StrataError:
    session = "test" + shm.new_session_id()
    tier = HostTier(directory, manifest, session, PreadReader(threads=2, chunk_bytes=8192))
    try:
        with pytest.raises(StrataError) as e:
            tier.ensure_loaded(shard)
        return e.value
    finally:
        tier.close()
        shm.sweep(session)


def test_corrupted_shard_is_data_loss_naming_file_tensor_part_and_offset(model):
    directory, manifest = model
    path, part_offset = corrupt(directory, manifest, "layer.1")
    err = load_error(directory, manifest, "layer.1")
    assert err.kind is ErrorKind.DATA_LOSS
    assert str(path) in err.message and "layer.1.t0" in err.message and "part data" in err.message
    assert "sha256" in err.message and f"offset {part_offset}" in err.message


# ---------------------------------------------------------------- through the weight store process


def locate_error(svc: Service, shard: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        svc.stub.LocateShards(weight_store_pb2.LocateShardsRequest(shards=[shard]), timeout=30)
    return e.value


def test_damaged_shards_are_status_codes_naming_file_and_offset(model):
    """One process without preload: each damaged shard answers its own status; the
    intact ones still load."""
    directory, manifest = model
    files = {name: directory / s.file for name, s in manifest.shards.items()}
    os.truncate(files["layer.0"], 5000)
    corrupted, _ = corrupt(directory, manifest, "layer.1")
    files["embed"].unlink()
    files["head"].unlink()
    files["head"].mkdir()
    svc = Service(directory, "--no-preload")
    try:
        svc.wait_ready()
        truncated = locate_error(svc, "layer.0")
        assert truncated.code() == grpc.StatusCode.DATA_LOSS
        assert str(files["layer.0"]) in truncated.details() and "ends at byte 5000" in truncated.details()
        assert "offset 0" in truncated.details()
        bad = locate_error(svc, "layer.1")
        assert bad.code() == grpc.StatusCode.DATA_LOSS and str(corrupted) in bad.details()
        missing = locate_error(svc, "embed")
        assert missing.code() == grpc.StatusCode.DATA_LOSS
        assert str(files["embed"]) in missing.details() and "missing" in missing.details()
        eisdir = locate_error(svc, "head")
        assert eisdir.code() == grpc.StatusCode.DATA_LOSS
        assert str(files["head"]) in eisdir.details() and "EISDIR" in eisdir.details()
        assert "offset 0" in eisdir.details()
        with pytest.raises(grpc.RpcError) as e:
            svc.stub.ReadShard(weight_store_pb2.ReadShardRequest(shard="layer.0"), timeout=30)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS and str(files["layer.0"]) in e.value.details()
    finally:
        code, err = svc.stop()
    assert code == 0, err
    assert "Traceback" not in err


def test_unreadable_shard_is_permission_denied_through_the_service(model):
    directory, manifest = model
    path = directory / manifest.shards["layer.1"].file
    make_unreadable(path)
    svc = Service(directory, "--no-preload")
    try:
        svc.wait_ready()
        err = locate_error(svc, "layer.1")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and str(path) in err.details()
    finally:
        code, err = svc.stop()
    assert code == 0, err


# ---------------------------------------------------------------- a full disk during conversion


def limit_file_size(limit: int):
    """preexec_fn: files may not grow past `limit` bytes; a write past it fails with
    EFBIG (SIGXFSZ ignored) as a write to a full disk fails with ENOSPC."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def test_disk_full_during_conversion_leaves_no_output(tiny_opt, tmp_path):
    sizes = [s.size for s in cv.convert(tiny_opt, tmp_path / "reference", bits=16).shards.values()]
    limit = max(sizes) - 4096  # the biggest shard does not fit
    assert sizes[0] < limit  # the first one does: a whole file is written before the disk fills
    parent = tmp_path / "models"
    parent.mkdir()
    (parent / "other-model").mkdir()
    (parent / "other-model" / "manifest.json").write_text("{}")
    dst = parent / "opt-16"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "convert", str(tiny_opt), str(dst), "--quant-bits", "16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(limit),
    )
    assert out.returncode == 1, out.stderr
    assert "resource exhausted" in out.stderr and "disk full while writing" in out.stderr
    assert "EFBIG" in out.stderr and "Traceback" not in out.stderr
    assert not dst.exists()
    assert sorted(p.name for p in parent.iterdir()) == ["other-model"]  # no temporary directory left
    assert (parent / "other-model" / "manifest.json").read_text() == "{}"


def test_too_little_free_space_fails_before_writing(tiny_opt, tmp_path):
    parent = tmp_path / "models"
    asked = []

    def free_bytes(directory):
        asked.append(directory)
        return 100_000

    with pytest.raises(StrataError) as e:
        cv.convert(tiny_opt, parent / "out", bits=4, free_bytes=free_bytes)
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "100000 bytes" in e.value.message and "needs about" in e.value.message
    assert asked == [parent]
    assert not parent.exists()  # nothing written, not even the parent directory


def test_free_space_is_that_of_the_nearest_existing_directory(tmp_path):
    st = os.statvfs(tmp_path)
    free = diskspace.disk_free_bytes(tmp_path / "not" / "yet")
    assert abs(free - st.f_bavail * st.f_frsize) < 64 << 20  # other writers may run meanwhile

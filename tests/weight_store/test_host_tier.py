"""The host tier: shards land in one 0600 shared-memory region at aligned offsets,
are verified on first load, load once under concurrency, and the region is unlinked
on close."""

import concurrent.futures
import os
import stat

import pytest

from strata.model.manifest import ALIGN
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import shm
from weight_store.host_tier import HostTier
from weight_store.reader import PreadReader

from fake_shards import write_model


@pytest.fixture
def model(tmp_path):
    directory = tmp_path / "model"
    return directory, write_model(directory)


@pytest.fixture
def session():
    s = "test" + shm.new_session_id()
    yield s
    shm.sweep(s)


def open_tier(directory, manifest, session, verify=True) -> HostTier:
    return HostTier(directory, manifest, session, PreadReader(threads=2, chunk_bytes=8192), verify=verify)


def test_load_all_puts_each_shard_file_at_an_aligned_offset(model, session):
    directory, manifest = model
    tier = open_tier(directory, manifest, session)
    try:
        assert tier.loaded_count() == 0
        tier.load_all()
        assert tier.all_loaded()
        for name, shard in manifest.shards.items():
            slot = tier.slot(name)
            assert slot.offset % ALIGN == 0
            got = tier.region.bytes_view(slot.offset, slot.byte_size).numpy().tobytes()
            assert got == (directory / shard.file).read_bytes()
            assert tier.read_bytes(name) == got
    finally:
        tier.close()


def test_region_is_owner_only_and_unlinked_on_close(model, session):
    directory, manifest = model
    tier = open_tier(directory, manifest, session)
    path = shm.SHM_DIR / tier.region_name
    assert tier.region_name.startswith(f"strata-{session}-")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    tier.close()
    assert not path.exists()


def test_sha256_mismatch_is_data_loss_naming_file_tensor_and_part(model, session):
    directory, manifest = model
    path = directory / manifest.shards["layer.1"].file
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    tier = open_tier(directory, manifest, session)
    try:
        tier.ensure_loaded("layer.0")
        with pytest.raises(StrataError) as e:
            tier.ensure_loaded("layer.1")
        assert e.value.kind is ErrorKind.DATA_LOSS
        assert str(path) in e.value.message and "layer.1.t0" in e.value.message and "sha256" in e.value.message
        assert not tier.is_loaded("layer.1") and tier.is_loaded("layer.0")
        with pytest.raises(StrataError):
            tier.load_all()
    finally:
        tier.close()


def test_no_verify_accepts_changed_bytes(model, session):
    directory, manifest = model
    path = directory / manifest.shards["head"].file
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    tier = open_tier(directory, manifest, session, verify=False)
    try:
        assert tier.read_bytes("head") == bytes(raw)
    finally:
        tier.close()


def test_truncated_shard_file_is_data_loss(model, session):
    directory, manifest = model
    path = directory / manifest.shards["embed"].file
    path.write_bytes(path.read_bytes()[:5000])
    tier = open_tier(directory, manifest, session)
    try:
        with pytest.raises(StrataError) as e:
            tier.ensure_loaded("embed")
        assert e.value.kind is ErrorKind.DATA_LOSS and str(path) in e.value.message and "5000" in e.value.message
    finally:
        tier.close()


def test_unknown_shard_is_not_found(model, session):
    directory, manifest = model
    tier = open_tier(directory, manifest, session)
    try:
        with pytest.raises(StrataError) as e:
            tier.ensure_loaded("layer.7")
        assert e.value.kind is ErrorKind.NOT_FOUND
    finally:
        tier.close()


def test_concurrent_requests_load_a_shard_once(model, session):
    directory, manifest = model
    reads = []
    reader = PreadReader(threads=2)
    original = reader.read_into
    reader.read_into = lambda path, *a: (reads.append(path), original(path, *a))[1]
    tier = HostTier(directory, manifest, session, reader)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            slots = list(pool.map(lambda _: tier.ensure_loaded("layer.0"), range(16)))
        assert len(set(slots)) == 1 and len(reads) == 1
    finally:
        tier.close()

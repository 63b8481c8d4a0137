"""strata/transport/shm.py: named regions in /dev/shm, and the refcounted table of attached ones."""

import os
import pathlib
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import shm
from strata.transport.shm import Region, RegionTable

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture
def session():
    s = "test" + shm.new_session_id()
    yield s
    shm.sweep(s)


def kind_of(call) -> ErrorKind:
    with pytest.raises(StrataError) as e:
        call()
    return e.value.kind


def test_a_region_is_created_0600_under_its_session_name(session):
    r = Region.create(shm.region_name(session, "weights"), 4096)
    try:
        path = shm.SHM_DIR / r.name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_size == 4096
        assert r.name.startswith(f"strata-{session}-weights-{os.getpid()}-")
    finally:
        r.close()
    assert not path.exists()  # the owner unlinks on close


def test_create_never_takes_over_an_existing_region(session):
    r = Region.create(shm.region_name(session, "x"), 64)
    try:
        r.bytes_view(0, 4).fill_(7)
        with pytest.raises(FileExistsError):
            Region.create(r.name, 64)
        assert r.bytes_view(0, 4).tolist() == [7] * 4
    finally:
        r.close()


@pytest.mark.parametrize("name", ["other-x", "strata-a/../b", "/strata-x"])
def test_names_outside_the_prefix_or_with_a_slash_are_refused(name):
    assert kind_of(lambda: Region.create(name, 64)) == ErrorKind.INVALID_ARGUMENT
    assert kind_of(lambda: Region.attach(name)) == ErrorKind.INVALID_ARGUMENT


def test_writes_through_a_peer_process_are_seen_by_the_owner(session):
    owner = Region.create(shm.region_name(session, "x"), 1024)
    try:
        code = (f"from strata.transport.shm import Region; import torch; r = Region.attach({owner.name!r}, 1024); "
                "r.tensor(256, torch.float32, (2, 2)).copy_(torch.tensor([[1.5, 2.5], [3.5, 4.5]])); r.close()")
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert owner.tensor(256, torch.float32, (2, 2)).tolist() == [[1.5, 2.5], [3.5, 4.5]]
        assert (shm.SHM_DIR / owner.name).exists()  # a peer's close leaves the file
    finally:
        owner.close()


def test_tensor_views_share_the_region_bytes(session):
    owner = Region.create(shm.region_name(session, "x"), 64)
    peer = Region.attach(owner.name)
    try:
        assert peer.size == 64 and not peer.owner
        owner.tensor(8, torch.int32, (3,)).copy_(torch.tensor([1, -2, 3], dtype=torch.int32))
        assert peer.tensor(8, torch.int32, (3,)).tolist() == [1, -2, 3]
        assert peer.bytes_view(0, 8).tolist() == [0] * 8
    finally:
        peer.close()
        owner.close()


def test_attach_missing_is_not_found_and_too_small_is_invalid(session):
    name = shm.region_name(session, "x")
    assert kind_of(lambda: Region.attach(name)) == ErrorKind.NOT_FOUND
    r = Region.create(name, 100)
    try:
        assert kind_of(lambda: Region.attach(name, expected_size=101)) == ErrorKind.INVALID_ARGUMENT
        Region.attach(name, expected_size=100).close()
    finally:
        r.close()


def test_views_outside_the_region_or_misaligned_are_refused(session):
    r = Region.create(shm.region_name(session, "x"), 64)
    try:
        assert r.bytes_view(60, 4).numel() == 4
        assert kind_of(lambda: r.bytes_view(60, 5)) == ErrorKind.INVALID_ARGUMENT
        assert kind_of(lambda: r.bytes_view(-1, 2)) == ErrorKind.INVALID_ARGUMENT
        assert kind_of(lambda: r.tensor(56, torch.float32, (3,))) == ErrorKind.INVALID_ARGUMENT
        assert kind_of(lambda: r.tensor(2, torch.float32, (1,))) == ErrorKind.INVALID_ARGUMENT
    finally:
        r.close()


def test_close_with_a_live_view_still_unlinks(session):
    r = Region.create(shm.region_name(session, "x"), 64)
    view = r.tensor(0, torch.float32, (4,))
    r.close()  # the mapping stays while `view` uses it; the name goes now
    assert not (shm.SHM_DIR / r.name).exists()
    view.fill_(1.0)
    assert view.sum().item() == 4.0


def test_an_empty_region_can_be_created_and_closed(session):
    r = Region.create(shm.region_name(session, "empty"), 0)
    assert r.size == 0 and r.bytes_view(0, 0).numel() == 0
    r.close()


def test_sweep_removes_only_that_session(session):
    other = "test" + shm.new_session_id()
    mine = [Region.create(shm.region_name(session, p), 64) for p in ("a", "b")]
    theirs = Region.create(shm.region_name(other, "a"), 64)
    try:
        assert sorted(shm.sweep(session)) == sorted(r.name for r in mine)
        assert not any((shm.SHM_DIR / r.name).exists() for r in mine)
        assert (shm.SHM_DIR / theirs.name).exists()
    finally:
        theirs.close()
        for r in mine:
            r.close()


def test_dtype_names_round_trip_and_unknown_is_invalid():
    for name in ("float16", "bfloat16", "float32", "uint8", "int8", "int32", "int64"):
        assert shm.dtype_name(shm.torch_dtype(name)) == name
    assert kind_of(lambda: shm.torch_dtype("complex64")) == ErrorKind.INVALID_ARGUMENT


@pytest.fixture
def owned(session):
    r = Region.create(shm.region_name(session, "table"), 4096)
    yield r
    r.close()


def test_register_twice_maps_once(owned):
    table = RegionTable()
    try:
        assert table.register(owned.name, 4096) is table.register(owned.name)
        assert table.acquire(owned.name).size == 4096
        table.release(owned.name)
    finally:
        table.close_all()
    assert (shm.SHM_DIR / owned.name).exists()  # a peer's table never unlinks the owner's file


def test_register_checks_the_size_and_acquire_needs_a_registration(owned):
    table = RegionTable()
    assert kind_of(lambda: table.register(owned.name, 8192)) == ErrorKind.INVALID_ARGUMENT
    assert kind_of(lambda: table.acquire(owned.name)) == ErrorKind.NOT_FOUND
    assert kind_of(lambda: table.unregister(owned.name)) == ErrorKind.NOT_FOUND


def test_unregister_waits_for_every_user_to_release(owned):
    table = RegionTable()
    table.register(owned.name)
    table.acquire(owned.name)
    table.acquire(owned.name)  # two users
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (table.unregister(owned.name, timeout=30), done.set()))
    waiter.start()
    time.sleep(0.2)
    assert not done.is_set()
    table.release(owned.name)
    time.sleep(0.2)
    assert not done.is_set()  # one user left
    table.release(owned.name)
    waiter.join(timeout=10)
    assert done.is_set()
    assert kind_of(lambda: table.acquire(owned.name)) == ErrorKind.NOT_FOUND


def test_unregister_of_a_region_held_past_the_timeout_fails_and_keeps_it(owned):
    table = RegionTable()
    table.register(owned.name)
    table.acquire(owned.name)
    t0 = time.monotonic()
    assert kind_of(lambda: table.unregister(owned.name, timeout=0.2)) == ErrorKind.FAILED_PRECONDITION
    assert time.monotonic() - t0 >= 0.2
    table.release(owned.name)
    table.unregister(owned.name, timeout=1)  # released: now it goes
    assert kind_of(lambda: table.acquire(owned.name)) == ErrorKind.NOT_FOUND

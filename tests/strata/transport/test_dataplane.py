"""strata/transport/dataplane.py: TensorRef <-> tensor, through shared memory or inline bytes."""

import threading
import time

import pytest
import torch

from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import shm
from strata.transport.dataplane import Arena, inline_ref, ref_for, resolve
from strata.transport.shm import Region, RegionTable


@pytest.fixture
def region():
    session = "test" + shm.new_session_id()
    r = Region.create(shm.region_name(session, "data"), 1 << 12)
    yield r
    r.close()
    shm.sweep(session)


@pytest.fixture
def table(region):
    t = RegionTable()
    t.register(region.name, region.size)
    yield t
    t.close_all()


def kind_of(call) -> ErrorKind:
    with pytest.raises(StrataError) as e:
        call()
    return e.value.kind


def resolved(ref, table):
    with resolve(ref, table) as t:
        return t.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_inline_refs_round_trip_every_dtype(dtype, table):
    x = (torch.arange(24) - 7).to(dtype).reshape(2, 3, 4)
    ref = inline_ref(x)
    assert not ref.region and ref.byte_size == x.numel() * x.element_size()
    assert torch.equal(resolved(ref, table), x)


def test_inline_ref_of_a_non_contiguous_tensor_keeps_its_logical_order(table):
    x = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(resolved(inline_ref(x), table), x)


def test_inline_ref_of_an_empty_tensor(table):
    x = torch.empty(0, 5)
    ref = inline_ref(x)
    assert ref.byte_size == 0 and resolved(ref, table).shape == (0, 5)


def test_a_shared_memory_ref_is_a_view_writes_land_in_the_region(region, table):
    x = region.tensor(256, torch.float32, (2, 3))
    x.copy_(torch.arange(6.0).reshape(2, 3))
    ref = ref_for(region, 256, x)
    fields = (ref.region, ref.offset, ref.byte_size, ref.dtype, list(ref.shape))
    assert fields == (region.name, 256, 24, "float32", [2, 3])
    with resolve(ref, table) as t:
        assert torch.equal(t, x)
        t.mul_(10)  # zero copy: the owner sees it
    assert x.tolist() == [[0, 10, 20], [30, 40, 50]]
    assert ref_for(region, 256, (2, 3), torch.float32) == ref  # from a shape and dtype alike


def test_resolve_holds_the_region_until_the_block_ends(region, table):
    ref = ref_for(region, 0, (4,), torch.float32)
    unregistered = threading.Event()
    with resolve(ref, table):
        waiter = threading.Thread(target=lambda: (table.unregister(region.name, timeout=30), unregistered.set()))
        waiter.start()
        time.sleep(0.2)
        assert not unregistered.is_set()  # in use
    waiter.join(timeout=10)
    assert unregistered.is_set()


def test_a_failed_resolve_releases_the_region(region, table):
    ref = ref_for(region, region.size - 8, (4,), torch.float32)  # 16 bytes from 8 before the end
    assert kind_of(lambda: resolved(ref, table)) == ErrorKind.INVALID_ARGUMENT
    table.unregister(region.name, timeout=0.5)  # no user left behind


def test_refs_that_disagree_with_themselves_are_invalid(region, table):
    ref = ref_for(region, 0, (4,), torch.float32)
    ref.byte_size = 12
    assert kind_of(lambda: resolved(ref, table)) == ErrorKind.INVALID_ARGUMENT
    bad_dtype = ref_for(region, 0, (4,), torch.float32)
    bad_dtype.dtype = "float64"
    assert kind_of(lambda: resolved(bad_dtype, table)) == ErrorKind.INVALID_ARGUMENT
    short = inline_ref(torch.ones(4))
    short.inline_data = short.inline_data[:-1]
    assert kind_of(lambda: resolved(short, table)) == ErrorKind.INVALID_ARGUMENT


def test_a_ref_to_an_unregistered_region_is_not_found(region):
    ref = ref_for(region, 0, (4,), torch.float32)
    assert kind_of(lambda: resolved(ref, RegionTable())) == ErrorKind.NOT_FOUND


def test_arena_aligns_each_allocation_and_its_refs_resolve_to_the_same_bytes(region, table):
    arena = Arena(region)
    a, ref_a = arena.alloc((3,), torch.float32)
    b, ref_b = arena.alloc((2, 2), torch.bfloat16)
    assert (ref_a.offset, ref_b.offset) == (0, Arena.ALIGN)
    a.copy_(torch.tensor([1.0, 2.0, 3.0]))
    b.fill_(0.5)
    assert resolved(ref_a, table).tolist() == [1.0, 2.0, 3.0]
    assert resolved(ref_b, table).tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_arena_full_is_resource_exhausted_and_reset_starts_over(region):
    arena = Arena(region)
    arena.alloc((region.size - 4,), torch.uint8)
    assert kind_of(lambda: arena.alloc((8,), torch.uint8)) == ErrorKind.RESOURCE_EXHAUSTED
    arena.reset()
    _, ref = arena.alloc((region.size,), torch.uint8)  # the whole region again
    assert ref.offset == 0 and ref.byte_size == region.size

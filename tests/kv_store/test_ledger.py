import pytest

from kv_store.ledger import CapacityLedger, cache_bytes
from strata.runtime.errors import ErrorKind, StrataError


def test_cache_bytes_counts_keys_and_values():
    nbytes = cache_bytes(num_layers=3, batch=2, num_heads=4, max_tokens=10, head_dim=8, itemsize=2)
    assert nbytes == 2 * 3 * 2 * 4 * 10 * 8 * 2


def test_reserve_and_free_account_bytes():
    ledger = CapacityLedger(1000)
    assert ledger.reserve("a", 300) == 700
    assert ledger.reserve("b", 700) == 0
    assert ledger.bytes_reserved == 1000 and ledger.bytes_free == 0
    assert ledger.held("a") == 300
    assert sorted(ledger.groups()) == ["a", "b"]
    assert ledger.free("a") == 300
    assert ledger.reserve("c", 300) == 0


def test_reservation_beyond_capacity_is_resource_exhausted_and_reserves_nothing():
    ledger = CapacityLedger(1000)
    ledger.reserve("a", 600)
    with pytest.raises(StrataError) as e:
        ledger.reserve("b", 500)
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "500" in e.value.message and "400" in e.value.message
    assert ledger.bytes_free == 400 and ledger.groups() == ["a"]


def test_duplicate_group_is_failed_precondition():
    ledger = CapacityLedger(1000)
    ledger.reserve("a", 10)
    with pytest.raises(StrataError) as e:
        ledger.reserve("a", 10)
    assert e.value.kind is ErrorKind.FAILED_PRECONDITION
    assert ledger.bytes_reserved == 10


def test_unknown_group_is_not_found():
    ledger = CapacityLedger(1000)
    for call in (lambda: ledger.free("nope"), lambda: ledger.held("nope")):
        with pytest.raises(StrataError) as e:
            call()
        assert e.value.kind is ErrorKind.NOT_FOUND


def test_free_twice_is_not_found():
    ledger = CapacityLedger(100)
    ledger.reserve("a", 100)
    ledger.free("a")
    with pytest.raises(StrataError) as e:
        ledger.free("a")
    assert e.value.kind is ErrorKind.NOT_FOUND
    assert ledger.bytes_free == 100


def test_negative_sizes_are_invalid():
    with pytest.raises(StrataError):
        CapacityLedger(-1)
    with pytest.raises(StrataError) as e:
        CapacityLedger(10).reserve("a", -5)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


def test_policy_imports_neither_torch_nor_grpc():
    """grpc still arrives through strata.runtime.errors (its module-level import); torch must not."""
    import pathlib
    import subprocess
    import sys

    import kv_store.ledger

    code = "import sys, kv_store.ledger; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
    source = pathlib.Path(kv_store.ledger.__file__).read_text()
    assert "import torch" not in source and "import grpc" not in source


def test_arena_first_fit_reuses_and_coalesces_released_space():
    from kv_store.ledger import ArenaAllocator

    arena = ArenaAllocator(1 << 30)
    mib2 = arena.align
    arena = ArenaAllocator(4 * mib2)
    arena.align = mib2
    assert arena.alloc("a", 1) == 0
    assert arena.alloc("b", mib2 + 1) == mib2  # rounded up to two blocks
    assert arena.alloc("c", mib2) == 3 * mib2
    with pytest.raises(StrataError) as e:
        arena.alloc("d", mib2)
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    arena.release("a")
    arena.release("b")  # a and b coalesce into three free blocks at 0
    assert arena.alloc("d", 3 * mib2) == 0

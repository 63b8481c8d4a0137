"""The scheduler's policy alone (compute_node/slots.py): slots, admission order, refusals."""

import pytest

from compute_node.slots import Limits, SlotPool, WaitQueue, check_fits, default_max_queue, even_groups
from strata.runtime.errors import ErrorKind, StrataError


def test_even_groups_split_the_batch_without_empty_groups():
    assert sorted(even_groups(10, 4)) == [2, 2, 3, 3]
    assert even_groups(3, 8) == (1, 1, 1)
    assert sum(even_groups(159, 4)) == 159


def test_sequences_take_the_lowest_free_row_of_the_least_used_group():
    pool = SlotPool((3, 3))
    assert [pool.take() for _ in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    pool.give((0, 0))
    assert pool.take() == (0, 0)  # group 0 now has fewer in use: its lowest free row
    assert pool.rows_in_use(0) == 2 and pool.free == 2


def test_a_decode_step_covers_rows_up_to_the_highest_in_use():
    pool = SlotPool((4,))
    slots = [pool.take() for _ in range(3)]
    pool.give(slots[0])
    assert pool.rows_in_use(0) == 3
    pool.give(slots[2])
    assert pool.rows_in_use(0) == 2
    pool.give(slots[1])
    assert pool.rows_in_use(0) == 0


def test_a_full_pool_and_a_double_free_are_errors():
    pool = SlotPool((1,))
    slot = pool.take()
    with pytest.raises(StrataError):
        pool.take()
    pool.give(slot)
    with pytest.raises(ValueError):
        pool.give(slot)


def test_the_queue_admits_in_arrival_order_and_nothing_overtakes_a_waiting_head():
    q = WaitQueue(10)
    q.push("big", 4)
    q.push("small", 1)
    assert q.admissible(3) == []  # "small" would fit, but "big" came first
    assert q.admissible(5) == ["big", "small"]
    assert q.sequences == 0


def test_a_full_queue_refuses_with_resource_exhausted():
    q = WaitQueue(3)
    q.push("a", 2)
    with pytest.raises(StrataError) as e:
        q.push("b", 2)
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert [r for r in q.remove(lambda r: r != "a")] == ["a"] and q.sequences == 0


def test_requests_that_can_never_run_are_refused_at_once():
    limits = Limits((2, 2), capacity=16, max_queue=8)
    check_fits(limits, [(10, 7)])  # 10 + 7 - 1 = 16 tokens: fits exactly
    for lengths in ([(10, 8)], [(1, 1)] * 5):
        with pytest.raises(StrataError) as e:
            check_fits(limits, lengths)
        assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED


def test_the_default_queue_holds_several_batches():
    assert default_max_queue(4) == 64 and default_max_queue(128) == 1024

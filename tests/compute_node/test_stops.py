import pytest

from compute_node.stops import StopWatch
from strata.errors import StrataError


def decode(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_a_sequence_stops_at_the_first_stop_and_its_text_ends_before_it():
    w = StopWatch(["cd", "x"], decode, 2)
    assert not w.check(0, [0, 1, 2])  # "abc"
    assert w.check(0, [0, 1, 2, 3])  # "abcd"
    assert w.text([0, 1, 2, 3, 4]) == "ab"
    assert not w.stopped[1]


def test_no_stops_never_stops_and_empty_stop_is_refused():
    assert not StopWatch([], decode, 1).check(0, [1, 2, 3])
    with pytest.raises(StrataError):
        StopWatch([""], decode, 1)

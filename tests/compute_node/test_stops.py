import pytest

from compute_node.stops import StopWatch
from strata.runtime.errors import StrataError


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


def test_each_check_decodes_a_bounded_tail_however_long_the_sequence():
    seen = []

    def counting(ids):
        seen.append(len(ids))
        return decode(ids)

    w = StopWatch(["xyz"], counting, 1)
    ids = []
    for step in range(2000):
        ids.append(step % 20)  # letters a..t: never "xyz"
        assert not w.check(0, ids)
    assert max(seen) <= 4 * 3 + 1
    ids += [23, 24, 25]  # "xyz", spanning three tokens
    assert w.check(0, ids)
    assert w.text(ids).endswith(decode(ids[-23:-3]))


def test_streamed_text_adds_up_to_the_final_text_and_never_shows_a_stop():
    from compute_node.stops import TextStream

    words = {1: "ab", 2: "c", 3: "EN", 4: "D", 5: "x"}

    def decode(ids):
        return "".join(words[i] for i in ids)

    stops = StopWatch(["END"], decode, 2)
    stream = TextStream(stops, 2)
    seen = ["", ""]
    for step in ([1, 5], [2, 5], [3, 5], [4, 5], [-1, 5]):
        for i, d in enumerate(stream.step(step)):
            seen[i] += d
        assert "E" not in seen[0]  # held back: it may begin the stop
    assert seen[0] == "abc" and stops.text([1, 2, 3, 4]) == "abc"
    assert "xxxxx".startswith(seen[1]) and len(seen[1]) == 5 - 2  # the last 2 held until the final text

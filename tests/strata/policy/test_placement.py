import pytest

from strata.policy.placement import resident_layers


@pytest.mark.parametrize("n,share,k", [(48, 1.0, 48), (48, 0.0, 0), (48, 0.5, 24), (96, 0.6, 58), (3, 0.34, 1)])
def test_share_gives_that_many_resident_layers_spread_through_the_model(n, share, k):
    r = resident_layers(n, share)
    assert len(r) == k and r <= set(range(n))
    if 0 < k < n:  # interleaved: no run of streamed layers longer than needed
        streamed_runs, run = [], 0
        for i in range(n):
            run = 0 if i in r else run + 1
            streamed_runs.append(run)
        assert max(streamed_runs) <= -(-(n - k) // k) + 1


def test_share_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError):
        resident_layers(10, 1.5)

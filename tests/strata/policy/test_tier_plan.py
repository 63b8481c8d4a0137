"""The weight store's tier policy: what the host tier holds under a budget."""

import pytest

from strata.policy.placement import resident_layers, tier_plan
from strata.runtime.errors import ErrorKind, StrataError

MB = 1 << 20
SIZES = {"embed": 50 * MB, **{f"layer.{i}": 10 * MB for i in range(8)}, "head": 1 * MB}


def test_no_budget_no_offload_and_nothing_resident_holds_everything_in_the_host_tier():
    plan = tier_plan(SIZES, 8, gpu_share=0.0, host_budget=None, disk_offload=False)
    assert plan.host == frozenset(SIZES) and not plan.disk and plan.staging_bytes == 0


def test_gpu_resident_layers_are_read_once_from_disk_never_held():
    plan = tier_plan(SIZES, 8, gpu_share=0.5, host_budget=None, disk_offload=False)
    resident = {f"layer.{i}" for i in resident_layers(8, 0.5)}
    assert plan.disk == resident and plan.host == frozenset(SIZES) - resident
    assert plan.staging_slots == 3


def test_disk_offload_without_budget_keeps_every_layer_on_disk():
    plan = tier_plan(SIZES, 8, gpu_share=0.0, host_budget=None, disk_offload=True)
    assert plan.host == {"embed", "head"}
    assert plan.disk == {f"layer.{i}" for i in range(8)}
    assert plan.staging_slots == 3 and plan.slot_bytes == 10 * MB


@pytest.mark.parametrize("cached", [0, 1, 3, 5])
def test_budget_caches_the_first_streamed_layers_and_never_the_gpu_resident_ones(cached):
    share = 0.25
    resident = {f"layer.{i}" for i in resident_layers(8, share)}
    budget = 51 * MB + 3 * 10 * MB + cached * 10 * MB + 5 * MB  # 5 MB too little for one more
    plan = tier_plan(SIZES, 8, gpu_share=share, host_budget=budget, disk_offload=False)
    streamed = [f"layer.{i}" for i in range(8) if f"layer.{i}" not in resident]
    assert plan.host == {"embed", "head", *streamed[:cached]}
    assert plan.disk == resident | set(streamed[cached:])
    held = sum(SIZES[n] for n in plan.host) + plan.staging_bytes
    assert held <= budget


def test_a_budget_that_holds_everything_needs_no_staging():
    plan = tier_plan(SIZES, 8, gpu_share=0.0, host_budget=1 << 40, disk_offload=False)
    assert plan.host == frozenset(SIZES) and plan.staging_slots == 0


def test_a_budget_below_embeddings_and_staging_says_by_how_much():
    need = 51 * MB + 30 * MB
    with pytest.raises(StrataError) as e:
        tier_plan(SIZES, 8, gpu_share=0.0, host_budget=need - 7, disk_offload=True)
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "7 bytes short" in str(e.value)


@pytest.mark.parametrize("share,disk_layers", [(0.0, 0), (0.0, 3), (0.5, 2), (0.25, 6)])
def test_host_budget_for_leaves_exactly_the_last_streamed_layers_on_disk(share, disk_layers):
    from strata.policy.placement import host_budget_for

    small = {"embed": 9000, **{f"layer.{i}": 4096 for i in range(8)}, "head": 300}  # layers far below 1 MiB
    budget = host_budget_for(small, 8, share, disk_layers)
    budget = int(float(str(budget / 2**30)) * 2**30)  # as the launcher passes it on
    plan = tier_plan(small, 8, gpu_share=share, host_budget=budget, disk_offload=False)
    resident = {f"layer.{i}" for i in resident_layers(8, share)}
    streamed = [f"layer.{i}" for i in range(8) if f"layer.{i}" not in resident]
    assert plan.disk - resident == set(streamed[len(streamed) - disk_layers:])

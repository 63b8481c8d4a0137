"""The planner alone (no torch): argmax of the predicted grid, memory limits, errors."""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import pytest

from strata import cost_model as cm
from strata import floor as fl
from strata import hardware, planner, shapes
from strata.arch import dims_for
from strata.errors import ErrorKind, StrataError

PROFILE = pathlib.Path(__file__).parents[2] / "bench" / "profiles" / "nvidia-h100-x1.json"
GIB = 1 << 30


@pytest.fixture(scope="module")
def h100() -> hardware.HardwareProfile:
    return hardware.load(PROFILE)


def model(name: str):
    dims = dims_for(shapes.config_for(name))
    return dims, (lambda bits: cm.estimate_weight_bytes(dims, bits))


def brute_force(dims, wbf, w, profile, bits, batches):
    """Every placement of the grid that fits, predicted."""
    L = dims.num_layers
    best = None
    for k, kv, m, b in itertools.product(range(L + 1), (False, True), planner.MICRO_BATCHES, batches):
        if b < m:
            continue
        pl = cm.Placement(k / L, kv, m, b, bits)
        pred = cm.predict(dims, wbf(bits), w, pl, profile)
        if pred.fits(profile) and (best is None or pred.total_tokens_per_s > best[1].total_tokens_per_s):
            best = (pl, pred)
    return best


def test_choice_is_the_argmax_of_the_predicted_grid_at_a_fixed_batch(h100):
    dims, wbf = model("facebook/opt-13b")
    small = dataclasses.replace(h100, gpu_bytes=12 * GIB, host_bytes=48 * GIB)
    w = cm.Workload(prompt_len=256, gen_len=16, batch_size=8)
    got = planner.plan(dims, wbf, w, small, planner.Fixed(quant_bits=4))
    pl, pred = brute_force(dims, wbf, w, small, 4, [8])
    assert got.prediction.total_tokens_per_s == pytest.approx(pred.total_tokens_per_s, rel=1e-12)


def test_choice_is_at_least_the_best_of_the_grid_with_a_free_batch(h100):
    dims, wbf = model("facebook/opt-6.7b")
    small = dataclasses.replace(h100, gpu_bytes=10 * GIB, host_bytes=40 * GIB)
    w = cm.Workload(prompt_len=256, gen_len=16)
    got = planner.plan(dims, wbf, w, small, planner.Fixed(quant_bits=4))
    _, pred = brute_force(dims, wbf, w, small, 4, planner.batch_candidates())
    assert got.prediction.total_tokens_per_s >= pred.total_tokens_per_s * (1 - 1e-12)
    tokens = [c.prediction.total_tokens_per_s for c in got.alternatives]
    assert tokens == sorted(tokens, reverse=True) and tokens[0] <= got.prediction.total_tokens_per_s


@pytest.mark.parametrize("name", ["facebook/opt-30b", "facebook/opt-175b"])
@pytest.mark.parametrize("gpu_gib,host_gib", [(79, 125), (40, 125), (24, 200)])
def test_memory_limits_are_respected_with_headroom(h100, name, gpu_gib, host_gib):
    dims, wbf = model(name)
    prof = dataclasses.replace(h100, gpu_bytes=gpu_gib * GIB, host_bytes=host_gib * GIB)
    w = cm.Workload(prompt_len=512, gen_len=32)
    try:
        got = planner.plan(dims, wbf, w, prof, planner.Fixed(quant_bits=4))
    except StrataError as e:
        assert e.kind is ErrorKind.RESOURCE_EXHAUSTED
        return
    for c in (planner.Choice(got.placement, got.prediction), *got.alternatives):
        p = c.prediction
        assert p.gpu_bytes_needed <= prof.gpu_bytes and p.host_bytes_needed <= prof.host_bytes
        assert p.gpu_breakdown["margin"] >= 0.06 * prof.gpu_bytes and p.host_breakdown["headroom"] >= 6 * GIB
        assert p.gpu_breakdown["CUDA context"] > 0 and p.gpu_peak_allocated < p.gpu_bytes_needed
        resident, _, disk = c.placement.layer_counts(dims.num_layers)
        assert p.host_breakdown["weights"] == pytest.approx(wbf(4).total - (resident + disk) * wbf(4).layer)


def test_fixed_fields_are_kept(h100):
    dims, wbf = model("facebook/opt-30b")
    w = cm.Workload(prompt_len=512, gen_len=32, batch_size=16)
    got = planner.plan(dims, wbf, w, h100, planner.Fixed(kv_on_host=True, micro_batches=2, quant_bits=8))
    pl = got.placement
    assert (pl.kv_on_host, pl.micro_batches, pl.batch_size, pl.quant_bits) == (True, 2, 16, 8)
    pinned = planner.plan(dims, wbf, w, h100, planner.Fixed(gpu_weight_share=0.25, quant_bits=4))
    assert pinned.placement.gpu_weight_share == 0.25


def test_impossible_request_says_what_does_not_fit_and_by_how_much(h100):
    dims, wbf = model("facebook/opt-175b")
    w = cm.Workload(prompt_len=512, gen_len=32, batch_size=1)
    with pytest.raises(StrataError) as e:
        planner.plan(dims, wbf, w, h100, planner.Fixed(quant_bits=16))
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    kv_host = cm.memory(dims, wbf(16), w, cm.Placement(0.0, False, 1, 1, 16), h100.gpu_bytes)[1]
    short = sum(kv_host.values()) - h100.host_bytes
    assert "host memory" in e.value.message and f"short by {short:,.0f} bytes" in e.value.message
    assert "GPU memory" not in e.value.message


def test_impossible_on_a_small_gpu_names_the_gpu(h100):
    dims, wbf = model("facebook/opt-175b")
    tiny = dataclasses.replace(h100, gpu_bytes=8 * GIB)
    with pytest.raises(StrataError) as e:
        planner.plan(dims, wbf, cm.Workload(512, 32), tiny, planner.Fixed(quant_bits=4))
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "GPU memory needs" in e.value.message and "layer ring" in e.value.message
    assert "short by" in e.value.message


def test_a_profile_without_a_gpu_is_a_failed_precondition(h100):
    dims, wbf = model("facebook/opt-1.3b")
    cpu = dataclasses.replace(h100, gpu_bytes=0.0, gpu_flops=0.0, gpu_name="")
    with pytest.raises(StrataError) as e:
        planner.plan(dims, wbf, cm.Workload(64, 8), cpu)
    assert e.value.kind is ErrorKind.FAILED_PRECONDITION


def test_t1_plan_is_at_most_the_floor(h100):
    """DESIGN T1 (OPT-30B INT4, all KV on host): the planned prediction never beats the floor."""
    dims, wbf = model("facebook/opt-30b")
    w = cm.Workload(prompt_len=512, gen_len=32)
    got = planner.plan(dims, wbf, w, h100, planner.Fixed(kv_on_host=True, quant_bits=4))
    pl = got.placement
    f = fl.floor(dims, fl.Workload(pl.batch_size, 512, 32),
                 fl.Placement(wbf(4).total, pl.gpu_weight_share, True, fl.kv_bytes_per_token(dims)),
                 h100.to_hardware())
    assert got.prediction.total_tokens_per_s <= f["tokens_per_s"]
    assert pl.kv_on_host and got.prediction.decode_binding == "CPU KV read"


def test_batch_candidates_are_powers_of_two_and_halfway():
    assert planner.batch_candidates(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def test_kv_precision_is_16_unless_the_user_allows_less(h100):
    """A lossy KV cache is the user's call: by default the plan keeps 16 bits; with
    kv_bits=None (--kv-bits auto) the planner may choose 8 or 4, and for OPT-175B,
    whose bf16 cache of a large batch cannot fit the GPU, a quantized GPU cache lets
    the batch grow and predicts more tokens/s."""
    dims, wbf = model("facebook/opt-175b")
    w = cm.Workload(prompt_len=512, gen_len=32)
    exact = planner.plan(dims, wbf, w, h100, planner.Fixed(quant_bits=4))
    assert exact.placement.kv_bits == 16
    assert all(c.placement.kv_bits == 16 for c in exact.alternatives)
    auto = planner.plan(dims, wbf, w, h100, planner.Fixed(quant_bits=4, kv_bits=None))
    assert auto.placement.kv_bits in (8, 4) and not auto.placement.kv_on_host
    assert auto.placement.batch_size > exact.placement.batch_size
    assert auto.prediction.total_tokens_per_s > exact.prediction.total_tokens_per_s
    assert auto.prediction.fits(h100)


def test_quantized_cpu_attention_gains_less_than_its_bytes(h100):
    """The KV store's kernel reads INT8/INT4 codes in place but is compute-bound there
    (run 78: 0.92x and 1.29x the bf16 rate in bf16-equivalent bytes): an INT4 step is
    faster, by far less than the 3.6x fewer bytes it reads, an INT8 step no faster than
    bf16; and with a cache that small the planner fits a larger batch on the host."""
    dims, wbf = model("facebook/opt-30b")
    w = cm.Workload(prompt_len=512, gen_len=32, batch_size=32)
    steps = {bits: cm.predict(dims, wbf(4), w, cm.Placement(1.0, True, 1, 32, 4, kv_bits=bits), h100).decode_step_s
             for bits in (16, 8, 4)}
    assert steps[8] > steps[16] > steps[4] > steps[16] / 2
    auto = planner.plan(dims, wbf, cm.Workload(prompt_len=512, gen_len=32), h100,
                        planner.Fixed(kv_on_host=True, quant_bits=4, kv_bits=None))
    plain = planner.plan(dims, wbf, cm.Workload(prompt_len=512, gen_len=32), h100,
                         planner.Fixed(kv_on_host=True, quant_bits=4))
    assert auto.placement.kv_bits == 4 and auto.placement.batch_size > plain.placement.batch_size


def test_disk_share_left_to_the_planner_keeps_layers_off_disk_where_they_fit(h100):
    """bench and serve let the planner choose the disk share: where host memory holds
    the model, that must plan exactly as with no disk at all (it once took the disk
    share needed at GPU share 0, and so a smaller batch, for OPT-30B's T1)."""
    dims, wbf = model("facebook/opt-30b")
    w = cm.Workload(prompt_len=512, gen_len=32)
    for kv in (True, False):
        no_disk = planner.plan(dims, wbf, w, h100, planner.Fixed(kv_on_host=kv, quant_bits=4))
        auto = planner.plan(dims, wbf, w, h100, planner.Fixed(kv_on_host=kv, quant_bits=4, disk_weight_share=None))
        assert auto.placement == no_disk.placement

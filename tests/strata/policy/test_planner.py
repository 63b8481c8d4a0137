"""The planner alone (no torch): argmax of the predicted grid, memory limits, errors."""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import pytest

from strata.model import shapes
from strata.model.arch import dims_for
from strata.policy import cost_model as cm
from strata.policy import floor as fl
from strata.policy import hardware, planner
from strata.policy.placement import SMALL_PREFILL_CHUNK_TOKENS
from strata.runtime.errors import ErrorKind, StrataError

PROFILE = pathlib.Path(__file__).parents[3] / "bench" / "profiles" / "nvidia-h100-x1.json"
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


H200 = pathlib.Path(__file__).parents[3] / "bench" / "profiles" / "nvidia-h200.json"


def _t4():
    """T4 as `strata plan --cases` plans it: Llama-3.1-405B's --dummy INT4 weights (groups
    of 64), prompt 512, gen 32, on the measured H200 profile, the planner free to put KV
    on the GPU or in the KV store at any precision and layers on disk where it must."""
    dims = dims_for(shapes.config_for("meta-llama/Llama-3.1-405B"))
    wbf = lambda bits: cm.estimate_weight_bytes(dims, bits, 64, dummy=True)  # noqa: E731
    w = cm.Workload(prompt_len=512, gen_len=32)
    fixed = planner.Fixed(quant_bits=4, kv_bits=None, disk_weight_share=None)
    return dims, wbf, w, hardware.load(H200), fixed


def test_t4_on_the_h200_fits_and_beats_the_old_disk_bound_plan():
    """Issue 20: the planner chose 12/63/51 layers GPU/host/disk with a 16-bit GPU cache at
    B=256 (4.1 tokens/s, 51 layers re-read from a 1.57 GB/s disk every step): the KV pinned
    at 16 bits took GPU memory from resident layers, and --dummy resident layers were
    charged their q/k/v bytes made on the GPU although a run with a disk tier reads them
    from files. Then 45/62/19 (10.9): two dense layer copies, the dummy embeddings and head
    in host memory too, a prefill chunk tied to the micro-batch. Now: a quantized GPU
    cache, nothing on disk (the GPU and host memory hold every layer between them), and
    more than five times the old prediction."""
    dims, wbf, w, h200, fixed = _t4()
    L, wb = dims.num_layers, wbf(4)
    got = planner.plan(dims, wbf, w, h200, fixed)
    pl, pred = got.placement, got.prediction
    resident, host_n, disk_n = pl.layer_counts(L)
    assert cm.fits(dims, wb, w, pl, h200) and pred.fits(h200)
    assert pred.gpu_bytes_needed <= h200.gpu_bytes and pred.host_bytes_needed <= h200.host_bytes
    old = cm.predict(dims, wb, w, cm.Placement(12 / L, False, 8, 256, 4, 51 / L, 16), h200)
    assert pred.total_tokens_per_s > 5 * old.total_tokens_per_s
    assert disk_n == 0 and host_n > 0 and resident > 12 and not pl.kv_on_host and pl.kv_bits < 16
    assert pred.decode_binding == "PCIe weights" and pl.prefill_chunk_tokens == SMALL_PREFILL_CHUNK_TOKENS
    assert pred.gpu_breakdown["prefill: dense layer copies"] == pytest.approx(2 * wb.layer_params)  # one
    # one more resident layer does not fit the GPU; one fewer does not fit host memory
    more = dataclasses.replace(pl, gpu_weight_share=(resident + 1) / L)
    assert not cm.fits(dims, wb, w, more, h200, host=False)
    fewer = dataclasses.replace(pl, gpu_weight_share=(resident - 1) / L)
    assert not cm.fits(dims, wb, w, fewer, h200, gpu=False)


def test_t4_on_the_h200_is_the_best_placement_that_fits():
    """Every (KV place and bits, micro-batches, prefill chunk, batch in steps of 16), with
    no layer on disk and with some: the most resident layers that fit the GPU, then the
    fewest on disk that fit host memory (more resident layers never predict slower). The
    planner's choice is at least as fast as the best of them."""
    dims, wbf, w, h200, fixed = _t4()
    L, wb = dims.num_layers, wbf(4)
    got = planner.plan(dims, wbf, w, h200, fixed).prediction.total_tokens_per_s

    def most_resident(kv, kv_bits, m, b, on_disk: bool, chunk: int) -> int | None:
        for r in range(L - on_disk, -1, -1):
            pl = cm.Placement(r / L, kv, m, b, 4, (L - r) / L if on_disk else 0.0, kv_bits, prefill_chunk_tokens=chunk)
            if cm.fits(dims, wb, w, pl, h200, host=False):
                return r
        return None

    best = 0.0
    for (kv, kv_bits), m, chunk in itertools.product([(False, 16), (False, 8), (False, 4), (True, 4)],
                                                     planner.MICRO_BATCHES, (0, SMALL_PREFILL_CHUNK_TOKENS)):
        for b in range(max(m, 16), planner.MAX_BATCH + 1, 16):
            for on_disk in (False, True):
                r = most_resident(kv, kv_bits, m, b, on_disk, chunk)
                for d in ([0] if not on_disk else range(1, L - r + 1)) if r is not None else []:
                    pl = cm.Placement(r / L, kv, m, b, 4, d / L, kv_bits, prefill_chunk_tokens=chunk)
                    if cm.fits(dims, wb, w, pl, h200):
                        best = max(best, cm.predict(dims, wb, w, pl, h200).total_tokens_per_s)
                        break
    assert best > 0 and got >= best * (1 - 1e-9)

"""The GPU memory model alone (no torch): what it counts, against measured peaks."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from strata.model import shapes
from strata.model.arch import dims_for
from strata.policy import cost_model as cm
from strata.policy import hardware, memory_model, planner

ROOT = pathlib.Path(__file__).parents[3]
GIB = 1 << 30
W = cm.Workload(512, 32)


@pytest.fixture(scope="module")
def h100() -> hardware.HardwareProfile:
    return hardware.load(ROOT / "bench/profiles/nvidia-h100-x1-measured.json")


@pytest.fixture(scope="module")
def h200() -> hardware.HardwareProfile:
    return hardware.load(ROOT / "bench/profiles/nvidia-h200.json")


def dummy(name: str, bits: int = 4):
    """A shape as `strata bench --dummy` runs it (layers made on the GPU)."""
    dims = dims_for(shapes.config_for(name))
    return dims, cm.estimate_weight_bytes(dims, bits, dummy=True)


# strata bench --dummy on nvidia-h100-x1 (runs 48-84): placement, torch's peak allocated GiB.
# That engine prefilled one micro-batch (slots x prompt tokens) at a time; the scheduler's
# chunks hold whole prompts up to slots x (prompt + generation) tokens, a few more rows,
# so the model now sits up to 10% above these peaks. Its dummy resident layers were one
# buffer each, so merging q, k, v for the fused kernel kept their packed bytes twice;
# they are a buffer per part now (compute_node/weights.py dummy_shard_on_device), and
# those bytes (`qkv_copies`) are taken off the measured peaks. That engine also held two
# dense copies of a layer with the cache on the GPU (the running one and the next); it
# holds one now (compute_node/runner.py), and the second (`dense_copy`) is taken off too.
MEASURED = [
    ("facebook/opt-30b", cm.Placement(1.0, False, 1, 64), 71.7),  # T2
    ("facebook/opt-30b", cm.Placement(1.0, True, 2, 159), 29.0),  # T1
    ("facebook/opt-30b", cm.Placement(1.0, True, 4, 159), 25.7),
    ("facebook/opt-30b", cm.Placement(1.0, True, 2, 256, kv_bits=4), 33.6),
    ("facebook/opt-175b", cm.Placement(0.0, False, 8, 89, kv_bits=4), 73.3),  # T3
    ("facebook/opt-175b", cm.Placement(0.0, False, 4, 80, kv_bits=4), 66.4),
    ("facebook/opt-175b", cm.Placement(0.125, False, 4, 64, kv_bits=4), 67.4),
    ("facebook/opt-175b", cm.Placement(0.0, False, 1, 64, kv_bits=4), 62.5),
]


def qkv_copies(dims, wb, pl: cm.Placement) -> float:
    """The packed q, k, v bytes the resident dummy layers of those runs kept twice."""
    resident = pl.layer_counts(dims.num_layers)[0]
    per_param = wb.layer / (wb.layer_params + 1)  # about 0.5625 at INT4, groups of 64
    return resident * 3 * dims.hidden**2 * per_param


def dense_copy(wb, pl: cm.Placement) -> float:
    """The second dense layer copy those runs held with the cache on the GPU."""
    return 0.0 if pl.kv_on_host else 2 * wb.layer_params


@pytest.mark.parametrize("name,pl,measured_gib", MEASURED)
def test_peak_allocated_is_at_or_a_little_above_the_measured_peak(h100, name, pl, measured_gib):
    dims, wb = dummy(name)
    mem = cm.gpu_memory(dims, wb, W, pl, h100.gpu_bytes)
    now_gib = measured_gib - (qkv_copies(dims, wb, pl) + dense_copy(wb, pl)) / GIB
    assert now_gib <= mem.peak_allocated / GIB <= now_gib * 1.10


def test_t3_all_resident_fits_the_h200_only_without_the_qkv_copies(h200):
    """Issue 20: all OPT-175B layers resident, INT4 KV, B=32 was planned at 135.2 of 140
    GiB and ran out of memory: the dummy layers' q/k/v copies (~21 GiB) were not counted.
    Without them it fits; with them it would not."""
    dims, wb = dummy("facebook/opt-175b")
    pl = cm.Placement(1.0, False, 1, 32, kv_bits=4)
    mem = cm.gpu_memory(dims, wb, W, pl, h200.gpu_bytes)
    assert cm.fits(dims, wb, W, pl, h200)
    assert mem.total + qkv_copies(dims, wb, pl) > h200.gpu_bytes


def test_t2_placement_that_ran_on_the_h200_fits(h200):
    dims, wb = dummy("facebook/opt-30b")
    assert cm.fits(dims, wb, W, cm.Placement(1.0, False, 1, 128), h200)


def test_every_item_adds_up_and_the_margin_is_stated_once(h200):
    dims, wb = dummy("facebook/opt-30b")
    mem = cm.gpu_memory(dims, wb, W, cm.Placement(0.5, False, 2, 64), h200.gpu_bytes)
    assert sum(mem.breakdown().values()) == pytest.approx(mem.total)
    assert mem.total == pytest.approx(mem.peak_allocated + sum(mem.outside.values()))
    assert mem.outside["margin"] == pytest.approx(
        memory_model.GPU_MARGIN_SHARE * h200.gpu_bytes + memory_model.GPU_MARGIN_BYTES)
    assert mem.outside["CUDA context"] == memory_model.CUDA_CONTEXT_BYTES
    assert mem.outside["allocator reserve"] == pytest.approx(
        memory_model.ALLOCATOR_RESERVE_SHARE * sum(mem.peak_working_set.values()))


def test_prefill_working_set_grows_with_the_chunk_not_the_batch(h200):
    """Prompts are prefilled in chunks of whole prompts, up to a group's slots x (prompt +
    generation) tokens (compute_node/runner.py)."""
    dims, wb = dummy("facebook/opt-30b")
    one, four = (cm.gpu_memory(dims, wb, W, cm.Placement(1.0, True, m, 128), h200.gpu_bytes) for m in (1, 4))
    per_row = memory_model.activation_bytes_per_row(dims)
    assert one.prefill["activations"] == 128 * 512 * per_row  # every prompt: the batch is the cap
    assert four.prefill["activations"] == 34 * 512 * per_row  # 32 slots x 544 tokens hold 34 prompts
    assert one.prefill["hidden states"] == four.prefill["hidden states"]  # every micro-batch's, alive at once
    assert one.peak_phase == "prefill"


def test_mlp_intermediates_follow_the_family(h200):
    """Gated MLPs hold three ffn-wide tensors at their peak, relu fused into the matmul one."""
    opt, _ = dummy("facebook/opt-30b")
    llama, _ = dummy("meta-llama/Llama-2-70b-hf")
    bloom, _ = dummy("bigscience/bloom-7b1")
    assert memory_model._mlp_width(opt) == opt.ffn + opt.hidden
    assert memory_model._mlp_width(llama) == 3 * llama.ffn
    assert memory_model._mlp_width(bloom) == 2 * bloom.ffn


def test_a_quantized_gpu_cache_costs_its_quantizer_at_prefill_and_nothing_rebuilt_at_decode(h200):
    dims, wb = dummy("facebook/opt-175b")
    pl = cm.Placement(0.0, False, 8, 96, kv_bits=4)
    q = cm.gpu_memory(dims, wb, W, pl, h200.gpu_bytes)
    plain = cm.gpu_memory(dims, wb, W, dataclasses.replace(pl, kv_bits=16), h200.gpu_bytes)
    rows = 12 * 512  # the chunk: 12 prompts, as many as 12 slots x 544 tokens hold
    assert q.prefill["activations"] == rows * max(memory_model.activation_bytes_per_row(dims),
                                                  memory_model.quantize_bytes_per_row(dims))
    # the fused decode attention reads the codes where they lie: the same step as a plain cache's
    assert q.decode == plain.decode
    assert q.decode["attention partials"] == memory_model.ATTENTION_SPLITS * 12 * dims.num_heads * (dims.head_dim + 2) * 4


def test_decode_graph_pools_only_where_graphs_run(h200):
    dims, wb = dummy("facebook/opt-30b")
    graphs = cm.gpu_memory(dims, wb, W, cm.Placement(1.0, False, 2, 128), h200.gpu_bytes)
    assert graphs.outside["decode graph pools"] > 0
    quantized = cm.gpu_memory(dims, wb, W, cm.Placement(1.0, False, 2, 128, kv_bits=8), h200.gpu_bytes)
    assert quantized.outside["decode graph pools"] > 0  # the fused attention reads a quantized cache in place
    for pl in (cm.Placement(0.9, False, 2, 128), cm.Placement(1.0, True, 2, 128)):
        assert "decode graph pools" not in cm.gpu_memory(dims, wb, W, pl, h200.gpu_bytes).outside
    # a pool per bucket of rows (1, 2, 4, ..., 128); up to FUSED_INT4_MAX_ROWS the graphs
    # read packed layers (the fused INT4 kernels, in chunks of 64 rows); a 512-row graph
    # holds dense layer copies
    assert memory_model.graph_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert memory_model.graph_buckets(80) == [1, 2, 4, 8, 16, 32, 64, 80]
    dense = 2 * wb.layer_params  # one dense copy of a layer: the cache is on the GPU
    fused = cm.gpu_memory(dims, wb, W, cm.Placement(1.0, False, 1, 128), h200.gpu_bytes)
    assert 0 < fused.outside["decode graph pools"] < dense / 4
    short = cm.Workload(8, 8)  # short sequences: 512 of them fit
    wide = cm.gpu_memory(dims, wb, short, cm.Placement(1.0, False, 1, 512), h200.gpu_bytes)
    assert dense < wide.outside["decode graph pools"] < 1.5 * dense


def test_dummy_layers_count_as_a_converted_models_layers():
    dims = dims_for(shapes.config_for("facebook/opt-30b"))
    dummy, converted = cm.estimate_weight_bytes(dims, 4, dummy=True), cm.estimate_weight_bytes(dims, 4)
    assert dummy.layer == converted.layer and dummy.total == converted.total


@pytest.mark.parametrize("name", ["facebook/opt-30b", "facebook/opt-175b", "meta-llama/Llama-3.1-405B"])
@pytest.mark.parametrize("kv", [None, True])
def test_the_planners_choice_never_asks_for_more_than_the_device(h200, name, kv):
    dims, wb = dummy(name)
    got = planner.plan(dims, lambda bits: wb, W, h200, planner.Fixed(kv_on_host=kv, quant_bits=4, kv_bits=None,
                                                                     disk_weight_share=None))
    for c in (planner.Choice(got.placement, got.prediction), *got.alternatives):
        assert c.prediction.gpu_bytes_needed <= h200.gpu_bytes
        assert c.prediction.gpu_peak_allocated + memory_model.margin(h200.gpu_bytes) <= h200.gpu_bytes
        assert c.prediction.host_bytes_needed <= h200.host_bytes


def test_llama_3_1_405b_is_larger_than_the_gpu_and_the_host():
    dims, wb = dummy("meta-llama/Llama-3.1-405B")
    assert (dims.num_layers, dims.hidden, dims.ffn, dims.num_heads, dims.kv_heads, dims.vocab) == (
        126, 16384, 53248, 128, 8, 128256)
    assert not dims.tied_head and dims.position_rows == 0 and dims.max_positions == 131072
    assert 230e9 < wb.total < 240e9  # INT4 in groups of 64
    cfg = shapes.config_for("meta-llama/Llama-3.1-405B")
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0


def test_llama_3_1_405b_plans_layers_on_the_gpu_and_in_host_memory(h200):
    """Neither the H200 nor its 125 GiB of host memory holds the model alone; the two
    together do, with one dense layer copy at a time on the GPU and the dummy embeddings
    and head made only there: the plan splits the layers between them, none on disk."""
    dims, wb = dummy("meta-llama/Llama-3.1-405B")
    got = planner.plan(dims, lambda bits: wb, W, h200, planner.Fixed(quant_bits=4, disk_weight_share=None))
    L = dims.num_layers
    resident, host, disk = got.placement.layer_counts(L)
    assert resident > 0 and host > 0 and disk == 0
    assert got.prediction.fits(h200) and got.prediction.decode_binding == "PCIe weights"
    assert got.prediction.host_breakdown["weights"] == pytest.approx(host * wb.layer)  # no embeddings, no head
    fewer = dataclasses.replace(got.placement, gpu_weight_share=(resident - 1) / L)
    assert not cm.fits(dims, wb, W, fewer, h200)  # one layer more in host memory: it is short


def test_host_memory_leaves_the_os_its_reserve(h200):
    """A profile's host_bytes is the machine's whole RAM: the plan leaves HOST_OS_RESERVE
    to the kernel and the system beyond what the processes hold. T1 at B=159 ran on the
    H200 with the processes at 123.8 GiB of 125.9: the model covers that peak (less the
    dummy embeddings and head the weight store then held too, which it no longer does),
    and with the reserve T1's planned batch stays within a few sequences of it."""
    dims, wb = dummy("facebook/opt-30b")
    _, host = cm.memory(dims, wb, W, cm.Placement(1.0, True, 2, 159), h200.gpu_bytes)
    assert host["OS reserve"] == memory_model.HOST_OS_RESERVE >= 2 * GIB
    assert sum(host.values()) - host["OS reserve"] >= 123.8 * GIB - wb.other
    t1 = planner.plan(dims, lambda bits: wb, W, h200, planner.Fixed(kv_on_host=True, quant_bits=4))
    assert 152 <= t1.placement.batch_size <= 159  # at most the batch that ran
    for kv in (None, True):  # every plan leaves it
        got = planner.plan(dims, lambda bits: wb, W, h200, planner.Fixed(kv_on_host=kv, quant_bits=4))
        assert got.prediction.host_bytes_needed <= h200.host_bytes
        assert got.prediction.host_breakdown["OS reserve"] == memory_model.HOST_OS_RESERVE

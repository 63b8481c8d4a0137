"""The cost model alone (no torch): monotonicity, binding terms, memory, the floor."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib

import pytest

from strata.model import shapes
from strata.model.arch import dims_for
from strata.policy import cost_model as cm
from strata.policy import floor as fl
from strata.policy import hardware

PROFILE = pathlib.Path(__file__).parents[3] / "bench" / "profiles" / "nvidia-h100-x1.json"


@pytest.fixture(scope="module")
def h100() -> hardware.HardwareProfile:
    return hardware.load(PROFILE)


def opt(name: str = "facebook/opt-30b", bits: int = 4):
    dims = dims_for(shapes.config_for(name))
    return dims, cm.estimate_weight_bytes(dims, bits)


W = cm.Workload(prompt_len=512, gen_len=32)


def test_more_gpu_share_never_predicts_slower_decode_when_pcie_binds(h100):
    dims, wb = opt()
    for kv_on_host in (False, True):
        for m in (1, 2, 4):
            steps = [cm.predict(dims, wb, W, cm.Placement(k / 48, kv_on_host, m, 8), h100).decode_step_s
                     for k in range(49)]
            assert all(b <= a + 1e-12 for a, b in zip(steps, steps[1:]))
            assert steps[-1] < steps[0]
    first = cm.predict(dims, wb, W, cm.Placement(0.0, False, 1, 8), h100)
    assert first.decode_binding == "PCIe weights"


def test_more_gpu_share_never_predicts_slower_total(h100):
    dims, wb = opt("facebook/opt-175b")
    for kv_on_host in (False, True):
        totals = [cm.predict(dims, wb, W, cm.Placement(k / 96, kv_on_host, 2, 4), h100).total_tokens_per_s
                  for k in range(97)]
        assert all(b >= a - 1e-9 for a, b in zip(totals, totals[1:]))


def test_more_host_kv_bandwidth_never_predicts_slower(h100):
    dims, wb = opt()
    for m in (1, 2, 8):
        pl = cm.Placement(1.0, True, m, 64)
        rates = [cm.predict(dims, wb, W, pl, dataclasses.replace(h100, cpu_attention_bytes_per_s=bw)).decode_s
                 for bw in (10e9, 40e9, 85e9, 200e9, 1e12)]
        assert all(b <= a for a, b in zip(rates, rates[1:]))


def test_more_pcie_bandwidth_never_predicts_slower(h100):
    dims, wb = opt()
    pl = cm.Placement(0.25, False, 2, 16)
    times = [cm.predict(dims, wb, W, pl, dataclasses.replace(h100, h2d_pinned=bw)).decode_s
             for bw in (8e9, 25e9, 54.7e9, 100e9)]
    assert all(b <= a for a, b in zip(times, times[1:]))


def test_binding_terms_name_the_limit(h100):
    dims, wb = opt()
    assert cm.predict(dims, wb, W, cm.Placement(1.0, True, 1, 128), h100).decode_binding == "CPU KV read"
    assert cm.predict(dims, wb, W, cm.Placement(1.0, False, 1, 32), h100).decode_binding == "HBM"
    assert cm.predict(dims, wb, W, cm.Placement(1.0, False, 1, 32), h100).prefill_binding == "GPU FLOPs"
    tiny = cm.Workload(prompt_len=8, gen_len=4)
    assert cm.predict(dims, wb, tiny, cm.Placement(0.0, False, 1, 1), h100).prefill_binding == "PCIe weights"
    small, small_wb = opt("facebook/opt-1.3b")
    rpc_bound = cm.predict(small, small_wb, tiny, cm.Placement(1.0, True, 8, 8), h100)
    assert rpc_bound.decode_binding == "control overhead"


def test_disk_share_streams_at_disk_bandwidth_and_leaves_host_memory(h100):
    dims, wb = opt()
    host = cm.predict(dims, wb, W, cm.Placement(0.5, False, 1, 8), h100)
    disk = cm.predict(dims, wb, W, cm.Placement(0.5, False, 1, 8, disk_weight_share=0.25), h100)
    assert disk.decode_binding == "NVMe weights"
    assert disk.decode_step_s > host.decode_step_s * 5
    # 12 more layers leave the host tier (the staging slots are there already for the
    # GPU-resident layers, read once through them)
    assert host.host_bytes_needed - disk.host_bytes_needed == pytest.approx(12 * wb.layer)


def test_planner_puts_the_fewest_layers_on_disk_that_make_host_memory_fit(h100):
    import dataclasses

    from strata.policy import planner

    dims, wb = opt()
    need = wb.total + cm.HOST_HEADROOM + cm.HOST_OS_RESERVE
    small = dataclasses.replace(h100, host_bytes=need - 20 * wb.layer)  # 20 layers too many for the host
    fixed = planner.Fixed(kv_on_host=False, batch_size=8, micro_batches=1, gpu_weight_share=0.0,
                          disk_weight_share=None)
    result = planner.plan(dims, lambda b: wb, W, small, fixed)
    _, _, disk_n = result.placement.layer_counts(dims.num_layers)
    assert disk_n == 23  # 20 plus room for the 3 staging slots
    assert result.prediction.host_bytes_needed <= small.host_bytes
    assert result.prediction.decode_binding == "NVMe weights"
    with pytest.raises(Exception) as e:
        planner.plan(dims, lambda b: wb, W, small, dataclasses.replace(fixed, disk_weight_share=0.0))
    assert "host memory" in str(e.value)


def test_memory_counts_what_the_engine_holds(h100):
    dims, wb = opt()
    pl = cm.Placement(0.5, False, 2, 16)
    gpu, host = cm.memory(dims, wb, W, pl, h100.gpu_bytes)
    kv = 16 * (512 + 32) * cm.kv_bytes_per_token_layer(dims) * 48
    assert gpu["KV"] == kv and host["KV"] == 0
    assert gpu["resident weights"] == pytest.approx(24 * wb.layer + wb.other)
    assert gpu["layer ring"] == pytest.approx(3 * wb.layer)  # three packed slots
    # one dense copy of a layer at a time with the cache on the GPU; with the KV store's,
    # layer i-1's waits for its attention while layer i is dequantized
    assert gpu["prefill: dense layer copies"] == pytest.approx(2 * wb.layer_params)
    # the weight store holds the streamed layers, not the 24 resident ones (read once
    # through the staging slots)
    assert host["weights"] == pytest.approx(wb.total - 24 * wb.layer)
    assert host["staging"] == pytest.approx(3 * wb.layer)
    on_host = cm.memory(dims, wb, W, dataclasses.replace(pl, kv_on_host=True), h100.gpu_bytes)
    assert "KV" not in on_host[0] and on_host[1]["KV"] == kv
    assert on_host[0]["prefill: dense layer copies"] == pytest.approx(2 * (2 * wb.layer_params))
    # a quantized GPU cache: codes plus an fp16 scale and min per group of 64
    q4 = cm.memory(dims, wb, W, dataclasses.replace(pl, kv_bits=4), h100.gpu_bytes)[0]["KV"]
    assert q4 == pytest.approx(kv * (0.5 + 4 / 64) / 2)
    pred = cm.predict(dims, wb, W, pl, h100)
    assert pred.gpu_bytes_needed == pytest.approx(sum(gpu.values()))


def test_kv_group_size_is_the_placements_not_a_constant():
    dims, _ = opt()
    assert cm.kv_bytes_per_token_layer(dims, 4) == cm.kv_bytes_per_token_layer(dims, 4, 64)
    # groups of 128 (the whole head): half the scales and mins
    per_vector = {g: cm.kv_bytes_per_token_layer(dims, 4, g) / (2 * dims.kv_heads) for g in (32, 64, 128)}
    assert per_vector == {32: 64 + 4 * 4, 64: 64 + 4 * 2, 128: 64 + 4}
    assert cm.default_kv_group(128) == 64 and cm.default_kv_group(80) == 80


def test_kv_group_matches_the_kv_quant_format():
    pytest.importorskip("torch")
    from strata.model.kv_quant import KVFormat, default_group

    dims, _ = opt()
    for head_dim in (64, 80, 128, 256):
        assert cm.default_kv_group(head_dim) == default_group(head_dim)
    for bits, group in ((8, 64), (4, 64), (4, 32), (4, 128)):
        fmt = KVFormat(bits, dims.head_dim, group)
        assert cm.kv_bytes_per_token_layer(dims, bits, group) == 2 * dims.kv_heads * fmt.vector_bytes


@pytest.mark.parametrize("share", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("batch", [1, 8, 32, 64, 128])
@pytest.mark.parametrize("m", [1, 4])
def test_t1_prediction_is_at_most_the_floor(h100, share, batch, m):
    """DESIGN T1: OPT-30B INT4, all KV in host memory: never faster than strata/policy/floor.py."""
    dims, wb = opt()
    pred = cm.predict(dims, wb, W, cm.Placement(share, True, m, batch), h100)
    f = fl.floor(dims, fl.Workload(batch, 512, 32),
                 fl.Placement(wb.total, share, True, fl.kv_bytes_per_token(dims)), h100.to_hardware())
    assert pred.total_tokens_per_s <= f["tokens_per_s"]
    assert pred.prefill_s >= f["prefill_s"] and pred.decode_s >= f["decode_s"]


def test_estimate_weight_bytes_matches_the_dummy_manifest():
    pytest.importorskip("transformers")
    from tools.dummy.manifest import dummy_manifest

    for name, bits in (("facebook/opt-1.3b", 4), ("facebook/opt-1.3b", 16), ("bigscience/bloom-560m", 8),
                       ("meta-llama/Llama-2-7b-hf", 4)):  # an untied head and no position table
        m = dummy_manifest(name, bits, 64)
        dims = dims_for(m.config)
        exact = cm.weight_bytes_from_shards({k: s.size for k, s in m.shards.items()}, dims, bits)
        guess = cm.estimate_weight_bytes(dims, bits)
        assert guess.total == pytest.approx(exact.total, rel=0.01)
        assert guess.layer == pytest.approx(exact.layer, rel=0.01)


def test_profile_json_round_trip_and_staleness(tmp_path, h100):
    path = hardware.save(h100, tmp_path / "p.json")
    assert hardware.load(path) == h100
    fresh = dataclasses.replace(h100, measured_at=hardware.today())
    assert not fresh.is_stale()
    now = datetime.datetime.fromisoformat(fresh.measured_at) + datetime.timedelta(days=31)
    assert fresh.is_stale(now)
    assert h100.to_hardware().pcie_bytes_per_s == 54.7e9
    assert "DESIGN.md" in h100.source


def test_profile_with_unknown_fields_is_an_invalid_argument(tmp_path):
    from strata.runtime.errors import ErrorKind, StrataError

    (tmp_path / "bad.json").write_text('{"machine": "x", "measured_at": "2026-01-01", "warp_drive": 1}')
    with pytest.raises(StrataError) as e:
        hardware.load(tmp_path / "bad.json")
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT and "warp_drive" in e.value.message



def test_fused_int4_decode_reads_packed_layers_when_turned_on(h100, monkeypatch):
    """With the fused decode on, a resident INT4 layer at few rows costs its packed
    bytes at the kernel's rate instead of a dequant plus a dense read: faster at 64
    rows per micro-batch, unchanged for streamed layers and for prefill."""
    dims, wb = opt()
    pl = cm.Placement(1.0, False, 1, 64)
    w = cm.Workload(512, 32, 64)
    streamed = cm.Placement(0.0, False, 1, 64)
    monkeypatch.setattr(cm, "FUSED_INT4_MAX_ROWS", 0)
    off, streamed_off = cm.predict(dims, wb, w, pl, h100), cm.predict(dims, wb, w, streamed, h100)
    monkeypatch.setattr(cm, "FUSED_INT4_MAX_ROWS", 64)
    on = cm.predict(dims, wb, w, pl, h100)
    assert on.decode_step_s < off.decode_step_s and on.prefill_s == off.prefill_s
    assert cm.predict(dims, wb, w, streamed, h100).decode_s == pytest.approx(streamed_off.decode_s)
    many = cm.Placement(1.0, False, 1, 128)  # 128 rows: above the fused kernel's range
    monkeypatch.setattr(cm, "FUSED_INT4_MAX_ROWS", 0)
    base = cm.predict(dims, wb, cm.Workload(512, 32, 128), many, h100).decode_s
    monkeypatch.setattr(cm, "FUSED_INT4_MAX_ROWS", 64)
    assert cm.predict(dims, wb, cm.Workload(512, 32, 128), many, h100).decode_s == base


def test_host_kv_round_trips_overlap_from_two_micro_batches(h100):
    """KV in the KV store: with one micro-batch its whole round trip is exposed; with two
    or more (the engine's wavefront) one per layer is. The KV store serves one call at a
    time, so each micro-batch adds its call's fixed cost."""
    dims, wb = opt()
    terms = {m: cm._pass_terms(dims, wb, cm.Placement(1.0, True, m, 128), h100, 1, 528, False) for m in (1, 2, 4)}
    over = {m: t["control overhead"] for m, t in terms.items()}
    assert over[1] > over[2] > 0 and over[2] == pytest.approx(over[4])
    calls = {m: t["KV store calls"] for m, t in terms.items()}
    assert calls[4] == pytest.approx(2 * calls[2]) == pytest.approx(4 * calls[1])


def test_t1_keeps_two_micro_batches_with_the_fused_kernels_rate(h100):
    """Issue 21: with the wgmma kernel's rate at 33-64 rows, T1 (B=159, KV in the KV
    store) still predicts 2 micro-batches best, as measured (runs 29, 48, 51)."""
    dims, wb = opt()
    tps = {m: cm.predict(dims, wb, W, cm.Placement(1.0, True, m, 159), h100).total_tokens_per_s for m in (1, 2, 4, 8)}
    assert max(tps, key=tps.get) == 2


def test_cpu_attention_uses_the_profiles_rate_for_the_caches_bits(h100):
    """The profile measures the KV store's kernel per cache precision; the cost model
    reads each, and derives a missing one from the bf16 rate."""
    dims, wb = opt()
    pl = cm.Placement(1.0, True, 2, 128, kv_bits=4)
    derived = cm.predict(dims, wb, W, pl, h100).decode_s
    measured = dataclasses.replace(h100, cpu_attention_int4_bytes_per_s=200e9)
    assert cm.cpu_attention_s(measured, 4, 1e9, 3.6e9) == pytest.approx(1e9 / 200e9)  # stored bytes, its rate
    # not measured: the bf16 bytes at the bf16 rate times the quantized kernel's measured speed-up
    assert cm.cpu_attention_s(h100, 4, 1e9, 3.6e9) == pytest.approx(3.6e9 / (h100.cpu_attention_bytes_per_s * 1.29))
    assert cm.predict(dims, wb, W, pl, measured).decode_s < derived
    bf16 = cm.Placement(1.0, True, 2, 128)
    assert cm.predict(dims, wb, W, bf16, measured).decode_s == cm.predict(dims, wb, W, bf16, h100).decode_s


def test_streamed_layers_overlap_resident_layers_work(h100):
    """Resident layers are spread through the model, so a pass is bound by its busiest
    chain: PCIe when most layers stream, the GPU's work when few do."""
    dims, wb = opt("facebook/opt-175b")
    w = cm.Workload(512, 32, 16)
    load = wb.layer / (h100.h2d_pinned * cm.STREAM_EFFICIENCY)
    for share, bound in ((0.0, "PCIe weights"), (0.5, "PCIe weights")):
        pl = cm.Placement(share, False, 1, 16, kv_bits=4)
        pred = cm.predict(dims, wb, w, pl, h100)
        streamed = pl.layer_counts(96)[1]
        assert pred.decode_binding == bound
        assert pred.decode_step_s == pytest.approx(streamed * load, rel=0.05)


def test_dummy_resident_layers_are_made_on_the_gpu_only_without_a_disk_tier(h100):
    """`--dummy` resident layers are made on the GPU (no staging slots) only where no layer
    is on disk; with a disk tier the bench runs a dummy directory and reads them once
    through the staging slots. Either way they hold their shard's bytes and no more."""
    dims = dims_for(shapes.config_for("meta-llama/Llama-3.1-405B"))
    wb = cm.estimate_weight_bytes(dims, 4, 64, dummy=True)
    L = dims.num_layers
    no_disk = cm.memory_shape(dims, wb, W, cm.Placement(40 / L, False, 1, 8))
    disk = cm.memory_shape(dims, wb, W, cm.Placement(40 / L, False, 1, 8, disk_weight_share=10 / L))
    assert not no_disk.resident_from_files and disk.resident_from_files
    gpu_no_disk = cm.gpu_memory(dims, wb, W, cm.Placement(40 / L, False, 1, 8), h100.gpu_bytes)
    assert gpu_no_disk.held["resident weights"] == pytest.approx(40 * wb.layer + wb.other)
    assert "layer ring" in gpu_no_disk.held and "resident q/k/v copies" not in gpu_no_disk.held


def test_a_prefill_budget_overlaps_prefill_with_decode_only_where_the_kv_store_attends():
    h200 = hardware.load(PROFILE.with_name("nvidia-h200.json"))
    dims, wb = opt()
    w = cm.Workload(512, 32, 159)
    for kv_on_host in (True, False):
        base = cm.Placement(1.0, kv_on_host, 2, 159, kv_bits=16)
        none = cm.predict(dims, wb, w, base, h200)
        # a budget the whole batch fits changes nothing
        same = cm.predict(dims, wb, w, dataclasses.replace(base, prefill_tokens_per_pass=159 * 512), h200)
        assert (same.prefill_s, same.decode_s) == (none.prefill_s, none.decode_s)
        waves = cm.predict(dims, wb, w, dataclasses.replace(base, prefill_tokens_per_pass=8 * 512), h200)
        assert waves.prefill_s < none.prefill_s / 10  # the first pass prefills 8 of the 159 prompts
        if kv_on_host:  # the KV store's attention runs while the GPU prefills the later waves
            assert waves.total_tokens_per_s > 1.03 * none.total_tokens_per_s
            assert waves.prefill_s + waves.decode_s > max(none.prefill_s, none.decode_s)
        else:  # one GPU does both, one after the other, and reads its weights in more passes
            assert waves.total_tokens_per_s < none.total_tokens_per_s

"""`strata bench` on a tiny built-in shape through the three processes: the JSON
line carries the fields DESIGN.md asks for, and the numbers are consistent."""

import json

import pytest

from serving import strata

FIELDS = {"case", "model", "batch_size", "placement", "prefill_s", "decode_s", "total_tokens_per_s",
          "decode_tokens_per_s", "peak_gpu_bytes", "peak_host_bytes", "floor_tokens_per_s", "device",
          "measured_over_floor", "date", "command"}


@pytest.mark.parametrize("flags", [[], ["--kv-offload", "--micro-batches", "2", "--gpu-weight-share", "0.5"]],
                         ids=["resident-kv-local", "streamed-kv-offload"])
def test_bench_prints_one_json_line_with_the_design_fields(flags):
    out = strata("bench", "--model", "facebook/opt-125m", "--dummy", "--batch-size", "3", "--prompt-len", "16",
                 "--gen-len", "4", "--device", "cpu", "--json", "--no-warmup", *flags, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert FIELDS <= set(r)
    assert r["case"] is None and r["model"] == "facebook/opt-125m" and r["batch_size"] == 3
    assert r["prefill_s"] > 0 and r["decode_s"] > 0
    assert r["total_tokens_per_s"] == pytest.approx(3 * 4 / (r["prefill_s"] + r["decode_s"]), rel=0.02)
    assert r["peak_host_bytes"] > 0
    assert r["placement"]["weights"]["gpu_share"] == (0.5 if flags else 1.0)


def test_bench_names_the_design_cases():
    from deploy.bench import BenchArgs, case_of

    base = dict(dummy=True, batch_size=8, prompt_len=512, gen_len=32, quant_bits=4, group_size=64,
                gpu_weight_share=1.0, micro_batches=1, device="cuda", kv_capacity_gb=64)
    assert case_of(BenchArgs(model="facebook/opt-30b", kv_offload=True, **base)) == "T1"
    assert case_of(BenchArgs(model="facebook/opt-30b", kv_offload=False, **base)) == "T2"
    assert case_of(BenchArgs(model="facebook/opt-175b", kv_offload=False, **base)) == "T3"
    assert case_of(BenchArgs(model="bigscience/bloom-7b1", kv_offload=False, **base)) is None


def test_unknown_shape_is_a_clear_error():
    out = strata("bench", "--model", "facebook/opt-7t", "--dummy", "--device", "cpu", "--json")
    assert out.returncode == 1 and "unknown model shape" in out.stderr


def test_without_placement_flags_the_planner_places_a_gpu_run():
    import argparse
    import pathlib

    from deploy.bench import planned

    profile = pathlib.Path(__file__).resolve().parents[2] / "bench/profiles/nvidia-h100-x1.json"
    ns = argparse.Namespace(model="facebook/opt-30b", quant_bits=4, group_size=64, kv_offload=True, batch_size=None,
                            prompt_len=512, gen_len=32, profile=str(profile), kv_bits=16)
    fields, prediction = planned(ns)
    assert fields["kv_offload"] is True and 0 < fields["gpu_weight_share"] <= 1
    assert fields["batch_size"] >= 1 and fields["micro_batches"] >= 1
    assert prediction["total_tokens_per_s"] > 0 and prediction["profile"] == str(profile)


def test_bench_disk_offload_writes_dummy_shards_once_and_reports_the_disk_floor(tmp_path):
    """--dummy --disk-offload: random shards written to --offload-dir (reused by the
    second run), streamed layers read from disk every pass under a host budget
    smaller than the shards."""
    flags = ["--model", "facebook/opt-125m", "--dummy", "--batch-size", "2", "--prompt-len", "8", "--gen-len", "3",
             "--device", "cpu", "--json", "--no-warmup", "--disk-offload", "--offload-dir", str(tmp_path),
             "--host-budget-gb", "0.1", "--disk-read-gbps", "2"]
    shards = tmp_path / "offload" / "facebook--opt-125m-q4g64"
    reports, written = [], []
    for _ in range(2):
        out = strata("bench", *flags, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        reports.append(json.loads(out.stdout.strip().splitlines()[-1]))
        written.append({p.name: p.stat().st_mtime_ns for p in shards.iterdir()})
    assert written[0] == written[1]  # the second run reused the shards
    files = sorted(p.name for p in shards.iterdir())
    assert "manifest.json" in files and len(files) == 12 + 2 + 1
    assert not [p for p in tmp_path.joinpath("offload").iterdir() if p.name.startswith(".")]  # no partial dirs
    w = reports[1]["placement"]["weights"]
    assert w["gpu_share"] == 0.0 and w["host_budget_bytes"] == int(0.1 * 2**30)
    assert 0 < w["disk_layers_per_pass"] < 12  # the budget caches some layers, the rest stay on disk
    assert w["disk_bytes_per_pass"] > 0 and reports[1]["floor_disk_read_bytes_per_s"] == 2e9
    assert reports[1]["total_tokens_per_s"] > 0


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_the_planners_disk_layers_become_a_host_budget_that_leaves_exactly_them_on_disk(share):
    from deploy.bench import BenchArgs, _budget_for_disk_layers, _disk_bytes_per_pass, _manifest

    a = BenchArgs(model="facebook/opt-125m", dummy=True, batch_size=2, prompt_len=8, gen_len=2, kv_offload=False,
                  quant_bits=4, group_size=64, gpu_weight_share=share, micro_batches=1, device="cpu",
                  kv_capacity_gb=0, disk_layers=4)
    m = _manifest(a)
    planned = _budget_for_disk_layers(a, m)
    assert planned.host_budget_gb > 0
    layers, nbytes = _disk_bytes_per_pass(planned, m)
    assert layers == 4 and nbytes == 4 * m.shards["layer.11"].size  # the last 4 streamed layers, all alike


def test_the_warm_up_takes_the_timed_kv_length_only_where_decode_graphs_run():
    import dataclasses

    from deploy.bench import BenchArgs, _decode_graphs_apply

    base = dict(model="facebook/opt-30b", dummy=True, batch_size=64, prompt_len=512, gen_len=32, quant_bits=4,
                group_size=64, micro_batches=1, kv_capacity_gb=0)
    t2 = BenchArgs(kv_offload=False, gpu_weight_share=1.0, device="cuda", **base)
    assert _decode_graphs_apply(t2)
    assert not _decode_graphs_apply(dataclasses.replace(t2, device="cpu"))
    assert not _decode_graphs_apply(dataclasses.replace(t2, kv_offload=True))  # T1: KV in the KV store
    assert not _decode_graphs_apply(dataclasses.replace(t2, gpu_weight_share=0.0))  # T3: layers streamed
    assert not _decode_graphs_apply(dataclasses.replace(t2, kv_bits=4))
    assert not _decode_graphs_apply(dataclasses.replace(t2, decode_graphs=False))

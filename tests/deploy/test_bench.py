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
                            prompt_len=512, gen_len=32, profile=str(profile))
    fields, prediction = planned(ns)
    assert fields["kv_offload"] is True and 0 < fields["gpu_weight_share"] <= 1
    assert fields["batch_size"] >= 1 and fields["micro_batches"] >= 1
    assert prediction["total_tokens_per_s"] > 0 and prediction["profile"] == str(profile)

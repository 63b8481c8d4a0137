"""`strata bench` on a tiny built-in shape through the three processes: the JSON
line carries the fields DESIGN.md asks for, and the numbers are consistent."""

import json

import pytest

from serving import strata

FIELDS = {"case", "model", "batch_size", "placement", "prefill_s", "decode_s", "total_tokens_per_s",
          "decode_tokens_per_s", "peak_gpu_bytes", "peak_host_bytes", "floor_tokens_per_s", "device",
          "measured_over_floor", "date", "command"}


@pytest.mark.parametrize("flags", [[], ["--kv-offload", "--micro-batches", "2", "--gpu-weight-share", "0.5",
                                    "--prefill-tokens-per-pass", "16"]],
                         ids=["resident-kv-local", "streamed-kv-offload-prefill-budget"])
def test_bench_prints_one_json_line_with_the_design_fields(flags):
    out = strata("bench", "--model", "facebook/opt-125m", "--dummy", "--batch-size", "3", "--prompt-len", "16",
                 "--gen-len", "4", "--device", "cpu", "--json", "--no-warmup", "--batch-requests", "5", *flags,
                 timeout=600)
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
    # what the compute node reports it ran (its Stats), beside the run plan the services read
    assert r["placement"]["resident_layers"] == (6 if flags else 12) == len(r["run_plan"]["resident_layers"])
    assert r["run_plan"]["kv_home"] == ("kv_store" if flags else "gpu") and r["decode_graphs"] is False  # on the CPU
    assert r["placement"]["prefill_tokens_per_pass"] == r["run_plan"]["prefill_tokens_per_pass"] == (16 if flags else 0)
    assert r["w4a16_mma"] is False and r["w4a16_wgmma"] is False  # no CUDA kernel built on the CPU
    # the single call's passes as the compute node counted them: prefill, then 3 decode steps;
    # with a budget of one 16-token prompt a pass, the prompts join in the first three
    p = r["passes"]
    assert p["passes"] == (6 if flags else 4) and p["issue_s"] > 0 and p["wait_s"] >= 0 and p["host_s"] >= 0
    assert p["issue_s"] + p["wait_s"] + p["host_s"] <= r["client_wall_s"]
    # the offline job through the real `strata batch` process: every request answered in full
    b = r["batch"]
    assert (b["requests"], b["answered"], b["errors"], b["generated_tokens"]) == (5, 5, 0, 5 * 4)
    assert b["tokens_per_s"] == pytest.approx(20 / b["wall_s"], rel=0.02) and "5 answered" in b["summary"]


def test_bench_names_the_design_cases():
    from deploy.bench import BenchArgs, case_of

    base = dict(dummy=True, batch_size=8, prompt_len=512, gen_len=32, quant_bits=4, group_size=64,
                gpu_weight_share=1.0, micro_batches=1, device="cuda", kv_capacity_gb=64)
    assert case_of(BenchArgs(model="facebook/opt-30b", kv_offload=True, **base)) == "T1"
    assert case_of(BenchArgs(model="facebook/opt-30b", kv_offload=False, **base)) == "T2"
    assert case_of(BenchArgs(model="facebook/opt-175b", kv_offload=False, **base)) == "T3"
    assert case_of(BenchArgs(model="meta-llama/Llama-3.1-405B", kv_offload=False, **base)) == "T4"
    assert case_of(BenchArgs(model="bigscience/bloom-7b1", kv_offload=False, **base)) is None


def test_an_unknown_shape_or_a_negative_count_is_a_clear_error():
    out = strata("bench", "--model", "facebook/opt-7t", "--dummy", "--device", "cpu", "--json")
    assert out.returncode == 1 and "unknown model shape" in out.stderr
    for flag in ("--clients", "--batch-requests"):
        out = strata("bench", "--model", "facebook/opt-125m", "--dummy", "--device", "cpu", "--json", flag, "-2")
        assert out.returncode == 1 and f"{flag} must be 0 or more" in out.stderr and not out.stdout


def test_without_placement_flags_the_planner_places_a_gpu_run():
    import argparse
    import pathlib

    from deploy.bench_plan import planned

    profile = pathlib.Path(__file__).resolve().parents[2] / "bench/profiles/nvidia-h100-x1.json"
    ns = argparse.Namespace(model="facebook/opt-30b", quant_bits=4, group_size=64, kv_offload=True, batch_size=None,
                            prompt_len=512, gen_len=32, profile=str(profile), kv_bits=16)
    fields, prediction = planned(ns)
    assert fields["kv_offload"] is True and 0 < fields["gpu_weight_share"] <= 1
    assert fields["batch_size"] >= 1 and fields["micro_batches"] >= 1
    assert prediction["total_tokens_per_s"] > 0 and prediction["profile"] == str(profile)
    # the predicted allocated peak, to stand beside the measured peak_gpu_bytes
    assert 0 < prediction["peak_gpu_bytes"] < prediction["gpu_bytes_needed"] <= 80 * 2**30
    assert sum(prediction["gpu_breakdown"].values()) == pytest.approx(prediction["gpu_bytes_needed"], abs=64)


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
    assert "manifest.json" in files and "dummy-data.json" in files and len(files) == 12 + 2 + 2
    assert not [p for p in tmp_path.joinpath("offload").iterdir() if p.name.startswith(".")]  # no partial dirs
    w = reports[1]["placement"]["weights"]
    assert w["gpu_share"] == 0.0 and w["host_budget_bytes"] == int(0.1 * 2**30)
    assert 0 < w["disk_layers_per_pass"] < 12  # the budget caches some layers, the rest stay on disk
    assert w["disk_bytes_per_pass"] > 0 and reports[1]["floor_disk_read_bytes_per_s"] == 2e9
    assert reports[1]["total_tokens_per_s"] > 0


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_the_planners_disk_layers_are_the_last_streamed_ones_in_the_run_plan(share):
    from deploy.bench import BenchArgs, _disk_bytes_per_pass, _manifest, _run_plan

    a = BenchArgs(model="facebook/opt-125m", dummy=True, batch_size=2, prompt_len=8, gen_len=2, kv_offload=False,
                  quant_bits=4, group_size=64, gpu_weight_share=share, micro_batches=1, device="cpu",
                  kv_capacity_gb=0, disk_layers=4)
    m = _manifest(a)
    plan = _run_plan(a, m)
    assert plan.disk_layers == plan.streamed_layers[-4:] and not set(plan.disk_layers) & set(plan.resident_layers)
    layers, nbytes = _disk_bytes_per_pass(plan, m)
    assert layers == 4 and nbytes == 4 * m.shards["layer.11"].size  # the last 4 streamed layers, all alike


def test_the_warm_up_is_one_short_request_unless_switched_off():
    """The compute node keeps its slot caches and decode graphs for its life: a short
    request of the timed batch warms every placement up alike."""
    import dataclasses

    from deploy.bench import BenchArgs, _warmup_kind

    base = dict(model="facebook/opt-30b", dummy=True, batch_size=64, prompt_len=512, gen_len=32, quant_bits=4,
                group_size=64, micro_batches=1, kv_capacity_gb=0)
    t2 = BenchArgs(kv_offload=False, gpu_weight_share=1.0, device="cuda", **base)
    assert _warmup_kind(t2) == _warmup_kind(dataclasses.replace(t2, kv_offload=True)) == "short"
    assert _warmup_kind(dataclasses.replace(t2, warmup="none")) == "none"


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _t4_namespace(**kw):
    import argparse

    base = dict(model="meta-llama/Llama-3.1-405B", quant_bits=4, group_size=64, kv_offload=False, batch_size=None,
                prompt_len=512, gen_len=32, profile=str(ROOT / "bench/profiles/nvidia-h200.json"), kv_bits=16,
                dummy=True, offload_dir="")
    return argparse.Namespace(**{**base, **kw})


def test_a_dummy_run_plans_no_more_disk_layers_than_the_disk_holds(monkeypatch, tmp_path):
    """Llama-3.1-405B on an H200 with 110 GB of host memory: host memory short, so some
    layers stay on disk; a dummy run writes those first, so the plan keeps within the
    offload directory's free space, and with none it fails clearly. The H200's own 125
    GiB hold every layer the GPU does not: no disk layer to write."""
    from deploy import bench_plan
    from strata.runtime.errors import StrataError
    from weight_store import diskspace

    small = tmp_path / "small-host.json"
    small.write_text(json.dumps({**json.loads((ROOT / "bench/profiles/nvidia-h200.json").read_text()),
                                 "host_bytes": 110e9}))
    monkeypatch.setattr(diskspace, "disk_free_bytes", lambda path: 1e15)
    roomy, _ = bench_plan.planned(_t4_namespace(profile=str(small)))
    assert roomy["disk_layers"] > 20
    layer = 1.8e9
    monkeypatch.setattr(diskspace, "disk_free_bytes", lambda path: 2**30 + 20 * layer)
    tight, prediction = bench_plan.planned(_t4_namespace(profile=str(small)))
    assert 0 < tight["disk_layers"] <= 20 and prediction["gpu_bytes_needed"] <= 139.8 * 2**30
    monkeypatch.setattr(diskspace, "disk_free_bytes", lambda path: 0)
    with pytest.raises(StrataError) as e:
        bench_plan.planned(_t4_namespace(profile=str(small)))
    assert "at most 0 layers may stay on disk" in e.value.message
    h200, prediction = bench_plan.planned(_t4_namespace())
    assert h200["disk_layers"] == 0 and prediction["gpu_bytes_needed"] <= 139.8 * 2**30


def test_the_floor_comes_from_the_profile_and_names_it():
    import dataclasses
    import types

    from deploy.bench import BenchArgs, _report
    from strata.model.arch import dims_for
    from strata.model.shapes import config_for
    from strata.policy import hardware

    path = ROOT / "bench/profiles/nvidia-h200.json"
    h200 = hardware.load(path)
    a = BenchArgs(model="facebook/opt-30b", dummy=True, batch_size=64, prompt_len=512, gen_len=32, kv_offload=False,
                  quant_bits=4, group_size=64, gpu_weight_share=1.0, micro_batches=1, device="cpu", kv_capacity_gb=0)
    result = types.SimpleNamespace(prefill_s=3.0, decode_s=1.0, peak_gpu_bytes=0)
    dims = dims_for(config_for("facebook/opt-30b"))
    design = _report(a, dims, 17e9, (0, 0.0), result, 4.0, 1.0, 0)
    measured = _report(dataclasses.replace(a, profile=h200, profile_path=str(path)), dims, 17e9, (0, 0.0), result,
                       4.0, 1.0, 0)
    assert design["floor_profile"]["path"] is None and "DESIGN.md" in design["floor_profile"]["source"]
    assert measured["floor_profile"] == {"path": str(path), "machine": "nvidia-h200",
                                         "measured_at": h200.measured_at, "source": h200.source}
    # the floor is the model's over the profile's figures, not the H100 ones
    from deploy.bench import _kv_bytes_per_token
    from strata.policy import floor as fl

    placement = fl.Placement(17e9, 1.0, False, _kv_bytes_per_token(a, dims), 0.0)
    want = fl.floor(dims, fl.Workload(64, 512, 32), placement, h200.to_hardware())
    assert measured["floor_tokens_per_s"] == pytest.approx(want["tokens_per_s"], abs=0.01)
    assert measured["floor_tokens_per_s"] != design["floor_tokens_per_s"]


def test_a_run_is_predicted_for_the_placement_it_ran():
    from deploy.bench_plan import predict_run
    from strata.policy import hardware

    h200 = hardware.load(ROOT / "bench/profiles/nvidia-h200.json")
    run = {"model": "facebook/opt-30b", "batch_size": 158, "prompt_len": 512, "gen_len": 32,
           "placement": {"weights": {"gpu_share": 1.0, "quant_bits": 4, "group_size": 64, "disk_layers_per_pass": 0},
                         "kv": "host (KV store, CPU attention)", "kv_bits": 16, "micro_batches": 2}}
    p = predict_run(run, h200)
    # measured 123.83 tokens/s on the H200 (run 93, BENCHMARKS.md): within 20%
    assert 0.8 * 123.83 < p.total_tokens_per_s < 1.2 * 123.83
    assert p.decode_binding == "CPU KV read"
    # a run with a prefill budget is predicted with it: its first pass prefills 8 prompts
    budget = predict_run({**run, "placement": {**run["placement"], "prefill_tokens_per_pass": 8 * 512}}, h200)
    assert budget.prefill_s < p.prefill_s / 10 and budget.total_tokens_per_s != p.total_tokens_per_s


def test_only_the_shards_read_from_disk_every_pass_are_written_with_their_bytes():
    from deploy.bench import BenchArgs, _disk_shards, _manifest, _run_plan

    a = BenchArgs(model="facebook/opt-125m", dummy=True, batch_size=2, prompt_len=8, gen_len=2, kv_offload=False,
                  quant_bits=4, group_size=64, gpu_weight_share=0.5, micro_batches=1, device="cpu",
                  kv_capacity_gb=0, disk_layers=3)
    m = _manifest(a)
    shards = _disk_shards(_run_plan(a, m))
    assert len(shards) == 3 and all(s.startswith("layer.") for s in shards)  # not the resident layers


def test_the_warm_up_request_fits_the_slots_of_a_short_run(monkeypatch):
    """The slots hold prompt_len + gen_len tokens: the warm-up stays within both."""
    from deploy import bench
    from deploy.bench import BenchArgs

    sent = []
    monkeypatch.setattr(bench, "generate", lambda address, request, timeout: sent.append(request))
    for prompt_len, gen_len in ((512, 32), (8, 2), (4, 1)):
        a = BenchArgs(model="facebook/opt-125m", dummy=True, batch_size=3, prompt_len=prompt_len, gen_len=gen_len,
                      kv_offload=False, quant_bits=4, group_size=64, gpu_weight_share=1.0, micro_batches=1,
                      device="cpu", kv_capacity_gb=0)
        bench._warm_up(a, "unused")
        r = sent[-1]
        assert len(r.prompts) == 3 and all(len(p.ids.ids) <= prompt_len for p in r.prompts)
        assert r.max_new_tokens == min(bench.WARMUP_TOKENS, gen_len)

"""`strata plan` through the real CLI (subprocesses), and `plan --cases`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import socket

import pytest

from serving import strata
from strata.policy import hardware

ROOT = pathlib.Path(__file__).parents[2]
PROFILE = ROOT / "bench" / "profiles" / "nvidia-h100-x1.json"
GIB = 1 << 30


def test_plan_json_for_opt_30b_on_the_h100_profile():
    r = strata("plan", "--model", "facebook/opt-30b", "--prompt-len", "512", "--gen-len", "32",
               "--profile", str(PROFILE), "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["model"] == "facebook/opt-30b" and (out["prompt_len"], out["gen_len"]) == (512, 32)
    assert out["profile"]["machine"] == "nvidia-h100-x1"
    pl = out["placement"]
    assert 0 <= pl["gpu_weight_share"] <= 1 and pl["micro_batches"] in (1, 2, 4, 8) and pl["batch_size"] >= 1
    assert pl["quant_bits"] == 4
    assert out["total_tokens_per_s"] > 0 and out["prefill_s"] > 0 and out["decode_s"] > 0
    assert out["decode_binding"] in ("PCIe weights", "CPU KV read", "HBM", "GPU FLOPs", "control overhead")
    assert out["gpu_bytes_needed"] <= out["profile"]["gpu_bytes"]
    assert out["host_bytes_needed"] <= out["profile"]["host_bytes"]
    assert f"--batch-size {pl['batch_size']}" in out["bench_flags"]
    assert all(a["total_tokens_per_s"] <= out["total_tokens_per_s"] for a in out["alternatives"])


def test_plan_table_names_the_placement_and_the_bound():
    r = strata("plan", "--model", "facebook/opt-30b", "--prompt-len", "512", "--gen-len", "32", "--kv", "host",
               "--profile", str(PROFILE))
    assert r.returncode == 0, r.stderr
    assert "chosen" in r.stdout and "CPU KV read" in r.stdout and "host" in r.stdout
    assert "--kv-offload" in r.stdout  # the bench command that runs this placement


def test_kv_bits_auto_lets_the_plan_quantize_the_cache_and_a_bad_value_is_refused():
    r = strata("plan", "--model", "facebook/opt-175b", "--prompt-len", "512", "--gen-len", "32",
               "--kv-bits", "auto", "--profile", str(PROFILE), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["placement"]["kv_bits"] in (8, 4)
    assert f"--kv-bits {out['placement']['kv_bits']}" in out["bench_flags"]
    bad = strata("plan", "--model", "facebook/opt-30b", "--prompt-len", "512", "--gen-len", "32",
                 "--kv-bits", "5", "--profile", str(PROFILE))
    assert bad.returncode == 2 and "--kv-bits must be 16, 8, 4 or auto" in bad.stderr


def test_plan_that_cannot_fit_is_a_clear_error():
    r = strata("plan", "--model", "facebook/opt-175b", "--prompt-len", "512", "--gen-len", "32", "--quant-bits",
               "16", "--gpu-weight-share", "1", "--profile", str(PROFILE), "--json")
    assert r.returncode == 1 and r.stdout == ""
    assert "resource exhausted" in r.stderr and "GPU memory needs" in r.stderr and "short by" in r.stderr


def test_plan_uses_a_fresh_cached_profile_without_measuring(tmp_path):
    cached = dataclasses.replace(hardware.load(PROFILE), measured_at=hardware.today())
    hardware.save(cached, tmp_path / "strata" / f"profile-{socket.gethostname()}.json")
    r = strata("plan", "--model", "facebook/opt-1.3b", "--prompt-len", "64", "--gen-len", "8", "--batch-size", "4",
               "--json", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["profile"]["path"].startswith(str(tmp_path)) and out["placement"]["batch_size"] == 4


H200 = ROOT / "bench" / "profiles" / "nvidia-h200.json"


def test_plan_cases_predicts_each_design_case_with_its_bench_command():
    r = strata("plan", "--cases", "--profile", str(H200), "--json")
    assert r.returncode == 0, r.stderr
    cases = {c["case"]: c for c in map(json.loads, r.stdout.strip().splitlines())}
    assert list(cases) == ["T1", "T1 INT4 KV", "T2", "T3", "T4"]
    assert cases["T1"]["placement"]["kv_on_host"] and cases["T1"]["placement"]["kv_bits"] == 16
    assert cases["T1 INT4 KV"]["placement"]["kv_bits"] == 4
    # T4: larger than the GPU, split between it and host memory, nothing on disk
    t4_layers = cases["T4"]["layers"]
    assert cases["T4"]["model"] == "meta-llama/Llama-3.1-405B" and t4_layers["host"] > 0 and t4_layers["disk"] == 0
    for c in cases.values():
        assert c["gpu_peak_allocated_bytes"] < c["gpu_bytes_needed"] <= c["profile"]["gpu_bytes"]
        assert c["total_tokens_per_s"] > 0
        assert c["bench_command"].startswith(f"strata bench --model {c['model']} --dummy --prompt-len 512")
        assert f"--profile {H200}" in c["bench_command"]
    assert "--kv-offload" in cases["T1"]["bench_command"] and "--kv-bits auto" in cases["T3"]["bench_command"]
    # T4 leaves the cache's precision to the planner (a 16-bit cache pinned there took the
    # GPU memory of resident layers: 12/63/51 layers, 4.1 tokens/s)
    t4 = cases["T4"]
    assert "--kv-bits auto" in t4["bench_command"] and t4["placement"]["kv_bits"] < 16
    assert t4["total_tokens_per_s"] > 5 * 4.12
    assert t4["host_bytes_needed"] <= t4["profile"]["host_bytes"]


def test_plan_cases_t4_bench_command_parses_and_plans_the_table_row(monkeypatch):
    """The T4 bench line under the table, as `strata bench` parses it, plans the row's
    placement (disk space for the dummy disk layers taken as ample)."""
    import shlex

    from deploy import bench_plan, cli, serve_plan
    from deploy.plan_cases import CASES, case_report
    from deploy.profile_cli import load_profile

    profile, where = load_profile(str(H200))
    row = case_report(next(c for c in CASES if c.name == "T4"), profile, where)
    ns = cli.build_parser().parse_args(shlex.split(row["bench_command"])[1:])
    assert ns.model == "meta-llama/Llama-3.1-405B" and ns.dummy and ns.kv_bits is None
    assert not serve_plan.pinned(ns)
    monkeypatch.setattr(bench_plan, "_disk_layers_room", lambda ns, layer_bytes: None)
    fields, predicted = bench_plan.planned(ns)
    pl = row["placement"]
    assert fields == {"gpu_weight_share": pytest.approx(pl["gpu_weight_share"]), "kv_offload": pl["kv_on_host"],
                      "micro_batches": pl["micro_batches"], "batch_size": pl["batch_size"],
                      "kv_bits": pl["kv_bits"], "disk_layers": row["layers"]["disk"],
                      "prefill_chunk_tokens": pl["prefill_chunk_tokens"]}
    assert "--prefill-chunk-tokens" not in row["bench_command"]  # the bench plans it as the row did
    assert predicted["total_tokens_per_s"] == pytest.approx(row["total_tokens_per_s"], rel=1e-3)


def test_plan_without_a_model_or_cases_is_a_clear_error():
    r = strata("plan", "--prompt-len", "512", "--profile", str(H200))
    assert r.returncode == 1 and "--model" in r.stderr and "--gen-len" in r.stderr

"""The compute node's run plan: read from --plan (its placement flags refused beside it),
or made from those flags for direct use; checked against the model once."""

import dataclasses
import types

import pytest

from compute_node.server import parse_args, run_plan
from strata.policy.run_plan import RunPlan
from strata.runtime.errors import StrataError

BASE = ["--session", "s", "--weight-store", "unix:///tmp/ws.sock"]
DIMS = types.SimpleNamespace(num_layers=4, head_dim=64)


def test_plan_file_is_the_config_s_plan(tmp_path):
    plan = RunPlan(num_layers=4, resident_layers=(0, 2), kv_bits=8, kv_group_size=64, max_batch=3)
    plan.save(tmp_path / "plan.json")
    config, _ = parse_args([*BASE, "--plan", str(tmp_path / "plan.json")])
    assert config.plan == plan and run_plan(config, DIMS) is config.plan


def test_placement_flags_beside_a_plan_or_a_kv_store_plan_without_its_address_are_usage_errors(tmp_path, capsys):
    RunPlan(num_layers=4, kv_home="kv_store").save(tmp_path / "plan.json")
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--plan", str(tmp_path / "plan.json"), "--kv-bits", "8", "--kv-store", "unix:///x"])
    assert "--plan decides kv_bits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--plan", str(tmp_path / "plan.json")])
    assert "give --kv-store" in capsys.readouterr().err


def test_direct_flags_make_the_same_kind_of_plan():
    config, _ = parse_args([*BASE, "--gpu-weight-share", "0.5", "--kv-bits", "4", "--micro-batches", "2",
                            "--no-decode-graphs"])
    plan = run_plan(config, DIMS)
    assert plan == RunPlan.with_share(4, 0.5, kv_bits=4, kv_group_size=64, micro_batches=2, decode_graphs=False)
    config, _ = parse_args(BASE)
    assert run_plan(config, DIMS) == RunPlan.with_share(4, 1.0)


def test_a_plan_for_another_model_or_kv_group_is_refused():
    config, _ = parse_args(BASE)
    with pytest.raises(StrataError, match="num_layers the plan is for 8 layers, the model has 4"):
        run_plan(dataclasses.replace(config, plan=RunPlan(num_layers=8)), DIMS)
    with pytest.raises(StrataError, match="kv_group_size 32 is not the 64"):
        run_plan(dataclasses.replace(config, plan=RunPlan(num_layers=4, kv_bits=8, kv_group_size=32)), DIMS)

"""The run plan alone (no torch, no grpc): JSON round trip, and each field checked once,
when a plan is made or read, with an error naming the field."""

import argparse
import json

import pytest

from strata.policy.run_plan import RunPlan, parse_kv_kernel_defines
from strata.runtime.errors import ErrorKind, StrataError


def full_plan() -> RunPlan:
    return RunPlan(num_layers=12, resident_layers=(0, 4, 8), disk_layers=(10, 11), kv_home="kv_store", kv_bits=4,
                   kv_group_size=64, micro_batches=2, max_batch=6, max_seq_len=40, max_queue=9, dtype="bfloat16",
                   decode_graphs=False, w4a16_wgmma=False, w4a16_mma=True,
                   kv_kernel_defines={"PF_TOKENS": 0, "PF_HINT": 2})


def test_a_plan_survives_its_json_and_a_file(tmp_path):
    plan = full_plan()
    assert RunPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert RunPlan.load(tmp_path / "plan.json") == plan
    on_disk = json.loads((tmp_path / "plan.json").read_text())
    assert on_disk["resident_layers"] == [0, 4, 8]
    assert on_disk["kv_kernel_defines"] == {"PF_HINT": 2, "PF_TOKENS": 0} and on_disk["w4a16_wgmma"] is False


def test_kernels_default_to_all_allowed_and_the_sources_macros():
    plan = RunPlan(num_layers=2)
    assert plan.w4a16_wgmma and plan.w4a16_mma and plan.kv_kernel_defines == ()
    assert RunPlan.from_dict({"num_layers": 2}) == plan  # a plan written before these fields reads the same
    assert full_plan().kv_kernel_defines == (("PF_HINT", 2), ("PF_TOKENS", 0))  # sorted pairs: hashable
    assert hash(full_plan()) == hash(RunPlan.from_json(full_plan().to_json()))


def test_kv_kernel_defines_from_a_command_line():
    assert parse_kv_kernel_defines("PF_TOKENS=0 PF_HINT=2") == {"PF_TOKENS": 0, "PF_HINT": 2}
    assert parse_kv_kernel_defines("-DPF_TOKENS=32,-DPF_NEXT_ROW=1") == {"PF_TOKENS": 32, "PF_NEXT_ROW": 1}
    assert parse_kv_kernel_defines("") == {}
    for bad, words in (("PF_TOKENS", "not NAME=VALUE"), ("-O2", "not NAME=VALUE"), ("PF_FAR=1", "not one of"),
                       ("PF_HINT=9", "from 0 to 3")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            parse_kv_kernel_defines(bad)


def test_layer_lists_are_kept_sorted_as_tuples():
    plan = RunPlan(num_layers=4, resident_layers=[3, 1])
    assert plan.resident_layers == (1, 3) and plan.streamed_layers == (0, 2)
    assert plan.gpu_weight_share == 0.5 and not plan.kv_offload


def test_a_share_becomes_layers_spread_through_the_model():
    plan = RunPlan.with_share(12, 0.5, micro_batches=2)
    assert len(plan.resident_layers) == 6 and plan.resident_layers != tuple(range(6))
    assert RunPlan.with_share(12, 1.0).streamed_layers == () and RunPlan.with_share(12, 0.0).resident_layers == ()


@pytest.mark.parametrize("field, value, words", [
    ("num_layers", 0, "whole number >= 1"),
    ("resident_layers", (0, 12), "not layer indices"),
    ("resident_layers", (1, 1), "repeats layers"),
    ("resident_layers", "0,1", "list of layer indices"),
    ("disk_layers", (-1,), "not layer indices"),
    ("disk_layers", (0,), "also resident"),
    ("kv_home", "host", "must be one of"),
    ("kv_bits", 2, "must be one of"),
    ("kv_bits", True, "must be one of"),
    ("kv_group_size", 0, "needs a group size"),
    ("micro_batches", 0, "whole number >= 1"),
    ("max_batch", 1.5, "whole number >= 1"),
    ("max_seq_len", -1, "whole number >= 0"),
    ("max_queue", None, "whole number >= 0"),
    ("dtype", "float8", "must be one of"),
    ("decode_graphs", 1, "true or false"),
    ("w4a16_wgmma", "0", "true or false"),
    ("w4a16_mma", None, "true or false"),
    ("kv_kernel_defines", "-DPF_TOKENS=0", "object of macro names"),
    ("kv_kernel_defines", {"PF_FAR": 1}, "not one of"),
    ("kv_kernel_defines", {"PF_TOKENS": -1}, "whole number from 0"),
    ("kv_kernel_defines", {"PF_NEXT_ROW": True}, "whole number from 0 to 1"),
    ("kv_kernel_defines", [["PF_HINT", 1], ["PF_HINT", 2]], "repeats macros"),
])
def test_each_bad_field_is_refused_by_name(field, value, words):
    good = full_plan().to_dict()
    with pytest.raises(StrataError) as e:
        RunPlan.from_dict({**good, field: value})
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    assert e.value.message.startswith(f"run plan: {field} ") and words in e.value.message


def test_a_16_bit_cache_has_no_groups_and_a_share_is_a_fraction():
    with pytest.raises(StrataError, match="kv_group_size is 64 for a 16-bit cache"):
        RunPlan(num_layers=2, kv_group_size=64)
    with pytest.raises(StrataError, match="gpu_weight_share must be a number from 0 to 1"):
        RunPlan.with_share(2, 1.5)


def test_unknown_or_missing_fields_and_other_models_are_refused(tmp_path):
    with pytest.raises(StrataError, match="unknown field.*gpu_share"):
        RunPlan.from_dict({"num_layers": 2, "gpu_share": 1.0})
    with pytest.raises(StrataError, match="num_layers is missing"):
        RunPlan.from_dict({"kv_bits": 8})
    with pytest.raises(StrataError, match="not JSON"):
        RunPlan.from_json("{")
    with pytest.raises(StrataError, match="run plan .*missing.json"):
        RunPlan.load(tmp_path / "missing.json")
    with pytest.raises(StrataError, match="num_layers the plan is for 12 layers, the model has 24"):
        full_plan().check_model(24)


"""strata/policy/model_bytes.py: a model's dimensions and weight bytes for the planner,
from a shape name or from a converted model's manifest."""

import pytest

from strata.policy import cost_model as cm
from strata.policy.model_bytes import model_for
from strata.runtime.errors import ErrorKind, StrataError


def test_a_shape_name_is_estimated_at_the_bits_asked_for():
    dims, wbf, bits = model_for("facebook/opt-30b", 4, 64)
    assert dims.num_layers == 48 and bits == 4
    assert wbf(4) == cm.estimate_weight_bytes(dims, 4, 64, dummy=True)
    assert wbf(4).layer < wbf(8).layer < wbf(16).layer
    assert model_for("facebook/opt-30b", None, 64).bits is None  # the planner's choice


def test_a_converted_model_gives_its_shard_sizes_and_refuses_other_bits(tmp_path):
    from tools.dummy.files import write_dummy_model

    out = tmp_path / "opt-125m"
    m = write_dummy_model("facebook/opt-125m", 4, 64, out)
    got = model_for(str(out), None, 64)
    assert got.bits == 4 and got.dims.num_layers == m.num_layers
    assert got.weight_bytes(4).layer == pytest.approx(m.shards["layer.0"].size)
    assert model_for(str(out), 4, 64).bits == 4
    with pytest.raises(StrataError) as e:
        model_for(str(out), 8, 64)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT and "stored in 4 bits, not 8" in e.value.message

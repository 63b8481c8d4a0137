"""strata/model/manifest.py: the shard manifest's round trip, names, alignment, and refusal of
anything that is not a valid manifest."""

import json

import pytest

from strata.model import manifest as mf
from strata.runtime.errors import ErrorKind, StrataError


def sample() -> mf.Manifest:
    def part(offset, length, dtype, shape):
        return mf.Part(offset, length, dtype, shape, f"{offset:064x}")

    q = mf.QuantSpec(bits=4, group_size=64)
    fc = mf.TensorEntry((256, 128), "float16", q, {
        "data": part(0, 256 * 64, "uint8", (256, 64)),
        "scale": part(16384, 1024, "float16", (256, 2)),
        "min": part(20480, 1024, "float16", (256, 2)),
    })
    bias = mf.TensorEntry((256,), "float16", None, {"data": part(24576, 512, "float16", (256,))})
    shards = {
        "embed": mf.Shard("embed", "embed.bin", 4096, {"embed.weight": bias}),
        "layer.0": mf.Shard("layer.0", mf.shard_file("layer.0"), 28672, {"fc1.weight": fc, "fc1.bias": bias}),
        "layer.1": mf.Shard("layer.1", mf.shard_file("layer.1"), 28672, {"fc1.weight": fc}),
        "head": mf.Shard("head", "head.bin", 4096, {}),
    }
    return mf.Manifest("opt", {"hidden_size": 128, "num_hidden_layers": 2}, shards,
                       {"bits": 4, "group_size": 64, "ds_config": None})


def test_save_then_load_gives_the_same_manifest(tmp_path):
    m = sample()
    m.save(tmp_path)
    loaded = mf.Manifest.load(tmp_path)
    assert loaded == m
    assert list(loaded.shards) == ["embed", "layer.0", "layer.1", "head"]  # order kept
    assert loaded.layer(1).tensors["fc1.weight"].parts["scale"].shape == (256, 2)
    assert loaded.layer(0).tensors["fc1.bias"].quant is None


def test_layers_are_counted_and_named():
    m = sample()
    assert m.num_layers == 2
    assert m.layer(1) is m.shards[mf.layer_shard(1)] and mf.layer_shard(1) == "layer.1"
    assert [mf.shard_file(n) for n in ("layer.7", "layer.1234", "embed", "head")] == [
        "layer_0007.bin", "layer_1234.bin", "embed.bin", "head.bin"]


@pytest.mark.parametrize("n,aligned", [(0, 0), (1, 4096), (4096, 4096), (4097, 8192)])
def test_align_rounds_up_to_4_kib(n, aligned):
    assert mf.align(n) == aligned


def corrupt_variants() -> dict[str, str]:
    good = json.loads(sample().to_json())
    no_tensors = json.loads(sample().to_json())
    del no_tensors["shards"][1]["tensors"]
    bad_part = json.loads(sample().to_json())
    del bad_part["shards"][1]["tensors"]["fc1.weight"]["parts"]["data"]["sha256"]
    return {
        "not json": "{\"format\": \"strata-shards/1\", ",
        "truncated": sample().to_json()[:200],
        "another format": json.dumps({**good, "format": "strata-shards/0"}),
        "no format": json.dumps({k: v for k, v in good.items() if k != "format"}),
        "no architecture": json.dumps({k: v for k, v in good.items() if k != "architecture"}),
        "shard without tensors": json.dumps(no_tensors),
        "part without sha256": json.dumps(bad_part),
        "shards not a list": json.dumps({**good, "shards": 3}),
        "a list": "[]",
    }


@pytest.mark.parametrize("name", list(corrupt_variants()))
def test_a_corrupt_manifest_is_data_loss_naming_the_file(tmp_path, name):
    (tmp_path / mf.MANIFEST).write_text(corrupt_variants()[name])
    with pytest.raises(StrataError) as e:
        mf.Manifest.load(tmp_path)
    assert e.value.kind == ErrorKind.DATA_LOSS
    assert str(tmp_path / mf.MANIFEST) in str(e.value)


def test_a_missing_directory_or_manifest_is_not_found(tmp_path):
    with pytest.raises(StrataError) as e:
        mf.Manifest.load(tmp_path / "absent")
    assert e.value.kind == ErrorKind.NOT_FOUND
    with pytest.raises(StrataError) as e:
        mf.Manifest.load(tmp_path)
    assert e.value.kind == ErrorKind.NOT_FOUND and "strata convert" in str(e.value)

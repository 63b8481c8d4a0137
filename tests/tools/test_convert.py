"""tools.convert: HF checkpoint -> aligned, hashed layer shards + manifest;
DeepSpeed weight_quantization selects what is quantized; failures leave nothing."""

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_models
from strata.model import manifest as mf
from strata.model import quant
from strata.runtime.errors import ErrorKind, StrataError
from tools import convert as cv

Q4 = {"num_bits": 4, "group_size": 64, "group_dim": 1, "symmetric": False}
Q8 = {"num_bits": 8, "group_size": 32, "group_dim": 1, "symmetric": False}


def _hf_tensors(src: pathlib.Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for file in files:
        with safe_open(str(src / file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _read_part(directory: pathlib.Path, shard: mf.Shard, part: mf.Part) -> torch.Tensor:
    raw = np.fromfile(directory / shard.file, dtype=np.uint8, count=part.length, offset=part.offset)
    return torch.from_numpy(raw.copy()).view(getattr(torch, part.dtype)).reshape(part.shape)


def _hf_name(m: mf.Manifest, shard: str, local: str) -> str:
    spec = {"opt": ("model.decoder.", "model.decoder.layers.{}."), "bloom": ("transformer.", "transformer.h.{}.")}
    prefix, layer_prefix = spec[m.architecture]
    if shard.startswith("layer."):
        return layer_prefix.format(shard.split(".")[1]) + local
    return local if local == "lm_head.weight" else prefix + local


def _rewrite(src: pathlib.Path, dst: pathlib.Path, dtype=None, files: int = 1, **config_updates) -> pathlib.Path:
    """A copy of a checkpoint, optionally cast to `dtype`, split into `files` files with
    an index, or with config.json changed."""
    dst.mkdir(parents=True)
    tensors = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in _hf_tensors(src).items()}
    names = sorted(tensors)
    if files == 1:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(files):
            file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
            chunk = {k: tensors[k] for k in names[i::files]}
            save_file(chunk, str(dst / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in chunk})
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config.update(config_updates)
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.fixture(scope="module")
def opt_int4(tiny_opt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("strata") / "opt-int4"
    return dst, cv.convert(tiny_opt, dst, bits=4, group_size=64)


@pytest.fixture(scope="module")
def untied_opt(tmp_path_factory):
    return tiny_models.make_opt(tmp_path_factory.mktemp("hf") / "tiny-opt-untied", tie_word_embeddings=False)


def _all_parts(m: mf.Manifest):
    for shard in m.shards.values():
        for local, entry in shard.tensors.items():
            for name, part in entry.parts.items():
                yield shard, local, name, part


def test_parts_are_4k_aligned_and_files_padded(opt_int4):
    dst, m = opt_int4
    assert list(m.shards) == ["embed", "layer.0", "layer.1", "layer.2", "head"]
    for shard, _, _, part in _all_parts(m):
        assert part.offset % mf.ALIGN == 0
        assert part.offset + part.length <= shard.size
    for shard in m.shards.values():
        assert shard.size % mf.ALIGN == 0
        assert (dst / shard.file).stat().st_size == shard.size
        assert shard.file == mf.shard_file(shard.name)


def test_sha256_matches_file_bytes(opt_int4):
    dst, m = opt_int4
    for shard, _, _, part in _all_parts(m):
        with open(dst / shard.file, "rb") as f:
            f.seek(part.offset)
            assert hashlib.sha256(f.read(part.length)).hexdigest() == part.sha256


def test_manifest_loads_with_config_quantization_record_and_tokenizer(opt_int4, tiny_opt):
    dst, m = opt_int4
    loaded = mf.Manifest.load(dst)
    assert loaded == m
    assert loaded.architecture == "opt" and loaded.num_layers == 3
    assert loaded.config == json.loads((tiny_opt / "config.json").read_text())
    assert loaded.quantization == {"bits": 4, "group_size": 64, "ds_config": None}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (tiny_opt / name).read_bytes()


@pytest.mark.parametrize("model", ["tiny_opt", "tiny_bloom"])
def test_16bit_conversion_reproduces_hf_tensors_exactly(model, request, tmp_path):
    src = request.getfixturevalue(model)
    m = cv.convert(src, tmp_path / "out", bits=16)
    hf = _hf_tensors(src)
    stored = set()
    for shard, local, name, part in _all_parts(m):
        entry = shard.tensors[local]
        assert name == "data" and entry.quant is None and entry.dtype == "float16"
        hf_name = _hf_name(m, shard.name, local)
        assert torch.equal(_read_part(tmp_path / "out", shard, part), hf[hf_name])
        assert entry.shape == tuple(hf[hf_name].shape)
        stored.add(hf_name)
    assert stored == set(hf)  # every tensor, lm_head being tied and absent


def test_int4_linears_dequantize_within_half_a_step(opt_int4, tiny_opt):
    dst, m = opt_int4
    hf = _hf_tensors(tiny_opt)
    checked = 0
    for shard_name, shard in m.shards.items():
        for local, entry in shard.tensors.items():
            if entry.quant is None:
                continue
            assert entry.quant == mf.QuantSpec(bits=4, group_size=64) and entry.dtype == "float16"
            parts = {n: _read_part(dst, shard, p) for n, p in entry.parts.items()}
            assert parts["data"].shape == (entry.shape[0], entry.shape[1] // 2)
            w = quant.dequantize(parts["data"], parts["scale"], parts["min"], 4, 64, out_dtype=torch.float32)
            ref = hf[_hf_name(m, shard_name, local)].float()
            step = parts["scale"].float().repeat_interleave(64, dim=1)
            slack = (parts["min"].float().abs().repeat_interleave(64, dim=1) + 15 * step) * 2**-11
            assert ((w - ref).abs() <= step / 2 + slack).all()
            checked += 1
    assert checked == 3 * 6


def test_default_quantizes_layer_linears_only(opt_int4):
    _, m = opt_int4
    linears = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.out_proj.weight", "fc1.weight", "fc2.weight"}
    for shard in m.shards.values():
        quantized = {local for local, e in shard.tensors.items() if e.quant is not None}
        assert quantized == (linears if shard.name.startswith("layer.") else set())
        for local, e in shard.tensors.items():
            assert set(e.parts) == ({"data", "scale", "min"} if local in quantized else {"data"})


def test_tied_lm_head_is_not_stored(opt_int4):
    _, m = opt_int4
    assert set(m.shards["head"].tensors) == {"final_layer_norm.weight", "final_layer_norm.bias"}
    assert "embed_tokens.weight" in m.shards["embed"].tensors


def test_untied_lm_head_is_stored_in_head_unquantized(untied_opt, tmp_path):
    m = cv.convert(untied_opt, tmp_path / "out", bits=4)
    head = m.shards["head"].tensors
    assert "lm_head.weight" in head and head["lm_head.weight"].quant is None
    ref = _hf_tensors(untied_opt)["lm_head.weight"]
    assert torch.equal(_read_part(tmp_path / "out", m.shards["head"], head["lm_head.weight"].parts["data"]), ref)


def test_post_init_quant_pattern_quantizes_only_matching_modules(tiny_opt, tmp_path):
    ds_config = {"zero_optimization": {"stage": 3}, "weight_quantization": {"post_init_quant": {"fc": Q4}}}
    m = cv.convert(tiny_opt, tmp_path / "out", bits=8, ds_config=ds_config)
    for i in range(3):
        quantized = {local: e.quant for local, e in m.layer(i).tensors.items() if e.quant is not None}
        assert quantized == {"fc1.weight": mf.QuantSpec(4, 64), "fc2.weight": mf.QuantSpec(4, 64)}
    assert m.quantization["ds_config"] == ds_config["weight_quantization"]


def test_post_init_quant_patterns_pick_per_module_params(tiny_bloom, tmp_path):
    section = {"post_init_quant": {"self_attention.query_key_value": Q8, "dense_4h_to_h": Q4}}
    m = cv.convert(tiny_bloom, tmp_path / "out", ds_config={"zero_optimization": {"weight_quantization": section}})
    quantized = {local: e.quant for local, e in m.layer(0).tensors.items() if e.quant is not None}
    assert quantized == {"self_attention.query_key_value.weight": mf.QuantSpec(8, 32),
                         "mlp.dense_4h_to_h.weight": mf.QuantSpec(4, 64)}


def test_post_init_quant_pattern_may_name_one_layer(tiny_opt, tmp_path):
    ds_config = {"weight_quantization": {"post_init_quant": {"layers.1.self_attn.q_proj": Q4}}}
    m = cv.convert(tiny_opt, tmp_path / "out", ds_config=ds_config)
    quantized = [(s, local) for s, sh in m.shards.items() for local, e in sh.tensors.items() if e.quant]
    assert quantized == [("layer.1", "self_attn.q_proj.weight")]


def test_quantized_initialization_quantizes_every_linear(tiny_opt, tmp_path):
    ds_config = {"weight_quantization": {"quantized_initialization": Q8}}
    m = cv.convert(tiny_opt, tmp_path / "out", bits=4, ds_config=ds_config)
    specs = {e.quant for e in m.layer(2).tensors.values()}
    assert specs == {None, mf.QuantSpec(8, 32)}
    assert sum(e.quant is not None for e in m.layer(2).tensors.values()) == 6


def test_ds_config_without_weight_quantization_keeps_16bit(tiny_opt, tmp_path):
    m = cv.convert(tiny_opt, tmp_path / "out", bits=4, ds_config={"zero_optimization": {"stage": 3}})
    assert all(e.quant is None for s in m.shards.values() for e in s.tensors.values())


@pytest.mark.parametrize("bad", [{**Q4, "symmetric": True}, {**Q4, "group_dim": 0}, {**Q4, "num_bits": 3},
                                 {"num_bits": 4}])
def test_unsupported_ds_quantization_is_invalid_argument(tiny_opt, tmp_path, bad):
    with pytest.raises(StrataError) as e:
        cv.convert(tiny_opt, tmp_path / "out", ds_config={"weight_quantization": {"post_init_quant": {"fc": bad}}})
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    assert not (tmp_path / "out").exists()


def test_linear_with_in_features_not_a_multiple_of_group_stays_16bit(tiny_opt, tmp_path):
    m = cv.convert(tiny_opt, tmp_path / "out", bits=8, group_size=256)  # only fc2 has in_features 256
    quantized = {local for local, e in m.layer(0).tensors.items() if e.quant is not None}
    assert quantized == {"fc2.weight"}


def test_sharded_checkpoint_converts_like_single_file(tiny_opt, opt_int4, tmp_path):
    src = _rewrite(tiny_opt, tmp_path / "sharded", files=3)
    m = cv.convert(src, tmp_path / "out", bits=4, group_size=64)
    assert m.shards == opt_int4[1].shards


def test_bfloat16_source_is_stored_as_bfloat16(tiny_bloom, tmp_path):
    src = _rewrite(tiny_bloom, tmp_path / "bf16", dtype=torch.bfloat16)
    m = cv.convert(src, tmp_path / "out", bits=4)
    hf = _hf_tensors(src)
    for shard, local, name, part in _all_parts(m):
        entry = shard.tensors[local]
        assert entry.dtype == "bfloat16"
        if entry.quant is None:
            assert part.dtype == "bfloat16"
            assert torch.equal(_read_part(tmp_path / "out", shard, part), hf[_hf_name(m, shard.name, local)])


def test_float32_source_is_stored_as_float16(tiny_opt, tmp_path):
    src = _rewrite(tiny_opt, tmp_path / "fp32", dtype=torch.float32)
    m = cv.convert(src, tmp_path / "out", bits=16)
    assert {p.dtype for _, _, _, p in _all_parts(m)} == {"float16"}


def test_progress_reports_each_shard(tiny_opt, tmp_path):
    calls = []
    cv.convert(tiny_opt, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_failure_midway_leaves_neither_dst_nor_temp_dir(tiny_opt, tmp_path, monkeypatch):
    real = cv.write_shard

    def fail_on_second_layer(directory, shard, *args, **kwargs):
        if shard == "layer.1":
            assert any(directory.iterdir())  # earlier shards were written
            raise OSError("disk full")
        return real(directory, shard, *args, **kwargs)

    monkeypatch.setattr(cv, "write_shard", fail_on_second_layer)
    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        cv.convert(tiny_opt, parent / "out")
    assert list(parent.iterdir()) == []


def test_failure_in_quantizer_leaves_nothing(tiny_opt, tmp_path, monkeypatch):
    monkeypatch.setattr(quant, "quantize", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cv.convert(tiny_opt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_free_space_estimate_is_the_bytes_written_plus_manifest_room(opt_int4, tiny_opt, tmp_path):
    """The up-front check asks for the shards' exact bytes, the tokenizer's and a fixed
    room for the manifest: one byte less free fails before writing, that much passes."""
    m = opt_int4[1]
    tokenizer = sum((tiny_opt / n).stat().st_size for n in cv.TOKENIZER_FILES if (tiny_opt / n).is_file())
    tensors = sum(len(s.tensors) for s in m.shards.values())
    needed = sum(s.size for s in m.shards.values()) + tokenizer + cv.MANIFEST_BYTES + tensors * cv.PER_TENSOR_BYTES
    written = sum(p.stat().st_size for p in opt_int4[0].iterdir())
    assert written <= needed
    with pytest.raises(StrataError) as e:
        cv.convert(tiny_opt, tmp_path / "short", bits=4, free_bytes=lambda _: needed - 1)
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED and f"needs about {needed} bytes" in e.value.message
    assert list(tmp_path.iterdir()) == []
    assert cv.convert(tiny_opt, tmp_path / "enough", bits=4, free_bytes=lambda _: needed) == m


def test_missing_checkpoint_dir_is_not_found(tmp_path):
    with pytest.raises(StrataError) as e:
        cv.convert(tmp_path / "nope", tmp_path / "out")
    assert e.value.kind is ErrorKind.NOT_FOUND and "nope" in e.value.message


def test_dir_without_config_is_not_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StrataError) as e:
        cv.convert(tmp_path / "empty", tmp_path / "out")
    assert e.value.kind is ErrorKind.NOT_FOUND and "config.json" in e.value.message


@pytest.mark.parametrize("bits", [2, 3, 32])
def test_bad_bits_is_invalid_argument(tiny_opt, tmp_path, bits):
    with pytest.raises(StrataError) as e:
        cv.convert(tiny_opt, tmp_path / "out", bits=bits)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_is_invalid_argument(tiny_opt, tmp_path):
    src = _rewrite(tiny_opt, tmp_path / "llama", model_type="llama")
    with pytest.raises(StrataError) as e:
        cv.convert(src, tmp_path / "out")
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


def test_existing_dst_is_failed_precondition_and_untouched(tiny_opt, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(StrataError) as e:
        cv.convert(tiny_opt, dst)
    assert e.value.kind is ErrorKind.FAILED_PRECONDITION and "exists" in e.value.message
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_find_weight_quantization_anywhere_in_the_config():
    section = {"post_init_quant": {"fc": Q4}}
    assert cv.find_weight_quantization({"weight_quantization": section}) is section
    assert cv.find_weight_quantization({"zero_optimization": {"a": {"weight_quantization": section}}}) is section
    assert cv.find_weight_quantization(section) is section
    assert cv.find_weight_quantization({"train_batch_size": 1}) is None

"""Family specs (strata/model/arch.py, strata/model/families/): plain data, no torch; one module
per family; dims, names and math options read from HF configs."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from strata.model import arch, shapes
from strata.model.arch import ArchSpec, Cfg, Math, Names
from strata.runtime.errors import ErrorKind, StrataError

ROOT = pathlib.Path(__file__).parents[3]


def test_importing_and_using_the_specs_loads_no_torch():
    code = ("import sys; from strata.model import arch, shapes; arch.registry(); "
            "[arch.dims_for(shapes.config_for(n)) for n in shapes.names()]; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_every_module_of_the_families_package_is_one_registered_spec():
    modules = sorted(p.stem for p in (ROOT / "strata" / "model" / "families").glob("*.py") if p.stem != "__init__")
    specs = {s.name: s for s in arch.registry().values()}
    assert sorted(specs) == modules
    assert arch.registry()["mistral"] is arch.registry()["qwen2"] is specs["llama"]


def test_dims_of_each_family_come_from_its_config_keys():
    opt = arch.dims_for(shapes.config_for("facebook/opt-30b"))
    assert (opt.num_layers, opt.hidden, opt.num_heads, opt.head_dim, opt.ffn) == (48, 7168, 56, 128, 28672)
    assert (opt.kv_heads, opt.mlp_matrices, opt.max_positions) == (56, 2, 2048)
    bloom = arch.dims_for(shapes.config_for("bigscience/bloom"))
    assert (bloom.num_layers, bloom.hidden, bloom.num_heads, bloom.ffn, bloom.max_positions) == (70, 14336, 112,
                                                                                                   57344, 2048)
    llama = arch.dims_for(shapes.config_for("meta-llama/Llama-2-70b-hf"))
    assert (llama.kv_heads, llama.mlp_matrices, llama.ffn, llama.head_dim) == (8, 3, 28672, 128)
    llama3 = arch.dims_for({**shapes.config_for("meta-llama/Llama-2-7b-hf"), "eos_token_id": [128001, 128009]})
    assert llama3.eos_token_id == 128001


def test_pythia_config_dims():
    pythia = {"model_type": "gpt_neox", "hidden_size": 2560, "num_attention_heads": 32, "num_hidden_layers": 32,
              "intermediate_size": 10240, "vocab_size": 50432, "max_position_embeddings": 2048,
              "rotary_pct": 0.25, "use_parallel_residual": True, "bos_token_id": 0, "eos_token_id": 0}
    d = arch.dims_for(pythia)
    assert (d.num_layers, d.head_dim, d.ffn, d.kv_heads, d.eos_token_id) == (32, 80, 10240, 32, 0)
    spec = arch.spec_for(pythia)
    assert spec.split_name("embed_out.weight") == ("head", None, "lm_head.weight")
    assert spec.split_name("gpt_neox.layers.3.attention.masked_bias")[0] == "skip"
    assert spec.split_name("gpt_neox.layers.3.attention.dense.bias") == ("layer", 3, "attention.dense.bias")
    assert spec.math_for(pythia).parallel and not spec.math_for({**pythia, "use_parallel_residual": False}).parallel


def test_names_the_converter_reads_are_derived_from_the_spec():
    opt = arch.spec_for({"model_type": "opt"})
    assert opt.embed == ("embed_tokens.weight", "embed_positions.weight")
    assert opt.head == ("final_layer_norm.weight", "final_layer_norm.bias")
    assert opt.linears == ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                           "self_attn.out_proj.weight", "fc1.weight", "fc2.weight")
    assert opt.layer_prefix(7) == "model.decoder.layers.7."
    bloom = arch.spec_for({"model_type": "bloom"})
    assert bloom.embed == ("word_embeddings.weight", "word_embeddings_layernorm.weight",
                           "word_embeddings_layernorm.bias")
    assert bloom.tied_to == "word_embeddings.weight"
    llama = arch.spec_for({"model_type": "llama"})
    assert llama.head == ("norm.weight",)  # RMSNorm: no bias
    assert llama.split_name("model.layers.12.mlp.up_proj.weight") == ("layer", 12, "mlp.up_proj.weight")
    assert llama.split_name("lm_head.weight") == ("head", None, "lm_head.weight")
    assert llama.split_name("model.norm.weight") == ("head", None, "norm.weight")


def test_flags_are_decided_by_the_config():
    opt = arch.spec_for({"model_type": "opt"})
    assert opt.math_for({}).pre_norm and opt.math_for({}).final_norm
    post = opt.math_for({"do_layer_norm_before": False, "activation_function": "gelu"})
    assert not post.pre_norm and post.activation == "gelu"
    assert not opt.math_for({"_remove_final_layer_norm": True}).final_norm
    bloom = arch.spec_for({"model_type": "bloom"})
    m = bloom.math_for({"apply_residual_connection_post_layernorm": True, "layer_norm_epsilon": 1e-3})
    assert m.residual_from_norm and m.eps == 1e-3 and m.activation == "bloom_gelu"
    assert arch.spec_for({"model_type": "llama"}).math_for({"rms_norm_eps": 1e-5}).eps == 1e-5
    assert Cfg("k", True, negate=True).resolve({"k": None}) is False


def test_unsupported_configs_are_invalid_argument():
    with pytest.raises(StrataError) as e:
        arch.dims_for({**shapes.config_for("facebook/opt-125m"), "word_embed_proj_dim": 512})
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT and "word_embed_proj_dim" in e.value.message
    with pytest.raises(StrataError) as e:
        arch.spec_for({"model_type": "mystery"})
    assert "mystery" in e.value.message and "not supported" in e.value.message
    with pytest.raises(StrataError, match="num_hidden_layers"):
        arch.dims_for({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 9})


def _toy(**math) -> ArchSpec:
    names = Names(tokens="wte", attn_norm="ln1", mlp_norm="ln2", final_norm="ln_f", qkv=("q", "k", "v"), out="o",
                  mlp=("up", "down"))
    return ArchSpec(name="toy", model_types=("toy",), model_prefix="", layer_pattern=r"h\.(\d+)\.", names=names,
                    math=Math(**{"norm": "layernorm", "positions": "rope", "mlp": "plain", "activation": "gelu",
                                 **math}))


def test_specs_that_do_not_hold_together_are_refused_when_declared():
    _toy()
    for bad in ({"norm": "groupnorm"}, {"mlp": "gated"}, {"qkv": "fused"}, {"positions": "learned"}):
        with pytest.raises(ValueError):
            _toy(**bad)


def test_register_adds_a_model_type_and_refuses_a_clash():
    toy = _toy()
    arch.register(toy)
    try:
        assert arch.spec_for({"model_type": "toy"}) is toy
        with pytest.raises(ValueError, match="declared twice"):
            arch.register(dataclasses.replace(toy, name="other"))
    finally:
        arch.unregister(toy)
    with pytest.raises(StrataError):
        arch.spec_for({"model_type": "toy"})
    with pytest.raises(ValueError, match="declared twice"):
        arch.register(dataclasses.replace(toy, model_types=("opt",)))

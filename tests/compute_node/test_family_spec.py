"""A family is one spec: GPT-NeoX (a module of strata/model/families/) and StableLM (declared
here, nowhere else) run on the generic decoder and give transformers' greedy tokens."""

import json

import pytest
import torch

import tiny_models
from compute_node import model as cm
from in_process import InProcess
from strata.model import arch
from strata.model.arch import ArchSpec, Cfg, ConfigKeys, Math, Names
from strata.runtime.errors import StrataError
from tools.convert import convert

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]

STABLELM = ArchSpec(  # Llama's names, LayerNorm, partial RoPE, optionally parallel with one norm
    name="stablelm",
    model_types=("stablelm",),
    model_prefix="model.",
    layer_pattern=r"model\.layers\.(\d+)\.",
    names=Names(
        tokens="embed_tokens", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        final_norm="norm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        out="self_attn.o_proj", mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    math=Math(norm="layernorm", positions="rope", mlp="gated", activation="silu",
              parallel=Cfg("use_parallel_residual", False), shared_norm=True),
    keys=ConfigKeys(kv_heads=("num_key_value_heads",)),
    must_be=(("qk_layernorm", False),),
)


@pytest.fixture
def stablelm_registered():
    arch.register(STABLELM)
    yield
    arch.unregister(STABLELM)


def _greedy_pair(hf, n=8, bits=16, groups=(3,)):
    """(our tokens, transformers tokens) for PROMPTS, run together in one batch of slots."""
    out = hf.parent / f"s{bits}"
    convert(hf, out, bits=bits)
    got = InProcess(out, groups=groups).generate(PROMPTS, n)
    ref = tiny_models.load_reference(hf)
    want = [ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    return got, want


@pytest.mark.parametrize("overrides", [{}, {"use_parallel_residual": False}, {"rotary_pct": 1.0}],
                         ids=["parallel", "sequential", "full-rope"])
def test_gpt_neox_greedy_matches_transformers(tmp_path, overrides):
    hf = tiny_models.make_gpt_neox(tmp_path / "hf", **overrides)
    got, want = _greedy_pair(hf, groups=(2, 1))
    assert got == want


def test_gpt_neox_with_a_pythia_style_config(tmp_path):
    """Pythia's config.json names the rotary share and base the old way."""
    hf = tiny_models.make_gpt_neox(tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rotary_pct=0.5, rotary_emb_base=500)
    (hf / "config.json").write_text(json.dumps(config))
    got, want = _greedy_pair(hf)
    assert got == want


@pytest.mark.parametrize("overrides", [{}, {"use_parallel_residual": True, "use_qkv_bias": True}],
                         ids=["sequential", "parallel-qkv-bias"])
def test_a_spec_declared_in_one_place_matches_transformers(tmp_path, stablelm_registered, overrides):
    hf = tiny_models.make_stablelm(tmp_path / "hf", **overrides)
    got, want = _greedy_pair(hf)
    assert got == want


def test_the_declared_spec_is_what_the_converter_and_runner_read(tmp_path, stablelm_registered):
    hf = tiny_models.make_stablelm(tmp_path / "hf")
    out = tmp_path / "s4"
    m = convert(hf, out, bits=4, group_size=32)
    assert m.architecture == "stablelm"
    quantized = {name for name, t in m.shards["layer.0"].tensors.items() if t.quant is not None}
    assert quantized == set(STABLELM.linears)
    assert set(m.shards["head"].tensors) == {"norm.weight", "norm.bias", "lm_head.weight"}
    node = InProcess(out)
    assert isinstance(node.family, cm.Decoder) and node.dims.kv_heads == 2 and node.kvs[0].s.kv_heads == 2
    assert node.family.scale == 32**-0.5 and not node.family.alibi
    assert node.family.rope.dim == 8  # partial_rotary_factor 0.25 of head_dim 32


def test_a_config_outside_the_spec_is_refused(tmp_path, stablelm_registered):
    config = {**tiny_models._SMALL, "model_type": "stablelm", "qk_layernorm": True}
    with pytest.raises(StrataError, match="qk_layernorm"):
        arch.dims_for(config)


def test_without_its_spec_a_model_type_is_not_supported(tmp_path):
    with pytest.raises(StrataError, match="stablelm"):
        arch.spec_for({"model_type": "stablelm"})


def test_fused_relu_linear_is_relu_of_linear_exactly():
    from compute_node.model import _linear_relu

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = {"fc.weight": torch.randn(48, 32, generator=gen).to(dtype),
             "fc.bias": torch.randn(48, generator=gen).to(dtype)}
        x = torch.randn(2, 5, 32, generator=gen).to(dtype)
        got = _linear_relu(x, w, "fc")
        assert got.shape == (2, 5, 48) and (got == 0).any()
        assert torch.equal(got, torch.relu(torch.nn.functional.linear(x, w["fc.weight"], w["fc.bias"])))

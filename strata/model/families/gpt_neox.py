"""GPT-NeoX (EleutherAI Pythia, GPT-NeoX-20B): parallel residual with two norms,
fused per-head q/k/v, partial RoPE (rotary_pct / partial_rotary_factor, from the
config), exact GELU, untied head `embed_out`."""

from strata.model.arch import ArchSpec, Cfg, ConfigKeys, Math, Names

SPEC = ArchSpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    model_prefix="gpt_neox.",
    layer_pattern=r"gpt_neox\.layers\.(\d+)\.",
    names=Names(
        tokens="embed_in", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        final_norm="final_layer_norm", qkv=("attention.query_key_value",), out="attention.dense",
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    math=Math(norm="layernorm", positions="rope", mlp="plain", activation="gelu", qkv="fused",
              parallel=Cfg("use_parallel_residual", True)),
    keys=ConfigKeys(max_positions_default=2048),
    lm_head="embed_out.weight",
    ignored=("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"),  # old buffers
)

"""OPT (facebook/opt-*): learned positions (offset 2), LayerNorm, ReLU MLP, q scaled
on its projection; OPT-350m is post-norm (do_layer_norm_before false)."""

from strata.model.arch import ArchSpec, Cfg, ConfigKeys, Math, Names

SPEC = ArchSpec(
    name="opt",
    model_types=("opt",),
    model_prefix="model.decoder.",
    layer_pattern=r"model\.decoder\.layers\.(\d+)\.",
    names=Names(
        tokens="embed_tokens", positions="embed_positions",
        attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", final_norm="final_layer_norm",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.out_proj",
        mlp=("fc1", "fc2"),
    ),
    math=Math(
        norm="layernorm", eps=1e-5, positions="learned", position_offset=2, mlp="plain", activation="relu",
        query_scale="projection", pre_norm=Cfg("do_layer_norm_before", True),
        final_norm=Cfg("_remove_final_layer_norm", False, negate=True),
    ),
    keys=ConfigKeys(ffn=("ffn_dim",), eps=(), activation=("activation_function",)),
    must_match=(("word_embed_proj_dim", "hidden_size"),),
)

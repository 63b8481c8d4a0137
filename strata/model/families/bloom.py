"""BLOOM (bigscience/bloom*): ALiBi, a LayerNorm after the word embedding, fused
per-head q/k/v, BLOOM's tanh GELU, tied head."""

from strata.model.arch import ArchSpec, Cfg, ConfigKeys, Math, Names

SPEC = ArchSpec(
    name="bloom",
    model_types=("bloom",),
    model_prefix="transformer.",
    layer_pattern=r"transformer\.h\.(\d+)\.",
    names=Names(
        tokens="word_embeddings", embed_norm="word_embeddings_layernorm",
        attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", final_norm="ln_f",
        qkv=("self_attention.query_key_value",), out="self_attention.dense",
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    math=Math(
        norm="layernorm", positions="alibi", mlp="plain", activation="bloom_gelu", qkv="fused",
        query_scale="attention_inv_sqrt",
        residual_from_norm=Cfg("apply_residual_connection_post_layernorm", False),
    ),
    keys=ConfigKeys(
        layers=("n_layer", "num_hidden_layers"), hidden=("hidden_size", "n_embed"),
        heads=("n_head", "num_attention_heads"), ffn=(),  # 4 * hidden
        max_positions=("seq_length",), max_positions_default=2048,  # ALiBi: no table; trained at 2048
        eps=("layer_norm_epsilon",), activation=(),
    ),
)

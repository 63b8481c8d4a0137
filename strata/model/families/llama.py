"""Llama 2/3, Mistral, Qwen2: the same layer and names. RMSNorm, RoPE (scaling from
the config), grouped-query attention, SwiGLU; Qwen2's q/k/v biases come with its
checkpoint."""

from strata.model.arch import ArchSpec, ConfigKeys, Math, Names

SPEC = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    model_prefix="model.",
    layer_pattern=r"model\.layers\.(\d+)\.",
    names=Names(
        tokens="embed_tokens", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        final_norm="norm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        out="self_attn.o_proj", mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    math=Math(norm="rmsnorm", eps=1e-6, positions="rope", mlp="gated", activation="silu"),
    keys=ConfigKeys(
        kv_heads=("num_key_value_heads",), head_dim=("head_dim",), max_positions_default=4096,
        eps=("rms_norm_eps",),
    ),
)

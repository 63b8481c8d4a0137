"""Built-in model shapes (Hugging Face configs, no download) for `--dummy` runs."""

from __future__ import annotations

from strata.runtime.errors import ErrorKind, StrataError

_OPT = {  # name: (hidden, layers, heads, ffn)
    "facebook/opt-125m": (768, 12, 12, 3072),
    "facebook/opt-1.3b": (2048, 24, 32, 8192),
    "facebook/opt-6.7b": (4096, 32, 32, 16384),
    "facebook/opt-13b": (5120, 40, 40, 20480),
    "facebook/opt-30b": (7168, 48, 56, 28672),
    "facebook/opt-66b": (9216, 64, 72, 36864),
    "facebook/opt-175b": (12288, 96, 96, 49152),
}
_BLOOM = {  # name: (hidden, layers, heads)
    "bigscience/bloom-560m": (1024, 24, 16),
    "bigscience/bloom-7b1": (4096, 30, 32),
    "bigscience/bloom": (14336, 70, 112),
}


_LLAMA = {  # name: (model_type, hidden, layers, heads, kv heads, intermediate, vocab, max positions, rope theta, extra)
    "meta-llama/Llama-2-7b-hf": ("llama", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0, {}),
    "meta-llama/Llama-2-70b-hf": ("llama", 8192, 80, 64, 8, 28672, 32000, 4096, 10000.0, {}),
    "Qwen/Qwen2-7B": ("qwen2", 3584, 28, 28, 4, 18944, 152064, 32768, 1000000.0, {}),
    "Qwen/Qwen2-72B": ("qwen2", 8192, 80, 64, 8, 29568, 152064, 32768, 1000000.0, {}),
    "mistralai/Mistral-7B-v0.1": ("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, 10000.0, {"sliding_window": 4096}),
    "meta-llama/Llama-3.1-405B": ("llama", 16384, 126, 128, 8, 53248, 128256, 131072, 500000.0, {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}),
}


def names() -> list[str]:
    return sorted([*_OPT, *_BLOOM, *_LLAMA])


def config_for(name: str) -> dict:
    if name in _OPT:
        h, n, nh, ffn = _OPT[name]
        return {
            "model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": h, "num_hidden_layers": n,
            "num_attention_heads": nh, "ffn_dim": ffn, "vocab_size": 50272, "max_position_embeddings": 2048,
            "word_embed_proj_dim": h, "do_layer_norm_before": True, "activation_function": "relu",
            "enable_bias": True, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
            "tie_word_embeddings": True, "torch_dtype": "float16",
        }
    if name in _BLOOM:
        h, n, nh = _BLOOM[name]
        return {
            "model_type": "bloom", "architectures": ["BloomForCausalLM"], "hidden_size": h, "n_layer": n,
            "n_head": nh, "vocab_size": 250880, "layer_norm_epsilon": 1e-5, "pad_token_id": 3, "bos_token_id": 1,
            "eos_token_id": 2, "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
        }
    if name in _LLAMA:
        mt, h, n, nh, kvh, inter, vocab, maxpos, theta, extra = _LLAMA[name]
        return {
            "model_type": mt, "hidden_size": h, "num_hidden_layers": n, "num_attention_heads": nh,
            "num_key_value_heads": kvh, "intermediate_size": inter, "vocab_size": vocab,
            "max_position_embeddings": maxpos, "rope_theta": theta, "rms_norm_eps": 1e-5 if mt == "llama" else 1e-6,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", **extra,
        }
    raise StrataError(ErrorKind.NOT_FOUND, f"unknown model shape {name!r}; built in: {', '.join(names())}")

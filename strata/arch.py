"""Architecture specs: how a Hugging Face checkpoint's tensors map onto Strata's
shards, described once per family. The converter, the weight store and the compute
node read names from here; nothing else branches on the model family for naming.

Local names: a layer's tensors are stored under the HF name with the layer prefix
removed (so DeepSpeed `post_init_quant` patterns such as `fc` or `self_attn.q_proj`
match them as they match module names); embedding and head tensors under the HF name
with the model prefix removed.
"""

from __future__ import annotations

import dataclasses
import re

from strata.errors import ErrorKind, StrataError


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The facts of a config that the engine and the KV store need."""

    num_layers: int
    hidden: int
    num_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_positions: int
    eos_token_id: int | None
    pad_token_id: int | None
    num_kv_heads: int = 0  # grouped-query attention; 0 = num_heads
    mlp_matrices: int = 2  # 3 for gated (SwiGLU) MLPs

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one layer (q, o; k, v with their heads; the MLP)."""
        attn = 2 * self.hidden * self.num_heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + self.mlp_matrices * self.hidden * self.ffn


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    name: str
    model_prefix: str  # stripped from embedding / head names
    layer_pattern: str  # regex with one group: the layer index
    embed: tuple[str, ...]  # local names in the embed shard
    head: tuple[str, ...]  # local names in the head shard (lm_head only when untied)
    linears: tuple[str, ...]  # local names of a layer's matmul weights (quantization candidates)
    lm_head: str  # HF name of an untied lm head
    tied_to: str  # local embed name the head shares when tied

    def layer_prefix(self, i: int) -> str:
        return self.layer_pattern.replace(r"(\d+)", str(i)).replace("\\.", ".")

    def split_name(self, hf_name: str) -> tuple[str, int | None, str]:
        """('layer', i, local) / ('embed', None, local) / ('head', None, local) / ('skip', ...)."""
        m = re.match(self.layer_pattern, hf_name)
        if m:
            return "layer", int(m.group(1)), hf_name[m.end() :]
        if hf_name == self.lm_head:
            return "head", None, "lm_head.weight"
        local = hf_name.removeprefix(self.model_prefix)
        if local in self.embed:
            return "embed", None, local
        if local in self.head:
            return "head", None, local
        return "skip", None, hf_name


OPT = ArchSpec(
    name="opt",
    model_prefix="model.decoder.",
    layer_pattern=r"model\.decoder\.layers\.(\d+)\.",
    embed=("embed_tokens.weight", "embed_positions.weight"),
    head=("final_layer_norm.weight", "final_layer_norm.bias"),
    linears=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.out_proj.weight", "fc1.weight", "fc2.weight"),
    lm_head="lm_head.weight",
    tied_to="embed_tokens.weight",
)

BLOOM = ArchSpec(
    name="bloom",
    model_prefix="transformer.",
    layer_pattern=r"transformer\.h\.(\d+)\.",
    embed=("word_embeddings.weight", "word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias"),
    head=("ln_f.weight", "ln_f.bias"),
    linears=("self_attention.query_key_value.weight", "self_attention.dense.weight",
             "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"),
    lm_head="lm_head.weight",
    tied_to="word_embeddings.weight",
)

LLAMA = ArchSpec(  # Llama 2/3, Mistral, Qwen2: the same layer and names
    name="llama",
    model_prefix="model.",
    layer_pattern=r"model\.layers\.(\d+)\.",
    embed=("embed_tokens.weight",),
    head=("norm.weight",),
    linears=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),
    lm_head="lm_head.weight",
    tied_to="embed_tokens.weight",
)

SPECS = {"opt": OPT, "bloom": BLOOM, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}


def spec_for(config: dict) -> ArchSpec:
    model_type = config.get("model_type")
    if model_type not in SPECS:
        raise StrataError(
            ErrorKind.INVALID_ARGUMENT, f"model_type {model_type!r} is not supported (supported: {sorted(SPECS)})"
        )
    return SPECS[model_type]


def dims_for(config: dict) -> ModelDims:
    spec = spec_for(config)
    if spec is OPT:
        if config.get("word_embed_proj_dim", config["hidden_size"]) != config["hidden_size"]:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, "OPT with word_embed_proj_dim != hidden_size is not supported")
        h, nh = config["hidden_size"], config["num_attention_heads"]
        return ModelDims(
            num_layers=config["num_hidden_layers"], hidden=h, num_heads=nh, head_dim=h // nh,
            ffn=config["ffn_dim"], vocab=config["vocab_size"],
            max_positions=config["max_position_embeddings"],
            eos_token_id=config.get("eos_token_id"), pad_token_id=config.get("pad_token_id"),
        )
    if spec is LLAMA:
        h, nh = config["hidden_size"], config["num_attention_heads"]
        return ModelDims(
            num_layers=config["num_hidden_layers"], hidden=h, num_heads=nh,
            head_dim=config.get("head_dim") or h // nh, ffn=config["intermediate_size"], vocab=config["vocab_size"],
            max_positions=config.get("max_position_embeddings", 4096),
            eos_token_id=_first(config.get("eos_token_id")), pad_token_id=config.get("pad_token_id"),
            num_kv_heads=config.get("num_key_value_heads") or nh, mlp_matrices=3,
        )
    h = config.get("hidden_size", config.get("n_embed"))
    nh = config.get("n_head", config.get("num_attention_heads"))
    return ModelDims(
        num_layers=config.get("n_layer", config.get("num_hidden_layers")), hidden=h, num_heads=nh,
        head_dim=h // nh, ffn=4 * h, vocab=config["vocab_size"],
        max_positions=config.get("seq_length", 2048) or 2048,  # ALiBi: no table; BLOOM trained at 2048
        eos_token_id=config.get("eos_token_id"), pad_token_id=config.get("pad_token_id"),
    )


def _first(token_id):
    """Llama 3 configs list several EOS ids; the first is the one generation ends on."""
    return token_id[0] if isinstance(token_id, list) and token_id else token_id

"""Architecture specs: each model family described once, as plain data.

A family is one `ArchSpec` in one module of `strata/model/families/` (found by listing that
package: adding a family is adding a module there, nothing else). The spec says
  - which HF config keys hold the dimensions (`ConfigKeys`, read by `dims_for`);
  - how the checkpoint's tensors are named (`Names`, read by the converter: shards,
    quantization candidates, the tied head);
  - the layer's math as options (`Math`: norm kind, pre/post/parallel residual,
    position scheme, fused or separate q/k/v, MLP kind and activation, where the
    query is scaled), which compute_node/model.py interprets with torch.
This module imports no torch: the cost model and the planner run without it.

Local names: a layer's tensors are stored under the HF name with the layer prefix
removed (so DeepSpeed `post_init_quant` patterns such as `fc` or `self_attn.q_proj`
match them as they match module names); embedding and head tensors under the HF name
with the model prefix removed; an untied head as `lm_head.weight`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re

from strata.runtime.errors import ErrorKind, StrataError


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
    # layout facts the planner's memory model reads (strata/policy/cost_model.py, memory_model.py)
    mlp_activation: str = ""  # the MLP's activation (relu is fused into its matmul)
    fused_qkv: bool = False  # q, k, v stored as one matrix
    tied_head: bool = True  # the head reuses the token embedding
    position_rows: int = 0  # rows of a learned position table (0: none)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one layer (q, o; k, v with their heads; the MLP)."""
        attn = 2 * self.hidden * self.num_heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + self.mlp_matrices * self.hidden * self.ffn


@dataclasses.dataclass(frozen=True)
class Cfg:
    """A flag the config decides: `key`'s value (`default` when absent), negated if `negate`."""

    key: str
    default: bool
    negate: bool = False

    def resolve(self, config: dict) -> bool:
        value = config.get(self.key)
        return bool(self.default if value is None else value) != self.negate


Flag = bool | Cfg


@dataclasses.dataclass(frozen=True)
class ConfigKeys:
    """Where a family's config keeps each fact: the first key present (not None) wins."""

    layers: tuple[str, ...] = ("num_hidden_layers",)
    hidden: tuple[str, ...] = ("hidden_size",)
    heads: tuple[str, ...] = ("num_attention_heads",)
    kv_heads: tuple[str, ...] = ()  # none present: as many as query heads
    head_dim: tuple[str, ...] = ()  # none present: hidden // heads
    ffn: tuple[str, ...] = ("intermediate_size",)  # none present: 4 * hidden
    max_positions: tuple[str, ...] = ("max_position_embeddings",)
    max_positions_default: int | None = None  # None: one of the keys is required
    eps: tuple[str, ...] = ("layer_norm_eps",)  # none present: Math.eps
    activation: tuple[str, ...] = ("hidden_act",)  # none present: Math.activation


@dataclasses.dataclass(frozen=True)
class Names:
    """Local names, without `.weight` / `.bias` (a bias is used where the checkpoint has one)."""

    tokens: str  # token embedding (embed shard)
    attn_norm: str  # norm before attention (after it, in a post-norm layer)
    mlp_norm: str  # norm before the MLP (after it, in a post-norm layer)
    final_norm: str  # norm before the head (head shard)
    qkv: tuple[str, ...]  # q, k, v projections; one name when Math.qkv is "fused"
    out: str  # attention output projection
    mlp: tuple[str, ...]  # (up, down); (gate, up, down) when Math.mlp is "gated"
    positions: str = ""  # learned position table (embed shard), Math.positions "learned"
    embed_norm: str = ""  # norm right after the embedding (BLOOM), embed shard


NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "alibi", "rope")
QKV = ("separate", "fused")
QUERY_SCALES = ("attention", "attention_inv_sqrt", "projection")
MLPS = ("plain", "gated")


@dataclasses.dataclass(frozen=True)
class Math:
    """The layer's math, as options (Flags may be left to a config key)."""

    norm: str  # NORMS: LayerNorm (weight, bias) or RMSNorm (weight; computed in float32)
    positions: str  # POSITIONS; "rope" follows the HF config (theta, scaling, partial rotary)
    mlp: str  # MLPS: down(act(up(x))) or down(act(gate(x)) * up(x))
    activation: str  # when no ConfigKeys.activation key is present; a transformers ACT2FN name or "bloom_gelu"
    eps: float = 1e-5  # when no ConfigKeys.eps key is present
    qkv: str = "separate"  # QKV; "fused": one projection laid out [heads, (q, k, v), head_dim]
    query_scale: str = "attention"  # QUERY_SCALES: softmax scale head_dim**-0.5; or 1/sqrt(head_dim),
    # which differs in the last bit for some head_dims (BLOOM's); or q's projection times head_dim**-0.5 (OPT)
    position_offset: int = 0  # learned table row = position + offset (OPT: 2)
    pre_norm: Flag = True  # False: post-norm, each residual sum is normalized (OPT-350m)
    residual_from_norm: Flag = False  # the residual is the norm's output (BLOOM's option)
    parallel: Flag = False  # h + attn(norm1(h)) + mlp(norm2(h)) (GPT-NeoX)
    shared_norm: Flag = False  # in a parallel layer the MLP reads norm1(h) too (no norm2)
    final_norm: Flag = True  # pre-norm stacks normalize before the head (post-norm never)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    name: str  # the manifest's `architecture`
    model_types: tuple[str, ...]  # HF `model_type`s this spec reads
    model_prefix: str  # stripped from embedding / head names
    layer_pattern: str  # regex with one group: the layer index
    names: Names
    math: Math
    keys: ConfigKeys = ConfigKeys()
    lm_head: str = "lm_head.weight"  # HF name of an untied head
    must_match: tuple[tuple[str, str], ...] = ()  # config keys that must agree when both are present
    must_be: tuple[tuple[str, object], ...] = ()  # config key: the only supported value when present
    ignored: tuple[str, ...] = ()  # local layer names the converter skips (buffers older checkpoints saved)

    def __post_init__(self):
        m, n = self.math, self.names
        for value, allowed in ((m.norm, NORMS), (m.positions, POSITIONS), (m.qkv, QKV),
                               (m.query_scale, QUERY_SCALES), (m.mlp, MLPS)):
            if value not in allowed:
                raise ValueError(f"{self.name}: {value!r} is not one of {allowed}")
        if len(n.qkv) != (1 if m.qkv == "fused" else 3) or len(n.mlp) != (3 if m.mlp == "gated" else 2):
            raise ValueError(f"{self.name}: names.qkv / names.mlp do not fit math.qkv / math.mlp")
        if (m.positions == "learned") != bool(n.positions):
            raise ValueError(f"{self.name}: names.positions is needed exactly for learned positions")

    @property
    def embed(self) -> tuple[str, ...]:
        """Local names in the embed shard (those the checkpoint has are kept)."""
        return (f"{self.names.tokens}.weight", *_params(self.names.positions, "weight"),
                *self._norm_params(self.names.embed_norm))

    @property
    def head(self) -> tuple[str, ...]:
        """Local names in the head shard besides an untied lm_head."""
        return self._norm_params(self.names.final_norm)

    def _norm_params(self, name: str) -> tuple[str, ...]:
        return _params(name, "weight", "bias") if self.math.norm == "layernorm" else _params(name, "weight")

    @property
    def linears(self) -> tuple[str, ...]:
        """Local names of a layer's matmul weights: the quantization candidates."""
        return tuple(f"{x}.weight" for x in (*self.names.qkv, self.names.out, *self.names.mlp))

    @property
    def tied_to(self) -> str:
        """Local embed name the head shares when tied."""
        return f"{self.names.tokens}.weight"

    def layer_prefix(self, i: int) -> str:
        return self.layer_pattern.replace(r"(\d+)", str(i)).replace("\\.", ".")

    def split_name(self, hf_name: str) -> tuple[str, int | None, str]:
        """('layer', i, local) / ('embed', None, local) / ('head', None, local) / ('skip', ...)."""
        m = re.match(self.layer_pattern, hf_name)
        if m:
            local = hf_name[m.end() :]
            return ("skip", None, hf_name) if local in self.ignored else ("layer", int(m.group(1)), local)
        if hf_name == self.lm_head:
            return "head", None, "lm_head.weight"
        local = hf_name.removeprefix(self.model_prefix)
        if local in self.embed:
            return "embed", None, local
        if local in self.head:
            return "head", None, local
        return "skip", None, hf_name

    def math_for(self, config: dict) -> Math:
        """`math` with every Flag decided by `config`, eps and activation read from it."""
        m, k = self.math, self.keys
        flags = {f.name: _flag(getattr(m, f.name), config) for f in dataclasses.fields(m)
                 if isinstance(getattr(m, f.name), (bool, Cfg))}
        return dataclasses.replace(m, eps=_get(config, k.eps, m.eps),
                                   activation=_get(config, k.activation, m.activation), **flags)

    def dims(self, config: dict) -> ModelDims:
        self.check(config)
        k = self.keys
        h, nh = _get(config, k.hidden), _get(config, k.heads)
        math = self.math_for(config)
        max_positions = _get(config, k.max_positions,
                             _REQUIRED if k.max_positions_default is None else k.max_positions_default)
        return ModelDims(
            num_layers=_get(config, k.layers), hidden=h, num_heads=nh,
            head_dim=_get(config, k.head_dim, None) or h // nh, ffn=_get(config, k.ffn, None) or 4 * h,
            vocab=config["vocab_size"], max_positions=max_positions,
            eos_token_id=_first(config.get("eos_token_id")), pad_token_id=config.get("pad_token_id"),
            num_kv_heads=_get(config, k.kv_heads, None) or nh, mlp_matrices=len(self.names.mlp),
            mlp_activation=math.activation, fused_qkv=math.qkv == "fused",
            tied_head=bool(config.get("tie_word_embeddings", True)),
            position_rows=(max_positions + math.position_offset) if math.positions == "learned" else 0,
        )

    def check(self, config: dict) -> None:
        """INVALID_ARGUMENT for a config this spec's math does not cover."""
        kv, heads = _get(config, self.keys.kv_heads, None), _get(config, self.keys.heads, None)
        if self.math.qkv == "fused" and kv is not None and kv != heads:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{self.name}: a fused q/k/v needs kv heads == heads")
        for a, b in self.must_match:
            if config.get(a) is not None and config.get(b) is not None and config[a] != config[b]:
                raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{self.name} with {a} != {b} is not supported")
        for key, value in self.must_be:
            if config.get(key) is not None and config[key] != value:
                raise StrataError(ErrorKind.INVALID_ARGUMENT,
                                  f"{self.name} with {key}={config[key]!r} is not supported (only {value!r})")


def _params(name: str, *kinds: str) -> tuple[str, ...]:
    return tuple(f"{name}.{kind}" for kind in kinds) if name else ()


def _flag(value: Flag, config: dict) -> bool:
    return value.resolve(config) if isinstance(value, Cfg) else value


_REQUIRED = object()


def _get(config: dict, keys: tuple[str, ...], default=_REQUIRED):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is _REQUIRED:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"config has none of {list(keys)}")
    return default


def _first(token_id):
    """Llama 3 configs list several EOS ids; the first is the one generation ends on."""
    return token_id[0] if isinstance(token_id, list) and token_id else token_id


_REGISTRY: dict[str, ArchSpec] = {}
_loaded = False


def registry() -> dict[str, ArchSpec]:
    """model_type -> spec: every module of strata/model/families/, and any spec `register`ed."""
    global _loaded
    if not _loaded:
        import strata.model.families as package

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            _add(importlib.import_module(f"{package.__name__}.{info.name}").SPEC)
        _loaded = True
    return dict(_REGISTRY)


def register(spec: ArchSpec) -> ArchSpec:
    """Adds a spec declared outside strata/model/families/ (a test, a plugin)."""
    registry()
    return _add(spec)


def unregister(spec: ArchSpec) -> None:
    for model_type in spec.model_types:
        if _REGISTRY.get(model_type) is spec:
            del _REGISTRY[model_type]


def _add(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        other = _REGISTRY.get(model_type)
        if other is not None and other is not spec:
            raise ValueError(f"model_type {model_type!r} is declared twice: {other.name} and {spec.name}")
    _REGISTRY.update(dict.fromkeys(spec.model_types, spec))
    return spec


def spec_for(config: dict) -> ArchSpec:
    specs = registry()
    model_type = config.get("model_type")
    if model_type not in specs:
        raise StrataError(
            ErrorKind.INVALID_ARGUMENT, f"model_type {model_type!r} is not supported (supported: {sorted(specs)})"
        )
    return specs[model_type]


def dims_for(config: dict) -> ModelDims:
    return spec_for(config).dims(config)

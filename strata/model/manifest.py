"""The shard manifest: every stored array's file, offset, length, dtype, shape and
sha256, each tensor's quantization, and the model config. Torch-free.

Layout on disk (one directory per converted model):
    manifest.json
    embed.bin            embeddings (and BLOOM's embedding layernorm)
    layer_0000.bin ...   one file per transformer layer
    head.bin             final norm (and lm_head when untied)
    tokenizer files copied from the source checkpoint
Every part's offset is 4 KiB aligned (direct I/O).

A tensor has parts: unquantized -> {"data"}; quantized -> {"data" (packed uint8),
"scale", "min"} (see strata/model/quant.py for the packing)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from strata.runtime.errors import ErrorKind, StrataError

FORMAT = "strata-shards/1"
ALIGN = 4096
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Part:
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int  # 4 or 8
    group_size: int


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]  # logical shape
    dtype: str  # logical dtype after dequantization
    quant: QuantSpec | None
    parts: dict[str, Part]


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str  # "embed", "layer.0", ..., "head"
    file: str
    size: int  # file size in bytes (aligned)
    tensors: dict[str, TensorEntry]


@dataclasses.dataclass(frozen=True)
class Manifest:
    architecture: str
    config: dict
    shards: dict[str, Shard]
    quantization: dict  # how it was converted: {"bits":..., "group_size":..., "ds_config": ...}

    @property
    def num_layers(self) -> int:
        return sum(1 for s in self.shards if s.startswith("layer."))

    def layer(self, i: int) -> Shard:
        return self.shards[layer_shard(i)]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "architecture": self.architecture,
                "config": self.config,
                "quantization": self.quantization,
                "shards": [_shard_to_dict(s) for s in self.shards.values()],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            shards = {s["name"]: _shard_from_dict(s) for s in d["shards"]}
            return cls(d["architecture"], d["config"], shards, d.get("quantization", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError: JSON but not an object
            raise StrataError(ErrorKind.DATA_LOSS, f"{where} is not a valid Strata manifest: {e}") from None

    def save(self, directory: pathlib.Path) -> None:
        (directory / MANIFEST).write_text(self.to_json())

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> "Manifest":
        directory = pathlib.Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise StrataError(ErrorKind.NOT_FOUND, f"model directory {str(directory)!r} does not exist")
        if not path.is_file():
            raise StrataError(
                ErrorKind.NOT_FOUND,
                f"{str(directory)!r} has no {MANIFEST}: not a converted Strata model (run `strata convert`)",
            )
        return cls.from_json(path.read_text(), where=str(path))


def layer_shard(i: int) -> str:
    return f"layer.{i}"


def shard_file(name: str) -> str:
    if name.startswith("layer."):
        return f"layer_{int(name.split('.')[1]):04d}.bin"
    return f"{name}.bin"


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _shard_to_dict(s: Shard) -> dict:
    return {
        "name": s.name,
        "file": s.file,
        "size": s.size,
        "tensors": {
            k: {
                "shape": list(t.shape),
                "dtype": t.dtype,
                "quant": dataclasses.asdict(t.quant) if t.quant else None,
                "parts": {pn: {**dataclasses.asdict(p), "shape": list(p.shape)} for pn, p in t.parts.items()},
            }
            for k, t in s.tensors.items()
        },
    }


def _shard_from_dict(d: dict) -> Shard:
    tensors = {}
    for k, t in d["tensors"].items():
        parts = {pn: Part(p["offset"], p["length"], p["dtype"], tuple(p["shape"]), p["sha256"]) for pn, p in t["parts"].items()}
        q = QuantSpec(**t["quant"]) if t["quant"] else None
        tensors[k] = TensorEntry(tuple(t["shape"]), t["dtype"], q, parts)
    return Shard(d["name"], d["file"], d["size"], tensors)

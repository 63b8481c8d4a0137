"""The compute node's view of the weights: the weight store's host tier, mapped from
shared memory (or read as bytes from a remote store), and the device-resident copies.

Mechanism only: which layers stay resident is the placement's decision
(strata/placement.py)."""

from __future__ import annotations

import dataclasses

import torch

from compute_node.peers import WeightStoreClient
from strata.errors import ErrorKind, StrataError
from strata.manifest import Manifest, Shard, TensorEntry, layer_shard
from strata.shm import Region, torch_dtype


@dataclasses.dataclass
class StoredTensor:
    """One tensor as it sits in the host tier: views of its parts."""

    entry: TensorEntry
    parts: dict[str, torch.Tensor]


class HostWeights:
    """Every shard of the model as views into host memory (zero-copy when shared)."""

    def __init__(self, manifest: Manifest, tokenizer_json: str, raw: dict[str, torch.Tensor], regions: list[Region]):
        self.manifest, self.tokenizer_json = manifest, tokenizer_json
        self._regions = regions
        self._pinned: list[int] = []
        self._shards = {name: shard_views(manifest.shards[name], raw[name]) for name in raw}

    @classmethod
    def from_store(cls, client: WeightStoreClient, transport: str = "shm") -> "HostWeights":
        """Map the weight store's host tier ("shm"), or fetch every shard as bytes
        ("bytes": the fallback for a store on another host)."""
        manifest, tokenizer_json = client.manifest()
        raw: dict[str, torch.Tensor] = {}
        regions: dict[str, Region] = {}
        if transport == "shm":
            for name, loc in client.locate().items():
                region = regions.get(loc.region) or Region.attach(loc.region)
                regions[loc.region] = region
                raw[name] = region.bytes_view(loc.offset, loc.byte_size)
        elif transport == "bytes":
            for name in manifest.shards:
                raw[name] = torch.frombuffer(bytearray(client.read_shard(name)), dtype=torch.uint8)
        else:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"unknown weight transport {transport!r}")
        return cls(manifest, tokenizer_json, raw, list(regions.values()))

    @classmethod
    def from_directory(cls, directory) -> "HostWeights":
        """Read a converted model's files directly (unit tests of the engine; no service)."""
        import pathlib

        d = pathlib.Path(directory)
        manifest = Manifest.load(d)
        raw = {n: torch.frombuffer(bytearray((d / s.file).read_bytes()), dtype=torch.uint8) for n, s in manifest.shards.items()}
        tok = d / "tokenizer.json"
        return cls(manifest, tok.read_text() if tok.exists() else "", raw, [])

    def shard(self, name: str) -> dict[str, StoredTensor]:
        try:
            return self._shards[name]
        except KeyError:
            raise StrataError(ErrorKind.NOT_FOUND, f"shard {name!r} is not in the host tier") from None

    def holds(self, name: str) -> bool:
        return name in self._shards

    def pin(self) -> None:
        """Page-lock the mapped host tier for fast async host-to-GPU copies."""
        cudart = torch.cuda.cudart()
        for region in self._regions:
            err = cudart.cudaHostRegister(region.data_ptr(), region.size, 0)
            if int(err) != 0:
                raise StrataError(ErrorKind.INTERNAL, f"cudaHostRegister of {region.name} failed ({err})")
            self._pinned.append(region.data_ptr())

    def close(self) -> None:
        if self._pinned:
            cudart = torch.cuda.cudart()
            for ptr in self._pinned:
                cudart.cudaHostUnregister(ptr)
            self._pinned.clear()
        self._shards.clear()
        for region in self._regions:
            region.close()
        self._regions.clear()


def shard_views(shard: Shard, raw: torch.Tensor) -> dict[str, StoredTensor]:
    """Each tensor of a shard as views of its parts in `raw` (the shard's bytes)."""
    out = {}
    for local, entry in shard.tensors.items():
        parts = {}
        for pname, part in entry.parts.items():
            if part.offset + part.length > raw.numel():
                raise StrataError(ErrorKind.DATA_LOSS, f"shard {shard.file}: {local}.{pname} lies past its end")
            view = raw[part.offset : part.offset + part.length]
            parts[pname] = view.view(torch_dtype(part.dtype)).view(part.shape)
        out[local] = StoredTensor(entry, parts)
    return out


def dummy_layer_on_device(manifest: Manifest, i: int, device: torch.device) -> dict[str, StoredTensor]:
    """A dummy model's layer made directly in device memory (never in the host tier)."""
    from strata.dummy_fill import fill

    shard = manifest.shards[layer_shard(i)]
    raw = torch.empty(shard.size, dtype=torch.uint8, device=device)
    fill({shard.name: raw}, manifest, threads=1)
    return shard_views(shard, raw)


def check_manifest(manifest: Manifest) -> None:
    if manifest.num_layers == 0 or "embed" not in manifest.shards or "head" not in manifest.shards:
        raise StrataError(ErrorKind.DATA_LOSS, "manifest lacks embed/head/layer shards")

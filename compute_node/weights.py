"""The compute node's view of the weights: the weight store's host tier, mapped from
shared memory (or read as bytes from a remote store), and its disk tier, read into
staging slots on request (compute_node/disk_stage.py).

Mechanism only: which layers stay resident is the placement's decision
(strata/policy/placement.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from compute_node.device import Device
from compute_node.disk_stage import DiskStager
from compute_node.peers import WeightStoreClient
from strata.model.manifest import Manifest, Shard, TensorEntry, layer_shard
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.shm import Region, torch_dtype


@dataclasses.dataclass
class StoredTensor:
    """One tensor as it sits in the host tier: views of its parts."""

    entry: TensorEntry
    parts: dict[str, torch.Tensor]


class HostWeights:
    """Every shard of the model as views into host memory (zero-copy when shared), or,
    for the disk tier, a `stager` that reads a shard into a staging slot on request."""

    def __init__(self, manifest: Manifest, tokenizer_json: str, raw: dict[str, torch.Tensor], regions: list[Region],
                 stager: DiskStager | None = None, disk: frozenset[str] = frozenset()):
        self.manifest, self.tokenizer_json = manifest, tokenizer_json
        self._regions = regions
        self._pinned: list[Region] = []
        self._pin_device: Device | None = None
        self._raw = raw
        self._shards = {name: shard_views(manifest.shards[name], raw[name]) for name in raw}
        self.stager, self.disk = stager, disk

    @classmethod
    def from_store(cls, client: WeightStoreClient, transport: str = "shm") -> "HostWeights":
        """Map the weight store's host tier ("shm"), or fetch every shard as bytes
        ("bytes": the fallback for a store on another host)."""
        manifest, tokenizer_json = client.manifest()
        if transport not in ("shm", "bytes"):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"unknown weight transport {transport!r}")
        located = client.locate()
        disk = frozenset(loc.shard for loc in located.locations if loc.on_disk)
        if disk and transport != "shm":
            raise StrataError(ErrorKind.FAILED_PRECONDITION,
                              f"{len(disk)} shards are on the weight store's disk; the bytes transport needs them "
                              "in its host tier (start it without --disk-offload / --host-budget-gb)")
        raw: dict[str, torch.Tensor] = {}
        regions: dict[str, Region] = {}
        for loc in located.locations:
            if loc.on_disk:
                continue
            if transport == "bytes":
                raw[loc.shard] = torch.frombuffer(bytearray(client.read_shard(loc.shard)), dtype=torch.uint8)
                continue
            region = regions.get(loc.region) or Region.attach(loc.region)
            regions[loc.region] = region
            raw[loc.shard] = region.bytes_view(loc.offset, loc.byte_size)
        stager = DiskStager(client, located.staging) if disk else None
        return cls(manifest, tokenizer_json, raw, list(regions.values()), stager, disk)

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

    def raw(self, name: str) -> torch.Tensor:
        """A host-tier shard's bytes, one contiguous uint8 tensor (for a single copy)."""
        self.shard(name)  # the clear error for a shard the tier does not hold
        return self._raw[name]

    def holds(self, name: str) -> bool:
        return name in self._shards or name in self.disk

    @contextlib.contextmanager
    def borrow(self, name: str) -> Iterator[dict[str, StoredTensor]]:
        """A shard's views for a synchronous copy, wherever it lives: the host tier, or
        a staging slot held for the duration (disk tier)."""
        if name not in self.disk:
            yield self.shard(name)
            return
        slot, views = self.staged(name)
        try:
            yield views
        finally:
            self.stager.release(slot)  # type: ignore[union-attr]

    def staged(self, name: str) -> tuple[int, dict[str, StoredTensor]]:
        """A disk-tier shard read into a staging slot: (slot, views); give the slot
        back with `stager.release(slot, event)` once copied out."""
        slot, raw = self.staged_raw(name)
        return slot, shard_views(self.manifest.shards[name], raw)

    def staged_raw(self, name: str) -> tuple[int, torch.Tensor]:
        """As `staged`, the slot's bytes as one contiguous uint8 tensor."""
        return self.stager.take(name)  # type: ignore[union-attr]

    def pin(self, device: Device) -> None:
        """Page-lock the mapped host tier (and staging slots) for async host-to-device
        copies (`device`: the node's Device; a no-op on the CPU); unpinned at `close`."""
        self._pin_device = device
        for region in self._regions + ([self.stager.region] if self.stager else []):
            if device.pin(region):
                self._pinned.append(region)

    def close(self) -> None:
        for region in self._pinned:
            self._pin_device.unpin(region)  # type: ignore[union-attr]
        self._pinned.clear()
        if self.stager is not None:
            self.stager.close()
        self._shards.clear()
        self._raw.clear()
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


def dummy_shard_on_device(manifest: Manifest, name: str, device: torch.device) -> dict[str, StoredTensor]:
    """A dummy model's shard (a resident layer, the embeddings, the head) made directly
    in device memory (never in the host tier), a buffer per part as a shard read from
    files has (layer_weights.to_device): a part replaced later (q, k, v merged for the
    fused kernel) frees its bytes, where views of one shard buffer would keep them all
    alive."""
    from tools.dummy.weights import fill

    shard = manifest.shards[name]
    raw = torch.empty(shard.size, dtype=torch.uint8, device=device)
    fill({shard.name: raw}, manifest, threads=1)
    views = shard_views(shard, raw)
    return {name: StoredTensor(st.entry, {p: t.clone() for p, t in st.parts.items()}) for name, st in views.items()}


def check_manifest(manifest: Manifest) -> None:
    if manifest.num_layers == 0 or "embed" not in manifest.shards or "head" not in manifest.shards:
        raise StrataError(ErrorKind.DATA_LOSS, "manifest lacks embed/head/layer shards")

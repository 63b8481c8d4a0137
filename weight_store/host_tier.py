"""The host tier: every shard of a converted model in one owned shared-memory region.

Each shard sits at a 4 KiB aligned offset; peers map the region by name and read a
shard at (offset, byte_size). Shards are loaded with a ShardReader (all at start, or
on first request) and each part's sha256 is checked on first load. Thread-safe:
concurrent requests for one shard load it once; different shards load in parallel.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import pathlib
import threading
from typing import Callable

import torch

from strata.model.manifest import Manifest, Shard, align
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import shm
from weight_store.reader import ShardReader

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one shard lives in the region."""

    shard: str
    offset: int
    byte_size: int


def layout(manifest: Manifest, only: set[str] | None = None) -> tuple[dict[str, Slot], int]:
    """Each shard's aligned slot in manifest order (only those in `only`, if given),
    and the region size."""
    slots, offset = {}, 0
    for name, shard in manifest.shards.items():
        if only is not None and name not in only:
            continue
        size = shard_bytes(shard)
        slots[name] = Slot(name, offset, size)
        offset += align(size)
    return slots, offset


def shard_bytes(shard: Shard) -> int:
    """Bytes of a shard's file the manifest accounts for."""
    return max([shard.size] + [p.offset + p.length for t in shard.tensors.values() for p in t.parts.values()])


def shard_sizes(manifest: Manifest) -> dict[str, int]:
    """Each shard's bytes, as the tier policy (strata/policy/placement.py) weighs them."""
    return {name: shard_bytes(s) for name, s in manifest.shards.items()}


def part_digests(shard: Shard, data: torch.Tensor, pool: concurrent.futures.Executor | None = None):
    """(tensor name, part name, part, sha256 hex) of every part of `shard` (its bytes in
    `data`); with a `pool`, the parts are hashed in parallel (hashlib releases the GIL)."""
    parts = [(t, p, part) for t, entry in shard.tensors.items() for p, part in entry.parts.items()]

    def digest(part) -> str:
        return hashlib.sha256(memoryview(data[part.offset : part.offset + part.length].numpy())).hexdigest()

    digests = (pool.map if pool else map)(digest, [x[2] for x in parts])
    return [(t, p, part, got) for (t, p, part), got in zip(parts, digests)]


def verify_shard(shard: Shard, path: str, data: torch.Tensor,
                 pool: concurrent.futures.Executor | None = None) -> None:
    """sha256 of every part of `shard` (its bytes in `data`) against the manifest."""
    for tensor_name, part_name, part, got in part_digests(shard, data, pool):
        if got != part.sha256:
            raise StrataError(
                ErrorKind.DATA_LOSS,
                f"shard {shard.name!r} (file {path}), tensor {tensor_name} part {part_name} at offset "
                f"{part.offset} ({part.length} bytes): sha256 mismatch",
            )


def read_shard(reader: ShardReader, model_dir: pathlib.Path, shard: Shard, data: torch.Tensor, verify: bool,
               pool: concurrent.futures.Executor | None = None) -> None:
    """Fill `data` (the shard's bytes) from its file, checking each part's sha256 if
    `verify` (in parallel on `pool`, if given)."""
    path = str(model_dir / shard.file)
    reader.read_into(path, data, 0, data.numel())
    if verify:
        verify_shard(shard, path, data, pool)


class HostTier:
    """One region holding all shards of `manifest` (stored under `model_dir`). Owns
    `reader` from here on: close() closes it too. With no reader there are no files:
    shards come from `fill_all` (dummy weights)."""

    def __init__(self, model_dir: str | pathlib.Path, manifest: Manifest, session: str,
                 reader: ShardReader | None, verify: bool = True, only: set[str] | None = None):
        self._dir = pathlib.Path(model_dir)
        self._manifest = manifest
        self._reader = reader
        self._verify = verify
        self._slots, size = layout(manifest, only)
        check_shm_space(size)
        self.region = shm.Region.create(shm.region_name(session, "weights"), size)
        self._loaded: set[str] = set()
        self._locks = {name: threading.Lock() for name in self._slots}
        self._state = threading.Lock()

    @property
    def region_name(self) -> str:
        return self.region.name

    @property
    def shard_names(self) -> list[str]:
        return list(self._slots)

    def slot(self, shard: str) -> Slot:
        try:
            return self._slots[shard]
        except KeyError:
            raise StrataError(ErrorKind.NOT_FOUND, f"no shard {shard!r} in the manifest") from None

    def is_loaded(self, shard: str) -> bool:
        with self._state:
            return shard in self._loaded

    def loaded_count(self) -> int:
        with self._state:
            return len(self._loaded)

    def all_loaded(self) -> bool:
        return self.loaded_count() == len(self._slots)

    def ensure_loaded(self, shard: str) -> Slot:
        """The shard's slot, reading and verifying it first if not yet loaded."""
        slot = self.slot(shard)
        with self._locks[shard]:
            if self.is_loaded(shard):
                return slot
            if self._reader is None:
                raise StrataError(ErrorKind.FAILED_PRECONDITION, f"shard {shard!r} has no file and was not filled")
            read_shard(self._reader, self._dir, self._manifest.shards[shard],
                       self.region.bytes_view(slot.offset, slot.byte_size), self._verify)
            with self._state:
                self._loaded.add(shard)
        log.debug("loaded shard %s (%d bytes)", shard, slot.byte_size)
        return slot

    def load_all(self, stop: threading.Event | None = None, parallel: int = 4) -> None:
        """Load every shard (a few at once, so hashing overlaps reading). Returns early
        when `stop` is set; raises the first shard's error."""
        names = self.shard_names
        with concurrent.futures.ThreadPoolExecutor(max(1, parallel), thread_name_prefix="shard-load") as pool:
            futures = {pool.submit(self._load_unless_stopped, n, stop): n for n in names}
            try:
                for f in concurrent.futures.as_completed(futures):
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _load_unless_stopped(self, shard: str, stop: threading.Event | None) -> None:
        if stop is None or not stop.is_set():
            self.ensure_loaded(shard)

    def fill_all(self, write: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Fill every shard from memory: `write` gets each shard's uint8 view of the
        region (no files, no sha256). Marks every shard loaded."""
        write({n: self.region.bytes_view(s.offset, s.byte_size) for n, s in self._slots.items()})
        with self._state:
            self._loaded.update(self._slots)

    def read_bytes(self, shard: str) -> bytes:
        """A copy of the shard's bytes (loading it first)."""
        slot = self.ensure_loaded(shard)
        return self.region.bytes_view(slot.offset, slot.byte_size).numpy().tobytes()

    def close(self) -> None:
        """Unmap and unlink the region; stop the reader."""
        if self._reader is not None:
            self._reader.close()
        self.region.close()


def check_shm_space(size: int) -> None:
    """Fail clearly up front instead of SIGBUS on a full /dev/shm."""
    st = os.statvfs(shm.SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise StrataError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"the host tier needs {size} bytes of shared memory, {shm.SHM_DIR} has {free} free",
        )

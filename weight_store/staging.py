"""The disk tier: shards the host tier does not hold are read from their files into a
few staging slots of one shared-memory region, on request, each time they are needed.

The caller (the compute node) owns the slots: it asks for a shard into a slot it no
longer reads from, maps the region, and copies the bytes out before reusing the slot.
Reads go through the weight store's ShardReader (O_DIRECT where aligned, so the page
cache neither helps nor fills); each part's sha256 is checked on every read when
verification is on, hashed in parallel with the other parts.
"""

from __future__ import annotations

import concurrent.futures
import logging
import pathlib
import threading
import time

from strata.model.manifest import Manifest
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport import shm
from weight_store.host_tier import Slot, check_shm_space, read_shard, shard_bytes
from weight_store.reader import ShardReader

log = logging.getLogger(__name__)


class StagingArea:
    def __init__(self, model_dir: str | pathlib.Path, manifest: Manifest, session: str, reader: ShardReader,
                 shards: frozenset[str], slots: int, slot_bytes: int, verify: bool = True):
        self._dir = pathlib.Path(model_dir)
        self._manifest = manifest
        self._reader = reader
        self._verify = verify
        self.shards = shards
        self.slots, self.slot_bytes = slots, slot_bytes
        for name in shards:
            if shard_bytes(manifest.shards[name]) > slot_bytes:
                raise StrataError(ErrorKind.INTERNAL, f"shard {name!r} is larger than a staging slot")
        check_shm_space(slots * slot_bytes)
        self.region = shm.Region.create(shm.region_name(session, "staging"), slots * slot_bytes)
        self._locks = [threading.Lock() for _ in range(slots)]
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(max(2, slots * 2), thread_name_prefix="verify")

    def stage(self, shard: str, slot: int) -> tuple[Slot, float]:
        """Read `shard` into `slot`; (its place in the region, seconds spent)."""
        if shard not in self._manifest.shards:
            raise StrataError(ErrorKind.NOT_FOUND, f"no shard {shard!r} in the manifest")
        if shard not in self.shards:
            raise StrataError(ErrorKind.FAILED_PRECONDITION, f"shard {shard!r} is in the host tier, not on disk")
        if not 0 <= slot < self.slots:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"staging slot {slot} out of range (0..{self.slots - 1})")
        info = self._manifest.shards[shard]
        place = Slot(shard, slot * self.slot_bytes, shard_bytes(info))
        if not self._locks[slot].acquire(blocking=False):
            raise StrataError(ErrorKind.FAILED_PRECONDITION, f"staging slot {slot} is being filled by another request")
        try:
            t0 = time.perf_counter()
            read_shard(self._reader, self._dir, info, self.region.bytes_view(place.offset, place.byte_size),
                       self._verify, self._hash_pool)
            took = time.perf_counter() - t0
        finally:
            self._locks[slot].release()
        return place, took

    def close(self) -> None:
        self._hash_pool.shutdown(wait=True)
        self.region.close()

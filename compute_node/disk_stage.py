"""Disk-tier shards, read by the weight store into its staging slots ahead of use.

The compute node owns the slots. `DiskStager` keeps every free slot reading the next
disk layer in the cyclic order the passes use them (so the disk never waits for the
GPU), hands a finished slot's bytes out with `take`, and gives the slot back with
`release` once the copy out of it is done (an event of the node's device,
compute_node/device/: waited for on a helper thread, so the caller never blocks on
it). A `take` out of that order (resident layers at start, a new request mid-pass)
drains the reads in flight and restarts the order there.
"""

from __future__ import annotations

import concurrent.futures
import threading

import torch

from compute_node.peers import WeightStoreClient
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.shm import Region
from strata.transport.wire import weight_store_pb2


class DiskStager:
    def __init__(self, client: WeightStoreClient, staging: weight_store_pb2.Staging):
        self._client = client
        self.region = Region.attach(staging.region)
        self.slots, self.slot_bytes = staging.slots, staging.slot_bytes
        self.order: list[str] = []  # disk layers in pass order, prefetched cyclically once started
        self._next = 0
        self._free = list(range(self.slots))
        self._pending: dict[str, tuple[int, concurrent.futures.Future]] = {}
        self._lock = threading.Condition()
        self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage-release")
        self.prefetch = False

    def start(self, order: list[str]) -> None:
        """Prefetch `order` (the streamed disk layers in pass order) cyclically from now
        on; before, only what `take` asks for is read (resident layers at start)."""
        with self._lock:
            self.order, self._next, self.prefetch = list(order), 0, True
            self._fill()

    def _issue(self, name: str) -> None:
        """Under the lock, with a free slot: start reading `name`."""
        slot = self._free.pop()
        request = weight_store_pb2.StageShardRequest(shard=name, slot=slot)
        self._pending[name] = (slot, self._client.stage_async(request))

    def _fill(self) -> None:
        """Under the lock: start reads into free slots, in cyclic order."""
        while self.prefetch and self._free and self.order:
            name = self.order[self._next]
            if name in self._pending:
                return
            self._issue(name)
            self._next = (self._next + 1) % len(self.order)

    def _restart(self, name: str) -> None:
        """Under the lock: drop the reads in flight (waiting for them: their slots are
        being written) and read `name` next, as soon as a slot is free."""
        for slot, future in self._pending.values():
            _settle(future)
            self._free.append(slot)
        self._pending.clear()
        if name in self.order:
            self._next = self.order.index(name)
        while name not in self._pending:
            if not self._free:
                self._lock.wait()  # a slot still being copied out of comes back
            elif name in self.order and self.prefetch:
                self._fill()
            else:
                self._issue(name)

    def take(self, name: str) -> tuple[int, torch.Tensor]:
        """(slot, the shard's bytes in it), once read. The slot is the caller's until
        `release`."""
        with self._lock:
            if name not in self._pending:
                self._restart(name)
            slot, future = self._pending.pop(name)
        try:
            loc = self._client.result(future).location
        except StrataError:
            with self._lock:
                self._free.append(slot)
            raise
        if loc.offset + loc.byte_size > self.region.size:
            raise StrataError(ErrorKind.INTERNAL, f"staged shard {name!r} lies past the staging region")
        return slot, self.region.bytes_view(loc.offset, loc.byte_size)

    def release(self, slot: int, done=None) -> None:
        """Give `slot` back once `done` (an event after the copy out of it) has completed."""
        if done is None:
            self._give_back(slot)
        else:
            self._waiter.submit(self._after, done, slot)

    def _after(self, done, slot: int) -> None:
        done.synchronize()
        self._give_back(slot)

    def _give_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
            self._fill()
            self._lock.notify_all()

    def close(self) -> None:
        self._waiter.shutdown(wait=True)
        with self._lock:
            for _, future in self._pending.values():
                _settle(future)
            self._pending.clear()
        self.region.close()


def _settle(future) -> None:
    """Wait for an RPC future whose result no one needs (its error included)."""
    try:
        future.result()
    except Exception:  # noqa: BLE001 - dropped read: only its completion matters
        pass

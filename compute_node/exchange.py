"""The compute node's exchange buffers: shared-memory regions it owns and registers
with the KV store, through which queries, keys, values and attention outputs travel.

Two halves alternate by layer, so the prefill keys/values of layer i can still be in
flight to the KV store while layer i+1 stages its own; a half is reused only after
its transfers are done. Each half starts with one region of `region_bytes`, created,
pinned (on a device that pins) and registered at construction (pinning a few GB takes
seconds: at start, not inside a request's prefill); a region is added when a half runs
out (a bigger batch). Keys and values leave the device on the exchange's offload
stream (compute_node/slot_kv.py)."""

from __future__ import annotations

import concurrent.futures

import torch

from compute_node.device import CpuDevice, Device
from compute_node.peers import KVStoreClient
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.dataplane import Arena
from strata.transport.shm import Region, region_name


class Exchange:
    def __init__(self, client: KVStoreClient, session: str, region_bytes: int, device: Device | None = None):
        """`device`: the node's Device (default the CPU's: nothing to pin, no stream)."""
        self.client, self.session = client, session
        self.region_bytes = region_bytes
        self.dev = device if device is not None else CpuDevice()
        self.halves: list[list[Arena]] = [[], []]
        self.pending: list[list] = [[], []]
        self.current = 0
        self.layer = None
        self._regions: list[Region] = []
        self._pinned: set[int] = set()  # id() of each region pinned
        self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-append")
        self.offload_stream = self.dev.new_stream()
        try:
            for half in self.halves:
                half.append(Arena(self._new_region(region_bytes)))
        except BaseException:
            self.close()
            raise

    def on_layer(self, layer: int) -> None:
        """Called with the layer being staged; switching layers switches halves."""
        if layer == self.layer:
            return
        self.layer = layer
        self.current ^= 1
        self.drain(self.current)
        for arena in self.halves[self.current]:
            arena.reset()

    def send_after(self, event, call) -> None:
        """Run `call` (a blocking RPC) on the sender thread once `event` (the device's
        event, or None) has completed: the device->host copy it needs is done. Keeps the
        compute stream free of waits."""

        def run():
            if event is not None:
                event.synchronize()
            return call()

        self.pending[self.current].append(self._sender.submit(run))

    def drain(self, half: int | None = None) -> None:
        for h in ([half] if half is not None else [0, 1]):
            pending, self.pending[h] = self.pending[h], []
            for fut in pending:
                fut.result()  # re-raises the RPC's StrataError

    def alloc(self, shape, dtype: torch.dtype):
        for arena in self.halves[self.current]:
            try:
                return arena.alloc(shape, dtype)
            except StrataError as e:
                if e.kind is not ErrorKind.RESOURCE_EXHAUSTED:
                    raise
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        arena = Arena(self._new_region(max(self.region_bytes, 2 * nbytes + 4096)))
        self.halves[self.current].append(arena)
        return arena.alloc(shape, dtype)

    def _new_region(self, size: int) -> Region:
        region = Region.create(region_name(self.session, "exchange"), size)
        if self.dev.pin(region, required=False):  # unpinned, the copies still work, slower
            self._pinned.add(id(region))
        self._regions.append(region)
        self.client.register_region(region.name, region.size)
        return region

    def close(self) -> None:
        self._sender.shutdown(wait=True)
        for region in self._regions:
            try:
                self.client.unregister_region(region.name)
            except StrataError:
                pass  # the KV store is gone; its mapping went with it
            if id(region) in self._pinned:
                self.dev.unpin(region)
            region.close()
        self._regions.clear()
        self._pinned.clear()
        self.halves = [[], []]

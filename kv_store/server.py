"""The KV store service: gRPC control plane over the host KV cache.

Tensors arrive as TensorRefs into the client's registered shared-memory regions (or
inline bytes, the fallback for a remote peer). One lock per group: calls on different
groups run concurrently, calls on one group are serialized.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time

import grpc
import torch

from kv_store import host_pages
from kv_store.group_cache import GroupCache, GroupSpec
from kv_store.host_pages import huge_page_tensor
from kv_store.ledger import ArenaAllocator, CapacityLedger, cache_bytes
from kv_store.native import NativeDecodeAttention
from kv_store.quantized import QuantizedGroupCache, quantized_bytes
from strata.policy.run_plan import RunPlan
from strata.runtime import logs
from strata.runtime.config import KVStoreConfig
from strata.runtime.errors import ErrorKind, StrataError, grpc_method
from strata.transport import rpc
from strata.transport.dataplane import inline_ref, resolve
from strata.transport.shm import RegionTable, torch_dtype
from strata.transport.wire import common_pb2, kv_store_pb2, kv_store_pb2_grpc

MAX_MESSAGE_BYTES = 256 << 20
LOG = logging.getLogger("strata.kv_store")


@dataclasses.dataclass
class _Group:
    cache: GroupCache
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # attend_s / append_s: per call, queueing included; compute_s: the compute thread's
    # time in this group's attention (kernel, append, output copy), queueing excluded;
    # span: (first, last) attend's end, for the share of the decode the thread was busy
    # bytes: cache bytes the attends read (rows x attended tokens x row_token_bytes)
    timing: dict = dataclasses.field(default_factory=lambda: {"attends": 0, "attend_s": 0.0, "append_s": 0.0,
                                                              "compute_s": 0.0, "span": None, "bytes": 0})

    @functools.cached_property
    def row_token_bytes(self) -> float:
        """Bytes of one row's K and V at one token of one layer, as stored."""
        s = self.cache.spec
        return self.cache.nbytes / (s.num_layers * s.batch * s.max_tokens)


def spec_from_request(req: kv_store_pb2.AllocateRequest) -> GroupSpec:
    """The one place an AllocateRequest becomes a GroupSpec."""
    if req.position_bias not in (kv_store_pb2.POSITION_BIAS_NONE, kv_store_pb2.POSITION_BIAS_ALIBI):
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"unknown position bias {req.position_bias}")
    spec = GroupSpec(
        num_layers=req.num_layers,
        batch=req.batch,
        num_heads=req.num_heads,
        head_dim=req.head_dim,
        max_tokens=req.max_tokens,
        dtype=torch_dtype(req.dtype),
        scale=req.scale,
        alibi=req.position_bias == kv_store_pb2.POSITION_BIAS_ALIBI,
        pad=tuple(req.pad),
        num_kv_heads=req.num_kv_heads,
        kv_bits=req.kv_bits or 16,
        kv_group_size=req.kv_group_size,
    )
    spec.validate()
    return spec


class KVStoreServicer(kv_store_pb2_grpc.KVStoreServicer):
    def __init__(self, config: KVStoreConfig):
        self.config = config
        self.ledger = CapacityLedger(config.capacity_bytes)
        self.regions = RegionTable()
        self._groups: dict[str, _Group] = {}
        self._groups_lock = threading.Lock()
        # Every CPU-heavy op runs on one thread, so only one OpenMP team is ever
        # active (ops from several gRPC threads each keep a team that competes for the
        # cores). Default: all cores but two, left to the peers' host threads; a
        # preempted OpenMP thread stalls the whole parallel region (BENCHMARKS.md,
        # "All runs": T1 decode with and without it).
        if config.attention not in ("native", "sdpa"):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"attention must be native or sdpa, got {config.attention!r}")
        threads = config.threads or max(1, (os.cpu_count() or 1) - 2)
        self._cpu = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="kv-compute", initializer=torch.set_num_threads, initargs=(threads,)
        )
        # The native kernel's threads claim rows as they go, so a preempted one does not
        # stall the call: by default it takes every core (faster at T1 than leaving two
        # to the peers; BENCHMARKS.md).
        kernel_threads = config.threads or os.cpu_count() or 1
        # built with the run plan's prefetch macros (bench configuration), else the sources' defaults
        defines = config.plan.kv_kernel_defines if config.plan is not None else ()
        self.native = NativeDecodeAttention.create(kernel_threads, defines) if config.attention == "native" else None
        self.arena = self.arena_bytes = None
        if config.preallocate and config.capacity_bytes > 0:
            # The whole capacity, faulted in once at start by every core: a request's
            # prefill then writes into ready memory (first touch measured ~7 GB/s).
            try:
                t0 = time.perf_counter()
                self.arena_bytes = huge_page_tensor(config.capacity_bytes)
                self._cpu.submit(self.arena_bytes.zero_).result()
                LOG.info("KV arena faulted in in %.1f s: %s", time.perf_counter() - t0,
                         host_pages.describe(self.arena_bytes))
            except (OSError, RuntimeError) as e:
                self._cpu.shutdown()
                if self.native is not None:
                    self.native.close()
                raise StrataError(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    f"cannot reserve {config.capacity_bytes} bytes of host memory for the KV cache ({e}); "
                    "lower the KV capacity",
                ) from None
            self.arena = ArenaAllocator(config.capacity_bytes)

    def close(self) -> None:
        """Drop every group (logging the timing of each still allocated) and unmap every region."""
        with self._groups_lock:
            for name, group in self._groups.items():
                log_timing(name, group, "still allocated at stop")
            self._groups.clear()
        self._cpu.shutdown(wait=True)
        if self.native is not None:
            self.native.close()
        self.regions.close_all()

    def _group(self, name: str) -> _Group:
        with self._groups_lock:
            group = self._groups.get(name)
        if group is None:
            raise StrataError(ErrorKind.NOT_FOUND, f"group {name!r} is not allocated")
        return group

    @grpc_method
    def Health(self, request, context):
        ledger = self.ledger
        detail = f"{ledger.bytes_free} of {ledger.capacity_bytes} bytes free, {len(ledger.groups())} groups"
        plan = self.config.plan
        if plan is not None:
            detail += f"; plan: KV at {plan.kv_bits} bits" + (f" in groups of {plan.kv_group_size}" if plan.kv_group_size
                                                             else "")
        return common_pb2.HealthResponse(ready=True, service="kv_store", detail=detail)

    @grpc_method
    def RegisterRegion(self, request, context):
        self.regions.register(request.name, request.byte_size)
        return common_pb2.RegisterRegionResponse()

    @grpc_method
    def UnregisterRegion(self, request, context):
        self.regions.unregister(request.name)
        return common_pb2.UnregisterRegionResponse()

    def _check_plan(self, spec: GroupSpec) -> None:
        """A group of other bits or groups than the run plan's is refused (the compute node
        read the same plan)."""
        plan = self.config.plan
        if plan is None:
            return
        if spec.kv_bits != plan.kv_bits or (plan.kv_bits != 16 and spec.kv_group != plan.kv_group_size):
            raise StrataError(ErrorKind.FAILED_PRECONDITION,
                              f"the run plan's KV cache is at {plan.kv_bits} bits (group {plan.kv_group_size}); "
                              f"asked for {spec.kv_bits} bits (group {spec.kv_group if spec.kv_bits != 16 else 0})")

    @grpc_method
    def Allocate(self, request, context):
        if not request.group:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, "group name is empty")
        spec = spec_from_request(request)
        self._check_plan(spec)
        quantized = spec.kv_bits in (4, 8)
        if quantized:
            nbytes = quantized_bytes(spec)
        else:
            nbytes = cache_bytes(spec.num_layers, spec.batch, spec.kv_heads, spec.max_tokens, spec.head_dim,
                                 spec.itemsize)
        free = self.ledger.reserve(request.group, nbytes)
        in_arena = False
        try:
            storage = None
            if self.arena is not None:
                offset = self.arena.alloc(request.group, nbytes)
                in_arena = True
                storage = self.arena_bytes[offset : offset + nbytes]
            group = _Group((QuantizedGroupCache if quantized else GroupCache)(spec, storage, self.native))
        except BaseException:
            self.ledger.free(request.group)
            if in_arena:
                self.arena.release(request.group)
            raise
        with self._groups_lock:
            self._groups[request.group] = group
        return kv_store_pb2.AllocateResponse(bytes_reserved=nbytes, bytes_free=free)

    @grpc_method
    def Append(self, request, context):
        group = self._group(request.group)
        with group.lock, resolve(request.key, self.regions) as k, resolve(request.value, self.regions) as v:
            t0 = time.perf_counter()
            if request.rows:  # prompts of slots joining the group's running batch
                rows, lengths = list(request.rows), list(request.lengths)
                self._cpu.submit(group.cache.append_rows, request.layer, rows, lengths, k, v).result()
                length = max(lengths)
            else:
                length = self._cpu.submit(group.cache.append, request.layer, k, v).result()
            group.timing["append_s"] += time.perf_counter() - t0
        return kv_store_pb2.AppendResponse(length=length)

    @grpc_method
    def Attend(self, request, context):
        group = self._group(request.group)
        with group.lock, contextlib.ExitStack() as refs:
            q, k, v = (refs.enter_context(resolve(r, self.regions)) for r in (request.query, request.key, request.value))
            dst = refs.enter_context(resolve(request.output, self.regions)) if request.output.region else None
            t0 = time.perf_counter()
            positions = list(request.positions) or None
            slots = None if positions is None else (positions, list(request.idle_rows))
            out, compute_s = self._cpu.submit(self._attend, group.cache, request.layer, q, k, v, dst,
                                              slots).result()
            t1 = time.perf_counter()
            t = group.timing
            t["attend_s"] += t1 - t0
            t["compute_s"] += compute_s
            t["attends"] += 1
            t["span"] = (t["span"][0] if t["span"] else t1, t1)
            length = max(positions) + 1 if positions else group.cache.lengths[request.layer]
            t["bytes"] += (len(positions) if positions else group.cache.spec.batch) * length * group.row_token_bytes
        if dst is None:
            return kv_store_pb2.AttendResponse(output=inline_ref(out), length=length)
        return kv_store_pb2.AttendResponse(output=request.output, length=length)

    @staticmethod
    def _attend(cache: GroupCache, layer: int, q, k, v, dst, slots=None) -> tuple[torch.Tensor, float]:
        """On the compute thread: the step's store and attention, the result written
        into the caller's output region where one is given. Returns the output and the
        seconds this took."""
        t0 = time.perf_counter()
        if dst is not None and (dst.shape != q.shape or dst.dtype != q.dtype):
            raise StrataError(
                ErrorKind.INVALID_ARGUMENT,
                f"output ref is {list(dst.shape)} {dst.dtype}, attention gives {list(q.shape)} {q.dtype}",
            )
        out = cache.attend(layer, q, k, v, dst) if slots is None else cache.attend_at(layer, q, k, v, *slots, dst)
        return out, time.perf_counter() - t0

    @grpc_method
    def Free(self, request, context):
        with self._groups_lock:
            group = self._groups.get(request.group)
        if group is None:
            raise StrataError(ErrorKind.NOT_FOUND, f"group {request.group!r} is not allocated")
        with group.lock:  # waits for a call in flight on this group
            with self._groups_lock:
                if self._groups.get(request.group) is not group:
                    raise StrataError(ErrorKind.NOT_FOUND, f"group {request.group!r} is not allocated")
                del self._groups[request.group]
            free = self.ledger.free(request.group)
            if self.arena is not None:
                self.arena.release(request.group)
        log_timing(request.group, group, "freed")
        return kv_store_pb2.FreeResponse(bytes_free=free)


def log_timing(name: str, group: _Group, event: str) -> None:
    """One log line of a group's attention timing, with the cache bytes its attends read
    per second of the compute thread's attention: the decode kernel's in-service rate."""
    t = group.timing
    span = t["span"][1] - t["span"][0] if t["span"] else 0.0
    rate = t["bytes"] / t["compute_s"] / 1e9 if t["compute_s"] else 0.0
    LOG.info("group %s %s: %d attends, %.3f s attention, %.3f s prefill append (both incl. queueing); "
             "%.3f s of attention on the compute thread (%.4g GB of cache read, %.4g GB/s), over %.3f s "
             "from the first attend to the last",
             name[:8], event, t["attends"], t["attend_s"], t["append_s"], t["compute_s"], t["bytes"] / 1e9, rate, span)


def serve(config: KVStoreConfig, servicer: KVStoreServicer | None = None) -> grpc.Server:
    """Start a server on `config.listen` ("unix:///path" or "host:port")."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    server = rpc.server(16, MAX_MESSAGE_BYTES, name="kv_store")  # a used address is refused, not shared
    kv_store_pb2_grpc.add_KVStoreServicer_to_server(servicer or KVStoreServicer(config), server)
    rpc.bind(server, config.listen)
    server.start()
    return server


def parse_args(argv: list[str] | None) -> KVStoreConfig:
    p = argparse.ArgumentParser(prog="python -m kv_store", description="Strata KV store: host KV cache, CPU attention")
    p.add_argument("--listen", required=True, help='"unix:///path" or "host:port"')
    p.add_argument("--session", required=True, help="shared-memory session id")
    p.add_argument("--capacity-bytes", type=int, default=KVStoreConfig.capacity_bytes)
    p.add_argument("--threads", type=int, default=KVStoreConfig.threads, help="CPU threads (0 = every core)")
    p.add_argument("--no-preallocate", action="store_true", help="allocate each group's cache on demand")
    p.add_argument("--attention", choices=["native", "sdpa"], default=KVStoreConfig.attention,
                   help="bfloat16 decode attention: the KV store's own kernel (built at start) or PyTorch SDPA")
    p.add_argument("--plan", default="", metavar="FILE",
                   help="run plan JSON (strata/policy/run_plan.py): groups of other KV bits than its are refused; its "
                        "kv_kernel_defines are the attention kernel's prefetch macros")
    a = p.parse_args(argv)
    return KVStoreConfig(listen=a.listen, session=a.session, capacity_bytes=a.capacity_bytes, threads=a.threads,
                         preallocate=not a.no_preallocate, attention=a.attention,
                         plan=RunPlan.load(a.plan) if a.plan else None)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop, unmap regions and exit 0."""
    argv = logs.setup_from_argv("kv_store", argv)
    try:
        config = parse_args(argv)
    except StrataError as e:  # a bad run plan
        LOG.error("%s", e)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        servicer = KVStoreServicer(config)
        server = serve(config, servicer)
    except StrataError as e:
        LOG.error("%s", e)
        return 1
    native = servicer.native
    LOG.info("serving on %s (%d bytes, %d threads, %s attention)", config.listen, config.capacity_bytes,
             native.threads if native is not None else torch.get_num_threads(), "native" if native else "SDPA")
    while not stop.wait(1.0):
        pass
    server.stop(grace=2.0).wait()
    servicer.close()
    if config.listen.startswith("unix://"):
        path = config.listen.removeprefix("unix://")
        if os.path.exists(path):
            os.unlink(path)
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

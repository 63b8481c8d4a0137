"""The weight store service: the manifest, shard locations in the host tier, and a bytes
fallback for a peer on another host.

Run as `python -m weight_store --model DIR --listen ADDR --session S`. With preload
(the default) every host-tier shard is read and verified at start and a corrupt shard
stops the process with its DATA_LOSS message; without preload, shards load on first
LocateShards / ReadShard and a corrupt one is answered with DATA_LOSS.

With `--host-budget-gb` or `--disk-offload`, the shards the host tier cannot hold
(strata/policy/placement.py `tier_plan`) stay on disk and are read into staging slots with
StageShard each time the compute node needs them (weight_store/staging.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import signal
import sys
import threading

import grpc

from strata.model.manifest import Manifest, layer_shard
from strata.policy.placement import STAGING_SLOTS, TierPlan, resident_layers, tier_plan
from strata.policy.run_plan import RunPlan
from strata.runtime import logs
from strata.runtime.config import WeightStoreConfig
from strata.runtime.errors import ErrorKind, StrataError, grpc_method
from strata.transport import rpc, shm
from strata.transport.wire import common_pb2, weight_store_pb2, weight_store_pb2_grpc
from weight_store.host_tier import HostTier, shard_bytes, shard_sizes
from weight_store.reader import make_reader
from weight_store.staging import StagingArea

log = logging.getLogger("weight_store")

MAX_MESSAGE_BYTES = 1 << 30
SERVICE = "weight_store"
TOKENIZER = "tokenizer.json"
TIERS = "layers "  # Health's detail ends with this and the layers' tiers as JSON (WeightStoreServicer.tiers)


class WeightStoreServicer(weight_store_pb2_grpc.WeightStoreServicer):
    """Answers from one manifest and its host tier."""

    def __init__(self, config: WeightStoreConfig, manifest: Manifest, tier: HostTier,
                 staging: StagingArea | None = None):
        self.config = config
        self.manifest = manifest
        self.tier = tier
        self.staging = staging
        self._manifest_json = manifest.to_json()
        tokenizer = pathlib.Path(config.model_dir) / TOKENIZER if config.model_dir else None
        self._tokenizer_json = tokenizer.read_text() if tokenizer and tokenizer.is_file() else ""
        self.port = 0  # the bound TCP port (0 for a unix socket until bound)
        self.tiers_json = json.dumps(self.tiers(), separators=(",", ":"))

    def tiers(self) -> dict:
        """Where each layer is, by index: `device` (resident on the compute node: read once
        from disk, or made there when dummy), `host` (the host tier), `disk` (read from disk
        every pass)."""
        c, n = self.config, self.manifest.num_layers
        device = set(c.plan.resident_layers if c.plan is not None else resident_layers(n, c.gpu_share))
        host = set(self.tier.shard_names)
        return {"device": sorted(device), "host": [i for i in range(n) if layer_shard(i) in host],
                "disk": [i for i in range(n) if self._on_disk(layer_shard(i)) and i not in device]}

    @grpc_method
    def Health(self, request, context):
        loaded, total = self.tier.loaded_count(), len(self.tier.shard_names)
        ready = loaded == total or not self.config.preload
        on_disk = f", {len(self.staging.shards)} on disk" if self.staging else ""
        return common_pb2.HealthResponse(
            ready=ready, service=SERVICE,
            detail=f"{loaded}/{total} shards loaded in {self.tier.region_name}{on_disk}; {TIERS}{self.tiers_json}",
        )

    @grpc_method
    def GetManifest(self, request, context):
        return weight_store_pb2.GetManifestResponse(
            manifest_json=self._manifest_json, tokenizer_json=self._tokenizer_json
        )

    def _on_disk(self, name: str) -> bool:
        return self.staging is not None and name in self.staging.shards

    @grpc_method
    def LocateShards(self, request, context):
        disk = sorted(self.staging.shards) if self.staging else []
        names = list(request.shards) or self.tier.shard_names + disk
        for name in names:
            if not self._on_disk(name):
                self.tier.slot(name)  # NOT_FOUND before loading anything
        locations = []
        for name in names:
            if self._on_disk(name):
                size = shard_bytes(self.manifest.shards[name])
                locations.append(weight_store_pb2.ShardLocation(shard=name, byte_size=size, on_disk=True))
                continue
            slot = self.tier.ensure_loaded(name)
            locations.append(
                weight_store_pb2.ShardLocation(
                    shard=name, region=self.tier.region_name, offset=slot.offset, byte_size=slot.byte_size
                )
            )
        response = weight_store_pb2.LocateShardsResponse(locations=locations)
        if self.staging:
            response.staging.CopyFrom(weight_store_pb2.Staging(
                region=self.staging.region.name, slots=self.staging.slots, slot_bytes=self.staging.slot_bytes))
        return response

    @grpc_method
    def StageShard(self, request, context):
        if self.staging is None:
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "every shard is in the host tier; nothing to stage")
        place, took = self.staging.stage(request.shard, request.slot)
        location = weight_store_pb2.ShardLocation(
            shard=place.shard, region=self.staging.region.name, offset=place.offset, byte_size=place.byte_size)
        return weight_store_pb2.StageShardResponse(location=location, read_s=took)

    @grpc_method
    def ReadShard(self, request, context):
        if self._on_disk(request.shard):
            raise StrataError(ErrorKind.FAILED_PRECONDITION,
                              f"shard {request.shard!r} is on disk; the bytes transport needs it in the host tier")
        slot = self.tier.slot(request.shard)
        if slot.byte_size > MAX_MESSAGE_BYTES - (1 << 20):
            raise StrataError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"shard {request.shard!r} has {slot.byte_size} bytes, more than one message may carry",
            )
        return weight_store_pb2.ReadShardResponse(data=self.tier.read_bytes(request.shard))


def load_manifest(config: WeightStoreConfig) -> Manifest:
    """The converted model's manifest, or the dummy shape's."""
    if config.dummy:
        from tools.dummy import manifest as dummy

        return dummy.dummy_manifest(config.dummy, config.dummy_bits, config.dummy_group_size)
    return Manifest.load(config.model_dir)


def plan_tiers(config: WeightStoreConfig, manifest: Manifest) -> TierPlan:
    """Which shards the host tier holds. Dummy runs have no files: they hold every
    streamed layer; the compute node makes its resident layers, embeddings and head on
    the GPU itself (DUMMY_ON_DEVICE). With a run plan, its layers decide; else the flags
    (strata/policy/placement.py `tier_plan`)."""
    if config.plan is not None:
        return _plan_tiers(config.plan, manifest, bool(config.dummy))
    if config.dummy:
        if config.disk_offload or config.host_budget_bytes:
            raise StrataError(ErrorKind.FAILED_PRECONDITION, DUMMY_ON_DISK)
        on_gpu = {layer_shard(i) for i in resident_layers(manifest.num_layers, config.gpu_share)}
        return TierPlan(frozenset(set(manifest.shards) - on_gpu - DUMMY_ON_DEVICE), frozenset(), 0, 0)
    return tier_plan(shard_sizes(manifest), manifest.num_layers, config.gpu_share, config.host_budget_bytes or None,
                     config.disk_offload)


# Shards of a dummy model the compute node always makes on its device: it keeps them there
# for the whole run, so a copy in the host tier would only take host memory.
DUMMY_ON_DEVICE = frozenset({"embed", "head"})
DUMMY_ON_DISK = ("dummy weights have no files to read from disk; write them to a directory first "
                 "(strata bench --dummy --disk-offload does)")


def _plan_tiers(plan: RunPlan, manifest: Manifest, dummy: bool) -> TierPlan:
    """The plan's tiers: resident layers never in the host tier (read once from disk
    through the staging slots, or made on the GPU when dummy, as are a dummy's embeddings
    and head), its disk layers read from disk every pass, every other shard in the host
    tier."""
    plan.check_model(manifest.num_layers)
    resident = {layer_shard(i) for i in plan.resident_layers}
    every_pass = {layer_shard(i) for i in plan.disk_layers}
    if dummy:
        if every_pass:
            raise StrataError(ErrorKind.FAILED_PRECONDITION, DUMMY_ON_DISK)
        return TierPlan(frozenset(set(manifest.shards) - resident - DUMMY_ON_DEVICE), frozenset(), 0, 0)
    disk = resident | every_pass
    if not disk:
        return TierPlan(frozenset(manifest.shards), frozenset(), 0, 0)
    sizes = shard_sizes(manifest)
    slot_bytes = max(sizes[layer_shard(i)] for i in range(manifest.num_layers))
    return TierPlan(frozenset(set(manifest.shards) - disk), frozenset(disk), STAGING_SLOTS, slot_bytes)


def _populate(config: WeightStoreConfig, manifest: Manifest, tier: HostTier, stop: threading.Event | None) -> None:
    """Dummy: random weights straight into the tier. Preload: read every shard."""
    if config.dummy:
        from tools.dummy.weights import fill

        tier.fill_all(lambda views: fill(views, manifest, threads=config.reader_threads))
    elif config.preload:
        tier.load_all(stop)
    log.info("host tier: %d/%d shards loaded", tier.loaded_count(), len(manifest.shards))


def _grpc_server(servicer: WeightStoreServicer, listen: str) -> grpc.Server:
    server = rpc.server(16, MAX_MESSAGE_BYTES, name="weight_store")  # a used address is refused, not shared
    weight_store_pb2_grpc.add_WeightStoreServicer_to_server(servicer, server)
    servicer.port = rpc.bind(server, listen)
    return server


def serve(config: WeightStoreConfig, stop: threading.Event | None = None,
          manifest: Manifest | None = None) -> tuple[grpc.Server, WeightStoreServicer]:
    """Load the manifest (unless given), create the host tier, start serving on
    `config.listen`, then fill the tier (dummy) or, with preload, load every shard
    before returning (Health says not ready meanwhile; a set `stop` cuts the preload
    short). On failure nothing is left running and no region is left behind."""
    manifest = manifest or load_manifest(config)
    plan = plan_tiers(config, manifest)
    reader = None if config.dummy else make_reader(config.reader_threads)
    tier = staging = server = None
    try:
        tier = HostTier(config.model_dir, manifest, config.session, reader,
                        verify=config.verify and not config.dummy, only=set(plan.host))
        if plan.disk:
            staging = StagingArea(config.model_dir, manifest, config.session, reader, plan.disk,
                                  plan.staging_slots, plan.slot_bytes, verify=config.verify)
        servicer = WeightStoreServicer(config, manifest, tier, staging)
        server = _grpc_server(servicer, config.listen)
        server.start()
        log.info("serving %s (%s, region %s) on %s", config.dummy or config.model_dir, plan.summary(),
                 tier.region_name, config.listen)
        _populate(config, manifest, tier, stop)
        return server, servicer
    except BaseException:
        if server is not None:
            server.stop(grace=None)
        if staging is not None:
            staging.close()
        if tier is not None:
            tier.close()  # closes the reader too
        elif reader is not None:
            reader.close()
        raise


def parse_args(argv: list[str] | None) -> WeightStoreConfig:
    p = argparse.ArgumentParser(prog="python -m weight_store", description="Strata weight store")
    p.add_argument("--model", default="", help="converted model directory (manifest.json + shards)")
    p.add_argument("--dummy", default="", metavar="SHAPE", help="random weights of a built-in shape, no files")
    p.add_argument("--quant-bits", type=int, default=4, choices=[4, 8, 16], help="with --dummy")
    p.add_argument("--group-size", type=int, default=64, help="with --dummy")
    p.add_argument("--gpu-share", type=float, default=0.0,
                   help="share of layers the compute node keeps on the GPU: with --dummy made there, "
                        "with a disk tier read once from disk; never held in the host tier")
    p.add_argument("--host-budget-gb", type=float, default=0.0,
                   help="host memory for the host tier and staging slots; layers beyond it stay on disk")
    p.add_argument("--disk-offload", action="store_true",
                   help="streamed layers stay on disk (the host tier caches some within --host-budget-gb)")
    p.add_argument("--plan", default="", metavar="FILE",
                   help="run plan JSON (strata/policy/run_plan.py): its resident and disk layers place the shards "
                        "(instead of --gpu-share, --host-budget-gb, --disk-offload)")
    p.add_argument("--listen", required=True, help='"unix:///path/to.sock" or "host:port"')
    p.add_argument("--session", default="", help="shared-memory name prefix (default: a new one)")
    p.add_argument("--reader-threads", type=int, default=8)
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    p.add_argument("--no-preload", action="store_true", help="load shards on first request")
    a = p.parse_args(argv)
    if bool(a.model) == bool(a.dummy):
        p.error("give exactly one of --model DIR or --dummy SHAPE")
    if a.plan and (a.gpu_share or a.host_budget_gb or a.disk_offload):
        p.error("--plan places the shards: give no --gpu-share, --host-budget-gb or --disk-offload with it")
    return WeightStoreConfig(
        model_dir=a.model, listen=a.listen, session=a.session or shm.new_session_id(),
        reader_threads=a.reader_threads, preload=not a.no_preload, verify=not a.no_verify, dummy=a.dummy,
        dummy_bits=a.quant_bits, dummy_group_size=a.group_size, gpu_share=a.gpu_share,
        host_budget_bytes=int(a.host_budget_gb * 2**30), disk_offload=a.disk_offload,
        plan=RunPlan.load(a.plan) if a.plan else None,
    )


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. Exit 0 on a clean stop, 2 on a bad model directory or
    manifest, 1 on any other start failure (e.g. a corrupt shard during preload)."""
    argv = logs.setup_from_argv("weight_store", argv)
    try:
        config = parse_args(argv)
    except StrataError as e:  # a bad run plan
        print(f"weight_store: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        manifest = load_manifest(config)
    except StrataError as e:
        print(f"weight_store: error: {e}", file=sys.stderr)
        return 2
    try:
        server, servicer = serve(config, stop, manifest)
    except StrataError as e:
        log.error("%s", e)
        return 1
    try:
        while not stop.wait(1.0):
            pass
        log.info("stopping")
    finally:
        server.stop(grace=2.0).wait()
        if servicer.staging is not None:
            servicer.staging.close()
        servicer.tier.close()
    return 0

"""The weight store service: the manifest, shard locations in the host tier, and a bytes
fallback for a peer on another host.

Run as `python -m weight_store --model DIR --listen ADDR --session S`. With preload
(the default) every shard is read and verified at start and a corrupt shard stops the
process with its DATA_LOSS message; without preload, shards load on first
LocateShards / ReadShard and a corrupt one is answered with DATA_LOSS.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import pathlib
import signal
import sys
import threading

import grpc

from strata import shm
from strata.config import WeightStoreConfig
from strata.errors import ErrorKind, StrataError, grpc_method
from strata.manifest import Manifest, layer_shard
from strata.placement import resident_layers
from strata.wire import common_pb2, weight_store_pb2, weight_store_pb2_grpc
from weight_store.host_tier import HostTier
from weight_store.reader import make_reader

log = logging.getLogger("weight_store")

MAX_MESSAGE_BYTES = 1 << 30
SERVICE = "weight_store"
TOKENIZER = "tokenizer.json"


class WeightStoreServicer(weight_store_pb2_grpc.WeightStoreServicer):
    """Answers from one manifest and its host tier."""

    def __init__(self, config: WeightStoreConfig, manifest: Manifest, tier: HostTier):
        self.config = config
        self.manifest = manifest
        self.tier = tier
        self._manifest_json = manifest.to_json()
        tokenizer = pathlib.Path(config.model_dir) / TOKENIZER if config.model_dir else None
        self._tokenizer_json = tokenizer.read_text() if tokenizer and tokenizer.is_file() else ""
        self.port = 0  # the bound TCP port (0 for a unix socket until bound)

    @grpc_method
    def Health(self, request, context):
        loaded, total = self.tier.loaded_count(), len(self.tier.shard_names)
        ready = loaded == total or not self.config.preload
        return common_pb2.HealthResponse(
            ready=ready, service=SERVICE, detail=f"{loaded}/{total} shards loaded in {self.tier.region_name}"
        )

    @grpc_method
    def GetManifest(self, request, context):
        return weight_store_pb2.GetManifestResponse(
            manifest_json=self._manifest_json, tokenizer_json=self._tokenizer_json
        )

    @grpc_method
    def LocateShards(self, request, context):
        names = list(request.shards) or self.tier.shard_names
        for name in names:
            self.tier.slot(name)  # NOT_FOUND before loading anything
        locations = []
        for name in names:
            slot = self.tier.ensure_loaded(name)
            locations.append(
                weight_store_pb2.ShardLocation(
                    shard=name, region=self.tier.region_name, offset=slot.offset, byte_size=slot.byte_size
                )
            )
        return weight_store_pb2.LocateShardsResponse(locations=locations)

    @grpc_method
    def ReadShard(self, request, context):
        slot = self.tier.slot(request.shard)
        if slot.byte_size > MAX_MESSAGE_BYTES - (1 << 20):
            raise StrataError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"shard {request.shard!r} has {slot.byte_size} bytes, more than one message may carry",
            )
        return weight_store_pb2.ReadShardResponse(data=self.tier.read_bytes(request.shard))


def _bind(server: grpc.Server, listen: str) -> int:
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise StrataError(ErrorKind.UNAVAILABLE, f"cannot listen on {listen!r}: {e}") from None
    if port == 0:
        raise StrataError(ErrorKind.UNAVAILABLE, f"cannot listen on {listen!r}")
    return port


def load_manifest(config: WeightStoreConfig) -> Manifest:
    """The converted model's manifest, or the dummy shape's."""
    if config.dummy:
        from weight_store import dummy

        return dummy.dummy_manifest(config.dummy, config.dummy_bits, config.dummy_group_size)
    return Manifest.load(config.model_dir)


def _held_shards(config: WeightStoreConfig, manifest: Manifest) -> set[str] | None:
    """Dummy runs leave out the layers the compute node makes on the GPU itself."""
    if not (config.dummy and config.dummy_gpu_share > 0):
        return None
    on_gpu = {layer_shard(i) for i in resident_layers(manifest.num_layers, config.dummy_gpu_share)}
    return set(manifest.shards) - on_gpu


def _populate(config: WeightStoreConfig, manifest: Manifest, tier: HostTier, stop: threading.Event | None) -> None:
    """Dummy: random weights straight into the tier. Preload: read every shard."""
    if config.dummy:
        from strata.dummy_fill import fill

        tier.fill_all(lambda views: fill(views, manifest, threads=config.reader_threads))
    elif config.preload:
        tier.load_all(stop)
    log.info("host tier: %d/%d shards loaded", tier.loaded_count(), len(manifest.shards))


def _grpc_server(servicer: WeightStoreServicer, listen: str) -> grpc.Server:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16), options=options)
    weight_store_pb2_grpc.add_WeightStoreServicer_to_server(servicer, server)
    servicer.port = _bind(server, listen)
    return server


def serve(config: WeightStoreConfig, stop: threading.Event | None = None,
          manifest: Manifest | None = None) -> tuple[grpc.Server, WeightStoreServicer]:
    """Load the manifest (unless given), create the host tier, start serving on
    `config.listen`, then fill the tier (dummy) or, with preload, load every shard
    before returning (Health says not ready meanwhile; a set `stop` cuts the preload
    short). On failure nothing is left running and no region is left behind."""
    manifest = manifest or load_manifest(config)
    reader = None if config.dummy else make_reader(config.reader_threads)
    try:
        tier = HostTier(config.model_dir, manifest, config.session, reader,
                        verify=config.verify and not config.dummy, only=_held_shards(config, manifest))
    except BaseException:
        if reader is not None:
            reader.close()
        raise
    server = None
    try:
        servicer = WeightStoreServicer(config, manifest, tier)
        server = _grpc_server(servicer, config.listen)
        server.start()
        log.info("serving %s (%d shards, region %s) on %s", config.dummy or config.model_dir,
                 len(manifest.shards), tier.region_name, config.listen)
        _populate(config, manifest, tier, stop)
        return server, servicer
    except BaseException:
        if server is not None:
            server.stop(grace=None)
        tier.close()
        raise


def parse_args(argv: list[str] | None) -> WeightStoreConfig:
    p = argparse.ArgumentParser(prog="python -m weight_store", description="Strata weight store")
    p.add_argument("--model", default="", help="converted model directory (manifest.json + shards)")
    p.add_argument("--dummy", default="", metavar="SHAPE", help="random weights of a built-in shape, no files")
    p.add_argument("--quant-bits", type=int, default=4, choices=[4, 8, 16], help="with --dummy")
    p.add_argument("--group-size", type=int, default=64, help="with --dummy")
    p.add_argument("--dummy-gpu-share", type=float, default=0.0,
                   help="with --dummy: these layers are made on the GPU by the compute node; not held here")
    p.add_argument("--listen", required=True, help='"unix:///path/to.sock" or "host:port"')
    p.add_argument("--session", default="", help="shared-memory name prefix (default: a new one)")
    p.add_argument("--reader-threads", type=int, default=8)
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    p.add_argument("--no-preload", action="store_true", help="load shards on first request")
    a = p.parse_args(argv)
    if bool(a.model) == bool(a.dummy):
        p.error("give exactly one of --model DIR or --dummy SHAPE")
    return WeightStoreConfig(
        model_dir=a.model, listen=a.listen, session=a.session or shm.new_session_id(),
        reader_threads=a.reader_threads, preload=not a.no_preload, verify=not a.no_verify, dummy=a.dummy,
        dummy_bits=a.quant_bits, dummy_group_size=a.group_size, dummy_gpu_share=a.dummy_gpu_share,
    )


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. Exit 0 on a clean stop, 2 on a bad model directory or
    manifest, 1 on any other start failure (e.g. a corrupt shard during preload)."""
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="weight_store: %(levelname)s %(message)s")
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
        servicer.tier.close()
    return 0

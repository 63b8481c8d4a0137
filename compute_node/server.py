"""The compute node process: connects to its peers, builds the engine, serves
`Generate`. Requests run one at a time on the device (a lock); each streams one
response per step."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent import futures

import grpc
import torch

from compute_node.engine import Engine, local_kv_factory, remote_kv_factory
from compute_node.exchange import Exchange
from compute_node.kernels import w4a16_mma, w4a16_wgmma
from compute_node.layer_weights import LayerWeights
from compute_node.metrics import Metrics
from compute_node.peers import CHANNEL_OPTIONS, KVStoreClient, WeightStoreClient
from strata.placement import resident_layers
from compute_node.sampling import Sampling
from compute_node.stops import StopWatch
from compute_node.tokenizer import TextCodec
from compute_node.validation import check_generate
from compute_node.weights import HostWeights, check_manifest, dummy_layer_on_device
from strata.manifest import layer_shard
from strata import logs
from strata.config import ComputeNodeConfig
from strata.errors import ErrorKind, StrataError, grpc_method, grpc_stream_method, invalid
from strata.wire import common_pb2, generate_pb2, generate_pb2_grpc

log = logging.getLogger("strata.compute_node")


def compute_dtype(config: ComputeNodeConfig) -> torch.dtype:
    if config.dtype:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[config.dtype]
    # bf16 on the GPU: as fast as fp16 there, and the KV store's CPU attention reads bf16 at
    # DRAM speed (AMX) but fp16 at half of it (bench/results/2026-11-26-run1-attn.jsonl)
    return torch.bfloat16 if config.device.startswith("cuda") else torch.float32


class ComputeNode:
    """Owns the device: the weights on it, the engine, the peers."""

    def __init__(self, config: ComputeNodeConfig, transport: str = "shm"):
        self.config = config
        self.device = torch.device(config.device)
        cuda = self.device.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise StrataError(ErrorKind.FAILED_PRECONDITION, "--device cuda asked for, but no CUDA device is present")
        self.dtype = compute_dtype(config)
        if cuda:
            torch.set_num_threads(2)  # the host side only stages copies; leave the cores to the KV store
            for kernels in (w4a16_wgmma, w4a16_mma):  # nvcc's first builds (seconds) at startup, not in a request
                kernels.prepare(self.device)
        self.ws = WeightStoreClient(config.weight_store, config.rpc_timeout_s)
        self.kv = KVStoreClient(config.kv_store, config.rpc_timeout_s) if config.kv_offload else None
        self.host = HostWeights.from_store(self.ws, transport)
        check_manifest(self.host.manifest)
        if cuda and transport == "shm":
            self.host.pin()
        manifest = self.host.manifest
        resident = resident_layers(manifest.num_layers, config.gpu_weight_share)
        source = None
        if manifest.quantization.get("dummy") and not all(self.host.holds(layer_shard(i)) for i in resident):
            source = lambda i: dummy_layer_on_device(manifest, i, self.device)  # noqa: E731
        self.layers = LayerWeights(self.host, self.device, self.dtype, resident, resident_source=source)
        self.exchange = None
        if self.kv is not None:
            self.exchange = Exchange(self.kv, config.session, config.exchange_bytes, pin=cuda)
            factory = remote_kv_factory(self.dtype, self.device, self.kv, self.exchange, config.kv_bits)
        else:
            factory = local_kv_factory(self.dtype, self.device, config.kv_bits)
        self.engine = Engine(self.layers, factory, config.micro_batches, config.max_batch, config.decode_graphs)
        self.codec = TextCodec(self.host.tokenizer_json)
        self.metrics = Metrics()
        self.model_name = manifest.config.get("_name_or_path") or "strata-model"
        self.lock = threading.Lock()

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()
        self.host.close()


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, node: ComputeNode):
        self.node = node

    @grpc_method
    def Health(self, request, context):
        return common_pb2.HealthResponse(ready=True, service="compute node", detail=str(self.node.device))

    @grpc_method
    def Stats(self, request, context):
        return generate_pb2.StatsResponse(values=self.node.metrics.snapshot(), model=self.node.model_name)

    @grpc_stream_method
    def Generate(self, request, context):
        node = self.node
        check_generate(request)
        prompts = [self._prompt_ids(i, p) for i, p in enumerate(request.prompts)]
        s = request.sampling
        sampling = Sampling(
            greedy=s.greedy, temperature=s.temperature or 1.0, top_k=s.top_k, top_p=s.top_p or 1.0, seed=s.seed
        )
        generated: list[list[int]] = [[] for _ in prompts]
        stops = StopWatch(list(request.stop), node.codec.decode, len(prompts))
        with node.lock:
            steps = node.engine.generate(prompts, request.max_new_tokens, sampling, request.stop_at_eos)
            try:
                for step, tokens in enumerate(steps):
                    tokens = [-1 if stops.stopped[i] else t for i, t in enumerate(tokens)]
                    for i, t in enumerate(tokens):
                        if t >= 0:
                            generated[i].append(t)
                            stops.check(i, generated[i])
                    if not context.is_active():
                        return
                    yield generate_pb2.GenerateResponse(step=step, tokens=tokens)
                    if all(stops.stopped):
                        break
            finally:
                steps.close()  # frees the KV cache now, also when stopped early
            stats = node.engine.last_stats
            log.info("generate: %d prompts, %s", len(prompts), {k: round(v, 3) for k, v in stats.items()})
        peak = torch.cuda.max_memory_allocated(node.device) if node.device.type == "cuda" else 0
        yield generate_pb2.GenerateResponse(
            step=len(generated[0]), done=True,
            texts=[stops.text(g) for g in generated],
            stats=generate_pb2.GenerateStats(
                prefill_s=stats.get("prefill_s", 0.0), decode_s=stats.get("decode_s", 0.0),
                generated_tokens=sum(len(g) for g in generated), peak_gpu_bytes=peak,
            ),
        )

    def _prompt_ids(self, i: int, prompt) -> list[int]:
        kind = prompt.WhichOneof("input")
        if kind == "ids":
            return list(prompt.ids.ids)
        if kind == "text":
            if not prompt.text:
                raise invalid(f"prompt {i} is empty")
            return self.node.codec.encode(prompt.text)
        raise invalid(f"prompt {i} is empty")


def serve(config: ComputeNodeConfig, transport: str = "shm"):
    node = ComputeNode(config, transport)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=CHANNEL_OPTIONS)
    generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(node), server)
    port = server.add_insecure_port(config.listen)
    if port == 0 and not config.listen.startswith("unix:"):
        raise StrataError(ErrorKind.UNAVAILABLE, f"cannot listen on {config.listen}")
    server.start()
    bound = config.listen
    if not bound.startswith("unix:") and bound.rsplit(":", 1)[-1] == "0":
        bound = f"{bound.rsplit(':', 1)[0]}:{port}"
    return server, node, bound


def parse_args(argv=None) -> tuple[ComputeNodeConfig, str]:
    p = argparse.ArgumentParser(prog="python -m compute_node", description="Strata compute node")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--session", required=True)
    p.add_argument("--weight-store", required=True)
    p.add_argument("--kv-store", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="", choices=["", "float16", "bfloat16", "float32"])
    p.add_argument("--kv-offload", action="store_true")
    p.add_argument("--kv-bits", type=int, default=16, choices=[4, 8, 16],
                   help="KV cache precision, on the device or in the KV store")
    p.add_argument("--rpc-timeout", type=float, default=30.0)
    p.add_argument("--gpu-weight-share", type=float, default=1.0)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--transport", choices=["shm", "bytes"], default="shm")
    p.add_argument("--exchange-bytes", type=int, default=ComputeNodeConfig.exchange_bytes,
                   help="bytes of each exchange half (KV store transfers), registered at start; grows on demand")
    p.add_argument("--no-decode-graphs", action="store_true", help="decode eagerly (no CUDA graph replay)")
    a = p.parse_args(argv)
    if a.kv_offload and not a.kv_store:
        p.error("--kv-offload needs --kv-store")
    cfg = ComputeNodeConfig(
        listen=a.listen, session=a.session, weight_store=a.weight_store, kv_store=a.kv_store, device=a.device,
        dtype=a.dtype, kv_offload=a.kv_offload, rpc_timeout_s=a.rpc_timeout, gpu_weight_share=a.gpu_weight_share,
        micro_batches=a.micro_batches, kv_bits=a.kv_bits, exchange_bytes=a.exchange_bytes,
        decode_graphs=not a.no_decode_graphs,
    )
    return cfg, a.transport


def main(argv=None) -> int:
    config, transport = parse_args(logs.setup_from_argv("compute_node", argv))
    try:
        server, node, bound = serve(config, transport)
    except StrataError as e:
        print(f"compute node: {e}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"READY {bound}", flush=True)
    stop.wait()
    server.stop(grace=2).wait()
    node.close()
    return 0

"""The compute node process: connects to its peers, builds the engine, serves
`Generate`. Requests run one at a time on the device (a lock); each streams one
response per step."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
import torch

from compute_node.device import Device, device_for
from compute_node.exchange import Exchange
from compute_node.kernels.choice import KernelChoice
from compute_node.layer_weights import LayerWeights
from compute_node.metrics import Metrics
from compute_node.model import family_for
from compute_node.peers import KVStoreClient, WeightStoreClient
from compute_node.runner import Runner
from compute_node.sampling import Sampling
from compute_node.requests import Request
from compute_node.scheduler import Scheduler
from compute_node.slot_kv import LocalSlots, RemoteSlots, SlotShape, kv_bytes_per_token
from compute_node.slots import Limits, default_max_queue, even_groups
from compute_node.stops import StopWatch, TextStream
from compute_node.tokenizer import TextCodec
from compute_node.validation import RequestLimits, add_request_limit_flags, check_generate
from compute_node.weights import HostWeights, check_manifest, dummy_shard_on_device
from strata.model.arch import dims_for
from strata.model.kv_quant import default_group
from strata.policy.run_plan import RunPlan
from strata.runtime import logs
from strata.runtime.config import ComputeNodeConfig
from strata.runtime.errors import ErrorKind, StrataError, grpc_method, grpc_stream_method, invalid
from strata.transport import rpc
from strata.transport.wire import common_pb2, generate_pb2, generate_pb2_grpc

log = logging.getLogger("strata.compute_node")
SPARE_WORKERS = 32  # gRPC threads beyond the running and waiting calls (health, stats, refusals)
DEFAULT_MAX_SEQ_LEN = 2048  # tokens a sequence slot holds unless --max-seq-len (and the model's positions) say less


def compute_dtype(device: Device, dtype: str) -> torch.dtype:
    """The plan's dtype, else the device's (bf16 on CUDA, float32 on the CPU and mock-cuda)."""
    if dtype:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    return device.default_dtype


def run_plan(config: ComputeNodeConfig, dims) -> RunPlan:
    """The launcher's run plan (checked against the model), or, for direct use, one made
    from the config's own placement flags."""
    group = default_group(dims.head_dim)
    plan = config.plan
    if plan is None:
        return RunPlan.with_share(
            dims.num_layers, config.gpu_weight_share, kv_home="kv_store" if config.kv_offload else "gpu",
            kv_bits=config.kv_bits, kv_group_size=group if config.kv_bits != 16 else 0,
            micro_batches=config.micro_batches, max_batch=config.max_batch, max_seq_len=config.max_seq_len,
            max_queue=config.max_queue, dtype=config.dtype, decode_graphs=config.decode_graphs,
            prefill_tokens_per_pass=config.prefill_tokens_per_pass)
    plan.check_model(dims.num_layers)
    if plan.kv_bits != 16 and plan.kv_group_size != group:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"run plan: kv_group_size {plan.kv_group_size} is not the "
                          f"{group} values per group this model's KV caches take (head_dim {dims.head_dim})")
    if plan.kv_offload and not config.kv_store:
        raise StrataError(ErrorKind.FAILED_PRECONDITION, "the run plan keeps the KV cache in the KV store: give "
                          "--kv-store")
    return plan


class ComputeNode:
    """Owns the device: the weights on it, the engine, the peers."""

    def __init__(self, config: ComputeNodeConfig, transport: str = "shm"):
        self.config = config
        # the device (compute_node/device/): made once here and handed to every part that
        # needs it. mock-cuda: CPU tensors through the CUDA paths, so CI covers them
        self.dev = device_for(config.device)
        self.device = self.dev.torch_device
        if self.dev.host_threads:
            torch.set_num_threads(self.dev.host_threads)
        self.ws = WeightStoreClient(config.weight_store, config.rpc_timeout_s)
        self.host = HostWeights.from_store(self.ws, transport)
        check_manifest(self.host.manifest)
        manifest = self.host.manifest
        self.dims = dims_for(manifest.config)
        self.plan = run_plan(config, self.dims)  # what this node does; it decides none of it again
        self.dtype = compute_dtype(self.dev, self.plan.dtype)
        # the decode matmuls' CUDA kernels (33-64 rows): the plan's, built for this device
        # now (nvcc's first builds take seconds: at startup, not in a request), kept for life
        self.kernels = KernelChoice.from_plan(self.plan).on_device(self.device)
        self.kv = KVStoreClient(config.kv_store, config.rpc_timeout_s) if self.plan.kv_offload else None
        if transport == "shm":
            self.host.pin(self.dev)
        resident = set(self.plan.resident_layers)
        source = None
        if manifest.quantization.get("dummy"):  # what the host tier lacks is made on the device
            source = lambda name: dummy_shard_on_device(manifest, name, self.device)  # noqa: E731
        self.layers = LayerWeights(self.host, self.dev, self.dtype, resident, device_source=source,
                                   kernels=self.kernels)
        self.exchange = None
        if self.kv is not None:
            self.exchange = Exchange(self.kv, config.session, config.exchange_bytes, self.dev)
        self.codec = TextCodec(self.host.tokenizer_json)
        self.metrics = Metrics()
        self.model_name = manifest.config.get("_name_or_path") or "strata-model"
        self.batch_limits = self._batch_limits(self.plan)
        self._report_plan()
        self.limits = RequestLimits.for_model(config, self.dims.max_positions, self.dims.vocab,
                                              self.batch_limits.capacity, self.codec.has_tokenizer)
        self.scheduler = Scheduler(self._runner(self.plan), self.batch_limits, self.dims.eos_token_id,
                                   self.dims.pad_token_id or 0, self.metrics, self.dev.max_memory_allocated,
                                   kv_gauge=(f"kv_bytes_used:{self.kv_home}", self.kv_token_bytes),
                                   prompt_pieces=self.kv is None, empty_cache=self.dev.empty_cache,
                                   prefill_budget=self.plan.prefill_tokens_per_pass)

    def _batch_limits(self, plan: RunPlan) -> Limits:
        """The running batch: slots in micro-batch groups, tokens per slot, wait queue."""
        capacity = min(plan.max_seq_len or DEFAULT_MAX_SEQ_LEN, self.dims.max_positions)
        slots = plan.max_batch
        return Limits(even_groups(slots, plan.micro_batches), capacity, plan.max_queue or default_max_queue(slots))

    def _report_plan(self) -> None:
        """What the node runs, in Stats (compute_node/metrics.py): its resident layers, the
        groups of its batch, its KV cache's bits."""
        resident = sorted(set(range(self.dims.num_layers)) - set(self.layers.streamed))
        self.metrics.set("plan_resident_layers", len(resident))
        for i in resident:
            self.metrics.set(f"resident_layer:{i}", 1)
        self.metrics.set("plan_micro_batches", len(self.batch_limits.groups))
        self.metrics.set("plan_prefill_tokens_per_pass", self.plan.prefill_tokens_per_pass)
        self.metrics.set("plan_kv_bits", self.plan.kv_bits)
        for name, on in self.kernels.report().items():  # the CUDA kernels the decode matmuls may run
            self.metrics.set(f"kernel:{name}", float(on))

    def _runner(self, plan: RunPlan) -> Runner:
        d, family = self.dims, family_for(self.host.manifest.config, self.dims)
        groups = []
        for rows in self.batch_limits.groups:
            shape = SlotShape(d.num_layers, d.num_heads, d.kv_heads, d.head_dim, rows, self.batch_limits.capacity,
                              family.scale, family.alibi)
            if self.kv is not None:
                groups.append(RemoteSlots(shape, self.dtype, self.dev, self.kv, self.exchange, plan.kv_bits))
            else:
                groups.append(LocalSlots(shape, self.dtype, self.dev, plan.kv_bits))
        self.kv_groups = groups
        tokens = self.batch_limits.slots * self.batch_limits.capacity
        per_token = kv_bytes_per_token(d, self.dtype, plan.kv_bits)
        self.kv_home = "gpu" if self.kv is None else "kv_store"
        for home in ("gpu", "kv_store"):
            self.metrics.set(f"kv_bytes_capacity:{home}", tokens * per_token if home == self.kv_home else 0)
            self.metrics.set(f"kv_bytes_used:{home}", 0)
        self.kv_token_bytes = per_token
        chunk = (self.config.prefill_chunk_tokens or plan.prefill_chunk_tokens
                 or max(self.batch_limits.groups) * self.batch_limits.capacity)
        graphs = plan.decode_graphs and self.dev.decode_graphs
        runner = Runner(self.layers, family, d.num_layers, groups, chunk, graphs)
        self.metrics.set("decode_graphs", float(runner.uses_graphs))  # what the node does, for bench and tests
        return runner

    def close(self) -> None:
        self.scheduler.stop()
        for g in getattr(self, "kv_groups", []):
            try:
                g.free()
            except StrataError:
                pass  # the KV store is gone
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
        check_generate(request, getattr(node, "limits", None))
        prompts = [self._prompt_ids(i, p) for i, p in enumerate(request.prompts)]
        s = request.sampling
        sampling = Sampling(
            greedy=s.greedy, temperature=s.temperature or 1.0, top_k=s.top_k, top_p=s.top_p or 1.0, seed=s.seed
        )
        stops = StopWatch(list(request.stop), node.codec.decode, len(prompts))
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        job = node.scheduler.submit(
            Request(prompts, request.max_new_tokens, sampling, request.stop_at_eos, stops, deadline))
        context.add_callback(lambda: node.scheduler.cancel(job))  # at the call's end: a no-op once it is done
        text = TextStream(stops, len(prompts)) if node.codec.has_tokenizer else None
        while True:
            message = job.outbox.get()
            if isinstance(message, StrataError):
                raise message
            if text is not None and not message.done:  # decoded here, on the call's thread
                message.text_deltas.extend(text.step(list(message.tokens)))
            if message.done:  # logged before the call sees it: the caller may stop the node next
                log.debug("generate: %d prompts, %d tokens, queued %.3f s, first token %.3f s, decode %.3f s",
                          len(prompts), message.stats.generated_tokens, message.stats.queued_s,
                          message.stats.first_token_s, message.stats.decode_s)
            yield message
            if message.done:
                return

    def _prompt_ids(self, i: int, prompt) -> list[int]:
        """Prompt i's token ids; a text is tokenized in bounded memory and refused once
        it is past --max-prompt-tokens (check_generate has checked its characters)."""
        kind = prompt.WhichOneof("input")
        if kind == "ids":
            return list(prompt.ids.ids)
        if kind == "text" and prompt.text:
            return self.node.codec.encode(prompt.text, self.node.limits.max_prompt_tokens, what=f"prompt {i}")
        raise invalid(f"prompt {i} is empty")


def serve(config: ComputeNodeConfig, transport: str = "shm"):
    """Builds the node and serves it on `config.listen` (TLS with a certificate; every
    call needs the API key where one is set) and, for the launcher, on
    `config.control_listen`. A used address fails before the model is loaded."""
    rpc.check_free(config.listen)
    security = rpc.ServerSecurity(config.api_key, config.tls_cert, config.tls_key)
    credentials = security.credentials()
    node = ComputeNode(config, transport)
    try:
        # a streaming Generate call holds a worker thread while it runs or waits: enough for
        # every slot and queue place, plus spare ones so health and stats always find one
        workers = node.batch_limits.slots + node.batch_limits.max_queue + SPARE_WORKERS
        server = rpc.server(workers, config.max_request_bytes, name="compute_node", public=True,
                            api_key=config.api_key)
        generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(node), server)
        health = grpc_health.HealthServicer()  # grpc.health.v1: the standard check, never behind generation
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        health.set("strata.wire.Generator", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = rpc.bind(server, config.listen, credentials)
        if config.control_listen:
            rpc.bind(server, config.control_listen)
        server.start()
    except BaseException:
        node.close()
        raise
    return server, node, rpc.bound_address(config.listen, port)


def parse_args(argv=None) -> tuple[ComputeNodeConfig, str]:
    p = argparse.ArgumentParser(prog="python -m compute_node", description="Strata compute node")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--session", required=True)
    p.add_argument("--weight-store", required=True)
    p.add_argument("--kv-store", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plan", default="", metavar="FILE",
                   help="run plan JSON (strata/policy/run_plan.py): placement, KV, batch and queue, instead of their flags "
                        "(--dtype, --kv-offload, --kv-bits, --gpu-weight-share, --micro-batches, --no-decode-graphs, "
                        "--max-batch, --max-seq-len, --max-queue)")
    p.add_argument("--dtype", default=None, choices=["", "float16", "bfloat16", "float32"])
    p.add_argument("--kv-offload", action="store_true", default=None)
    p.add_argument("--kv-bits", type=int, default=None, choices=[4, 8, 16],
                   help="KV cache precision, on the device or in the KV store (default 16)")
    p.add_argument("--rpc-timeout", type=float, default=30.0)
    p.add_argument("--gpu-weight-share", type=float, default=None, help="(default 1)")
    p.add_argument("--micro-batches", type=int, default=None, help="(default 1)")
    p.add_argument("--transport", choices=["shm", "bytes"], default="shm")
    p.add_argument("--exchange-bytes", type=int, default=ComputeNodeConfig.exchange_bytes,
                   help="bytes of each exchange half (KV store transfers), registered at start; grows on demand")
    p.add_argument("--no-decode-graphs", action="store_true", default=None,
                   help="decode eagerly (no CUDA graph replay)")
    add_request_limit_flags(p)
    p.add_argument("--tls-cert", default="", help="PEM certificate file: serve --listen over TLS (with --tls-key)")
    p.add_argument("--tls-key", default="", help="PEM private key file of --tls-cert")
    p.add_argument("--control-listen", default="",
                   help="a second address without TLS, for the launcher's health checks (unix:///path)")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"sequences running at once (the scheduler's slots; default {ComputeNodeConfig.max_batch})")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens a sequence slot holds, prompt plus generated (0 = 2048 or the model's positions)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="sequences waiting for a slot before calls get RESOURCE_EXHAUSTED (0 = max(64, 8 x max-batch))")
    p.add_argument("--prefill-chunk-tokens", type=int, default=0,
                   help="prompt tokens through a layer at once (0 = a micro-batch's slots x max-seq-len)")
    p.add_argument("--prefill-tokens-per-pass", type=int, default=None,
                   help="prompt tokens a pass prefills, at most; the other admitted prompts wait for the next "
                        "passes, which also decode (0 = no bound)")
    a = p.parse_args(argv)
    placement = {"dtype": a.dtype, "kv_offload": a.kv_offload, "kv_bits": a.kv_bits,
                 "gpu_weight_share": a.gpu_weight_share, "micro_batches": a.micro_batches,
                 "decode_graphs": None if a.no_decode_graphs is None else False, "max_batch": a.max_batch,
                 "max_seq_len": a.max_seq_len, "max_queue": a.max_queue,
                 "prefill_tokens_per_pass": a.prefill_tokens_per_pass}
    given = {k: v for k, v in placement.items() if v is not None}
    plan = None
    if a.plan:
        if given:
            p.error(f"--plan decides {', '.join(sorted(given))}: give none of their flags with it")
        plan = RunPlan.load(a.plan)
    if (plan.kv_offload if plan else a.kv_offload) and not a.kv_store:
        p.error("--kv-offload needs --kv-store" if not plan else "the run plan's KV cache is in the KV store: "
                "give --kv-store")
    cfg = ComputeNodeConfig(
        listen=a.listen, session=a.session, weight_store=a.weight_store, kv_store=a.kv_store, device=a.device,
        rpc_timeout_s=a.rpc_timeout, exchange_bytes=a.exchange_bytes,
        max_request_bytes=a.max_request_bytes, max_prompt_tokens=a.max_prompt_tokens,
        max_prompt_chars=a.max_prompt_chars, api_key=a.api_key, tls_cert=a.tls_cert, tls_key=a.tls_key,
        control_listen=a.control_listen, prefill_chunk_tokens=a.prefill_chunk_tokens, plan=plan, **given,
    )
    return cfg, a.transport


def main(argv=None) -> int:
    argv = logs.setup_from_argv("compute_node", argv)
    try:
        config, transport = parse_args(argv)
        server, node, bound = serve(config, transport)
    except StrataError as e:
        log.error("%s", e)
        print(f"FAILED {e}", flush=True)  # the launcher's line
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"READY {bound}", flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # all else to stderr: stdout was the launcher's pipe
    stop.wait()
    server.stop(grace=2).wait()
    node.close()
    return 0

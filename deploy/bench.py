"""`strata bench`: throughput of the three services as `strata serve` runs them.

Flags follow DeepSpeed ZeRO-Inference's run_model.py. Every step is run and timed;
the JSON line reports the measured figures beside the floor of DESIGN.md."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
import threading
import time

import psutil

from deploy import bench_batch, bench_clients, serve_plan
from deploy.bench_plan import floor_profile, offload_base, placement, predict_run, prediction_dict
from deploy.client import generate, request_for
from deploy.launcher import ServeOptions, Services
from strata.model.arch import dims_for
from strata.model.manifest import Manifest, layer_shard
from strata.policy import floor as fl
from strata.policy.cost_model import kv_bytes_per_token_layer
from strata.policy.run_plan import RunPlan
from strata.runtime.errors import ErrorKind, StrataError


@dataclasses.dataclass(frozen=True)
class BenchArgs:
    model: str
    dummy: bool
    batch_size: int
    prompt_len: int
    gen_len: int
    kv_offload: bool
    quant_bits: int
    group_size: int
    gpu_weight_share: float
    micro_batches: int
    device: str
    kv_capacity_gb: float
    warmup: str = "auto"  # auto | short | none: deploy/bench_cli.py's --warmup
    disk_offload: bool = False
    host_budget_gb: float = 0.0
    offload_dir: str = ""
    disk_read_gbps: float = 0.0  # for the floor; 0 = the profile's figure
    kv_bits: int = 16  # KV cache precision (GPU or KV store)
    disk_layers: int = 0  # the planner's: streamed layers read from disk every pass (the last ones)
    kv_threads: int = 0  # KV store attention threads; 0 = its default
    kv_attention: str = "native"  # KV store decode attention kernel
    decode_graphs: bool = True  # compute node replays decode steps as CUDA graphs where it can
    clients: object = None  # deploy.bench_clients.ClientLoad: also N concurrent single-prompt clients
    w4a16_kernels: str = "auto"  # auto | wgmma | mma | triton: deploy/bench_cli.py's --w4a16-kernels
    kv_kernel_defines: dict = dataclasses.field(default_factory=dict)  # the KV store kernel's macros
    batch_requests: int = 0  # also this many requests through `strata batch` (deploy/bench_batch.py)
    prefill_chunk_tokens: int = 0  # prompt tokens through a layer at once; 0 = the compute node's default
    prefill_tokens_per_pass: int = 0  # prompt tokens a pass prefills, at most; 0 = no bound
    profile: object = None  # strata.policy.hardware.HardwareProfile of the floor and the prediction (None: DESIGN.md's H100)
    profile_path: str = ""


def case_of(a: BenchArgs) -> str | None:
    if a.prompt_len != 512 or a.gen_len != 32:
        return None
    if a.model == "facebook/opt-30b":
        return "T1" if a.kv_offload and a.quant_bits == 4 else "T2"
    if a.model == "facebook/opt-175b" and a.quant_bits == 4:
        return "T3"
    if a.model == "meta-llama/Llama-3.1-405B" and a.quant_bits == 4:
        return "T4"
    return None


class HostMemorySampler:
    """Peak of the proportional set size (shared memory split fairly) of a process tree."""

    def __init__(self, root_pid: int, every_s: float = 0.5):
        self.root, self.every, self.peak = root_pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pss(self) -> int:
        total = 0
        root = psutil.Process(self.root)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._pss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._pss())


def _manifest(a: BenchArgs) -> Manifest:
    if a.dummy:
        from tools.dummy.manifest import dummy_manifest

        return dummy_manifest(a.model, a.quant_bits, a.group_size)
    return Manifest.load(a.model)


def _run_plan(a: BenchArgs, m: Manifest) -> RunPlan:
    """The run's plan, resolved once (deploy/serve_plan.py): the planner's disk layers,
    or those the host budget / --disk-offload leave on disk."""
    return serve_plan.resolve(
        m, gpu_weight_share=a.gpu_weight_share, disk_layers=a.disk_layers, disk_offload=a.disk_offload,
        host_budget_bytes=int(a.host_budget_gb * 2**30), kv_offload=a.kv_offload, kv_bits=a.kv_bits,
        micro_batches=a.micro_batches, max_batch=a.batch_size, max_seq_len=a.prompt_len + a.gen_len,
        prefill_chunk_tokens=a.prefill_chunk_tokens, prefill_tokens_per_pass=a.prefill_tokens_per_pass,
        max_queue=max(a.clients.clients, 8 * a.batch_size) if a.clients else 0, decode_graphs=a.decode_graphs,
        w4a16_wgmma=a.w4a16_kernels in ("auto", "wgmma"), w4a16_mma=a.w4a16_kernels in ("auto", "mma"),
        kv_kernel_defines=a.kv_kernel_defines)


def _disk_bytes_per_pass(plan: RunPlan, m: Manifest) -> tuple[int, float]:
    """(layers read from disk every pass, their bytes) under the run plan."""
    return len(plan.disk_layers), float(sum(m.shards[layer_shard(i)].size for i in plan.disk_layers))


def _offload_dir(a: BenchArgs, plan: RunPlan) -> str:
    """Dummy weights for the disk tier: written once per shape into a cache directory,
    with their bytes only where read from disk every pass (the rest sparse zeros: the
    host tier and the GPU's own dummy layers never read those files' bytes as weights)."""
    from tools.dummy.files import write_dummy_model

    out = offload_base(a.offload_dir) / "offload" / f"{a.model.replace('/', '--')}-q{a.quant_bits}g{a.group_size}"
    write_dummy_model(a.model, a.quant_bits, a.group_size, out, data=_disk_shards(plan))
    return str(out)


def _disk_shards(plan: RunPlan) -> set[str]:
    """The shards the weight store reads from disk every pass under the run plan."""
    return {layer_shard(i) for i in plan.disk_layers}


def _kv_bytes_per_token(a: BenchArgs, dims) -> float:
    """KV bytes per token, every layer, at the run's precision (the cost model's)."""
    return kv_bytes_per_token_layer(dims, a.kv_bits) * dims.num_layers


def _kv_capacity(a: BenchArgs, dims) -> int:
    if a.kv_capacity_gb > 0:
        return int(a.kv_capacity_gb * 2**30)
    need = a.batch_size * (a.prompt_len + a.gen_len) * _kv_bytes_per_token(a, dims)
    return int(need * 1.05) + (64 << 20)


def _exchange_bytes(a: BenchArgs, dims) -> int:
    """Each exchange half holds one layer's transfers for every micro-batch: the prompt's
    keys and values at prefill (the largest), with room for alignment. Registered when
    the compute node starts, so no region is pinned inside the timed prefill."""
    kv = 2 * a.batch_size * dims.kv_heads * a.prompt_len * dims.head_dim * 2
    return kv + 4 * a.batch_size * dims.num_heads * dims.head_dim * 2 + (4 << 20) * a.micro_batches


def _prompts(a: BenchArgs, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(4, vocab) for _ in range(a.prompt_len)] for _ in range(a.batch_size)]


def run(a: BenchArgs, progress: bool) -> dict:
    m = _manifest(a)  # an unknown shape is a clear error before anything starts
    plan = _run_plan(a, m)
    dims = dims_for(m.config)
    weight_bytes = float(sum(s.size for s in m.shards.values()))
    disk = _disk_bytes_per_pass(plan, m)
    model_dir, dummy = ("", a.model) if a.dummy else (a.model, "")
    if a.dummy and plan.disk_layers:
        model_dir, dummy = _offload_dir(a, plan), ""
    opts = ServeOptions(
        model_dir=model_dir, plan=plan, listen="127.0.0.1:0", device=a.device,
        kv_capacity_bytes=_kv_capacity(a, dims), kv_threads=a.kv_threads, kv_attention=a.kv_attention,
        exchange_bytes=_exchange_bytes(a, dims) if a.kv_offload else ServeOptions.exchange_bytes,
        dummy=dummy, quant_bits=a.quant_bits, group_size=a.group_size,
    )
    services = Services(opts)
    t_start = time.perf_counter()
    with HostMemorySampler(os.getpid()) as mem:
        address = services.start()
        start_s = time.perf_counter() - t_start
        try:
            if a.warmup != "none":
                _warm_up(a, address)
            before = _node_stats(address)
            result, wall = _single_call(a, address, dims.vocab, progress)
            passes = _pass_times(before, _node_stats(address))
            clients = bench_clients.run(address, a.clients, dims.vocab) if a.clients else None
            batch = (bench_batch.run(address, a.batch_requests, a.prompt_len, a.gen_len, dims.vocab)
                     if a.batch_requests else None)
            node = _node_stats(address)
        finally:
            services.stop()
    report = _report(a, dims, weight_bytes, disk, result, wall, start_s, mem.peak)
    report["run_plan"] = plan.to_dict()
    report["passes"] = passes
    report["placement"]["resident_layers"] = int(node.get("plan_resident_layers", 0))
    report["decode_graphs"] = bool(node.get("decode_graphs", 0))  # what the compute node ran, from its Stats
    for name in ("w4a16_mma", "w4a16_wgmma"):  # the decode matmul at 33-64 rows: built and switched on there
        report[name] = bool(node.get(f"kernel:{name}", 0))
    if clients is not None:
        report["clients"] = clients
        report["clients"]["over_single_call"] = round(clients["tokens_per_s"] / report["total_tokens_per_s"], 4)
    if batch is not None:
        report["batch"] = batch
        report["batch"]["over_single_call"] = round(batch["tokens_per_s"] / report["total_tokens_per_s"], 4)
    return report


def _node_stats(address: str) -> dict[str, float]:
    """What the compute node reports it runs (Generator.Stats, compute_node/metrics.py)."""
    from strata.api.client import Client

    with Client(address, timeout=30) as c:
        return c.stats()[0]


def _pass_times(before: dict[str, float], after: dict[str, float]) -> dict:
    """The single call's passes from the compute node's counters: how many, and the
    scheduler thread's seconds issuing them, waiting for the device, and on the host
    between them (compute_node/metrics.py)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in
         ("steps_total", "pass_issue_seconds_total", "pass_wait_seconds_total", "pass_host_seconds_total")}
    return {"passes": int(d["steps_total"]), "issue_s": round(d["pass_issue_seconds_total"], 4),
            "wait_s": round(d["pass_wait_seconds_total"], 4), "host_s": round(d["pass_host_seconds_total"], 4)}


def _single_call(a: BenchArgs, address: str, vocab: int, progress: bool):
    """The timed request: batch_size prompts in one call. (result, client wall seconds)."""
    bar = _progress_bar(a.gen_len) if progress else None
    on_step = (lambda step, toks: bar.update(1)) if bar else None
    t0 = time.perf_counter()
    result = generate(address, request_for(_prompts(a, vocab), a.gen_len, stop_at_eos=False),
                      timeout=3600, on_step=on_step)
    if bar:
        bar.close()
    return result, time.perf_counter() - t0


WARMUP_TOKENS = 4  # new tokens of the warm-up request


def _warm_up(a: BenchArgs, address: str) -> None:
    """One short request of the timed request's batch size before it (8-token prompts,
    WARMUP_TOKENS new tokens; at most the timed request's lengths, which size the
    slots): kernels compiled and configured for its groups' sizes and,
    where decode graphs run, the graphs of its full groups' bucket captured. The compute
    node keeps its slot caches and per-bucket graphs for its whole life, so the timed
    request replays them from its first decode step."""
    short = min(8, a.prompt_len)
    new = min(WARMUP_TOKENS, a.gen_len)
    generate(address, request_for([[5] * short] * a.batch_size, new, stop_at_eos=False), timeout=600)


def _warmup_kind(a: BenchArgs) -> str:
    """What ran before the timed request: 'short' (--warmup auto or short) or 'none'."""
    return "none" if a.warmup == "none" else "short"


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="step", file=sys.stderr)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (absent)"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _report(a: BenchArgs, dims, weight_bytes: float, disk: tuple[int, float], result, wall: float, start_s: float,
            peak_host: int) -> dict:
    tokens = a.batch_size * a.gen_len
    kvpt = _kv_bytes_per_token(a, dims)
    hw = a.profile.to_hardware() if a.profile is not None and a.profile.has_gpu else fl.Hardware()
    if a.disk_read_gbps:
        hw = dataclasses.replace(hw, disk_bytes_per_s=a.disk_read_gbps * 1e9)
    f = fl.floor(dims, fl.Workload(a.batch_size, a.prompt_len, a.gen_len),
                 fl.Placement(weight_bytes, a.gpu_weight_share, a.kv_offload, kvpt, disk[1]), hw)
    total_tps = tokens / (result.prefill_s + result.decode_s)
    return {
        "case": case_of(a),
        "model": a.model,
        "dummy": a.dummy,
        "batch_size": a.batch_size,
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "placement": {
            "weights": {"gpu_share": a.gpu_weight_share, "host_share": round(1 - a.gpu_weight_share, 4),
                        "quant_bits": a.quant_bits, "group_size": a.group_size, "bytes": weight_bytes,
                        "disk_layers_per_pass": disk[0], "disk_bytes_per_pass": disk[1],
                        "host_budget_bytes": int(a.host_budget_gb * 2**30)},
            "kv": "host (KV store, CPU attention)" if a.kv_offload else a.device,
            "kv_bits": a.kv_bits,
            "micro_batches": a.micro_batches,
            "prefill_chunk_tokens": a.prefill_chunk_tokens,
            "prefill_tokens_per_pass": a.prefill_tokens_per_pass,
        },
        "decode_graphs": a.decode_graphs,  # asked for; run() puts what the compute node ran in its place
        "warmup": _warmup_kind(a),
        # the decode matmul at 33-64 rows: run() puts whether the compute node built and uses
        # the CUDA kernels (its Stats) here
        "w4a16_mma": None,
        "w4a16_wgmma": None,
        "prefill_s": round(result.prefill_s, 4),
        "decode_s": round(result.decode_s, 4),
        "total_tokens_per_s": round(total_tps, 2),
        "decode_tokens_per_s": round(a.batch_size * (a.gen_len - 1) / max(result.decode_s, 1e-9), 2),
        "client_wall_s": round(wall, 4),
        "startup_s": round(start_s, 2),
        "peak_gpu_bytes": result.peak_gpu_bytes,
        "peak_host_bytes": peak_host,
        "floor_tokens_per_s": round(f["tokens_per_s"], 2),
        "floor_prefill_s": round(f["prefill_s"], 4),
        "floor_decode_s": round(f["decode_s"], 4),
        "measured_over_floor": round(total_tps / f["tokens_per_s"], 3),
        "floor_disk_read_bytes_per_s": hw.disk_bytes_per_s if disk[0] else None,
        "floor_profile": _profile_record(a),
        "device": _device_name(a.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "strata " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
    }


def _profile_record(a: BenchArgs) -> dict:
    """Which figures the floor came from."""
    p = a.profile
    if p is None or not p.has_gpu:
        return {"path": None, "machine": fl.Hardware().name, "source": "DESIGN.md's H100 figures (no GPU profile)"}
    return {"path": a.profile_path, "machine": p.machine, "measured_at": p.measured_at, "source": p.source}


def _client_load(ns):
    if not ns.clients:
        return None
    for spec, most, flag in ((ns.prompt_len_dist, ns.prompt_len, "--prompt-len"),
                             (ns.gen_len_dist, ns.gen_len, "--gen-len")):
        if spec and bench_clients.largest(spec) > most:
            raise StrataError(ErrorKind.INVALID_ARGUMENT,
                              f"{spec} draws lengths over {flag} {most}, which sizes the sequence slots")
    return bench_clients.ClientLoad(ns.clients, ns.prompt_len_dist or str(ns.prompt_len),
                                    ns.gen_len_dist or str(ns.gen_len), ns.prompts_jsonl or "")


def main(ns) -> int:
    for flag, count in (("--clients", ns.clients), ("--batch-requests", ns.batch_requests)):
        if count < 0:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{flag} must be 0 or more, not {count}")
    fields, prediction = placement(ns)
    profile, profile_path = floor_profile(ns, prediction)
    a = BenchArgs(
        model=ns.model, dummy=ns.dummy, batch_size=fields["batch_size"], prompt_len=ns.prompt_len,
        gen_len=ns.gen_len, kv_offload=fields["kv_offload"], quant_bits=ns.quant_bits, group_size=ns.group_size,
        gpu_weight_share=fields["gpu_weight_share"], micro_batches=fields["micro_batches"],
        device=ns.device, kv_capacity_gb=ns.kv_capacity_gb, warmup=ns.warmup,
        disk_offload=ns.disk_offload, host_budget_gb=ns.host_budget_gb, offload_dir=ns.offload_dir,
        disk_read_gbps=ns.disk_read_gbps, kv_bits=fields["kv_bits"], disk_layers=fields["disk_layers"],
        kv_threads=ns.kv_threads, kv_attention=ns.kv_attention, decode_graphs=not ns.no_decode_graphs,
        clients=_client_load(ns), batch_requests=ns.batch_requests,
        w4a16_kernels=ns.w4a16_kernels, kv_kernel_defines=ns.kv_kernel_defines, profile=profile, profile_path=profile_path,
        prefill_chunk_tokens=ns.prefill_chunk_tokens or fields["prefill_chunk_tokens"],
        prefill_tokens_per_pass=ns.prefill_tokens_per_pass,
    )
    report = run(a, progress=not ns.json)
    report["planned"] = prediction  # None when the placement was given
    if profile is not None and profile.has_gpu and a.device.startswith("cuda"):  # the run's placement, predicted
        report["predicted"] = prediction_dict(predict_run(report, profile), profile_path)
    line = json.dumps(report)
    print(line, flush=True)
    if ns.output:
        with open(ns.output, "a") as f:
            f.write(line + "\n")
    return 0

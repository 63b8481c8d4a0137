"""`strata plan` (the placement the planner chooses, with predicted figures) and
`strata profile` (measure this machine once, cache it per host with the date)."""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import pathlib
import platform
import socket
import sys
import tempfile
import time

from strata.model import shapes
from strata.model.arch import dims_for
from strata.policy import cost_model as cm
from strata.policy import hardware, planner
from strata.runtime.errors import ErrorKind, StrataError

GIB = 1 << 30


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose a placement with the cost model; print the prediction")
    p.add_argument("--model", help="converted model dir, or a shape name such as facebook/opt-30b")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--gen-len", type=int)
    p.add_argument("--cases", action="store_true",
                   help="the planner's choice and prediction for each benchmark case of DESIGN.md (T1-T4), "
                        "with the bench command that measures it")
    p.add_argument("--batch-size", type=int, default=None, help="fixed batch (default: the planner's choice)")
    p.add_argument("--profile", help="hardware profile JSON (default: this machine's, measured if missing or stale)")
    p.add_argument("--quant-bits", type=int, default=4, choices=[0, 4, 8, 16], help="0: the planner's choice")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--kv", choices=["auto", "gpu", "host"], default="auto", help="pin the KV cache's place")
    p.add_argument("--kv-bits", type=kv_bits_arg, default=16, help=KV_BITS_HELP)
    p.add_argument("--gpu-weight-share", type=float, default=None, help="pin the share of resident layers")
    p.add_argument("--micro-batches", type=int, default=None, help="pin the micro-batch count")
    p.add_argument("--max-batch", type=int, default=planner.MAX_BATCH)
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.set_defaults(fn=plan_main)

    f = sub.add_parser("profile", help="measure this machine's bandwidths and FLOP/s (cached per host)")
    f.add_argument("--output", help=f"where to save (default {hardware.default_path()})")
    f.add_argument("--quick", action="store_true", help="small sizes: seconds, not a minute; less accurate")
    f.set_defaults(fn=profile_main)


# ---- strata plan -------------------------------------------------------------------------------------------


def _model(model: str, bits: int | None, group_size: int):
    """(dims, quant bits -> WeightBytes, bits the model is stored in or None)."""
    path = pathlib.Path(model)
    if (path / "manifest.json").exists():
        from strata.model.manifest import Manifest

        m = Manifest.load(str(path))
        dims = dims_for(m.config)
        stored = int(m.quantization.get("bits", 16))
        sizes = {k: float(s.size) for k, s in m.shards.items()}
        if bits and bits != stored:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"{model} is stored in {stored} bits, not {bits}")
        return dims, (lambda b: cm.weight_bytes_from_shards(sizes, dims, b)), stored
    dims = dims_for(shapes.config_for(model))  # a shape name: run with --dummy weights
    return dims, (lambda b: cm.estimate_weight_bytes(dims, b, group_size, dummy=True)), bits


def load_profile(path: str | None, console=None) -> tuple[hardware.HardwareProfile, str]:
    if path:
        return hardware.load(path), path
    default = hardware.default_path()
    if default.exists():
        prof = hardware.load(default)
        if not prof.is_stale():
            return prof, str(default)
        reason = f"{default} is {prof.age_days():.0f} days old"
    else:
        reason = f"no profile at {default}"
    if console is not None:
        console.print(f"[yellow]{reason}: measuring this machine (strata profile)[/yellow]")
    default.parent.mkdir(parents=True, exist_ok=True)
    prof = measure(quick=False, progress=console is not None, scratch=str(default.parent))
    hardware.save(prof, default)
    return prof, str(default)


KV_BITS_HELP = ("KV cache precision: 16 (compute dtype), 8 or 4 (group-wise, lossy), or auto (the planner "
                "may choose 8/4 where that is faster)")


def kv_bits_arg(text: str) -> int | None:
    """--kv-bits: 16, 8, 4, or 'auto' (None: the planner chooses)."""
    import argparse

    if text == "auto":
        return None
    if text in ("16", "8", "4"):
        return int(text)
    raise argparse.ArgumentTypeError(f"--kv-bits must be 16, 8, 4 or auto, not {text!r}")


def plan_main(a) -> int:
    from rich.console import Console

    if a.cases:
        from deploy.plan_cases import cases_main

        return cases_main(a)
    missing = [f for f, v in (("--model", a.model), ("--prompt-len", a.prompt_len), ("--gen-len", a.gen_len))
               if v is None]
    if missing:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"strata plan needs {', '.join(missing)} (or --cases)")
    console = Console(stderr=True)
    profile, where = load_profile(a.profile, None if a.json else console)
    dims, wbf, bits = _model(a.model, a.quant_bits or None, a.group_size)
    fixed = planner.Fixed(
        gpu_weight_share=a.gpu_weight_share, kv_on_host={"auto": None, "gpu": False, "host": True}[a.kv],
        micro_batches=a.micro_batches, batch_size=a.batch_size, quant_bits=bits, kv_bits=a.kv_bits,
        disk_weight_share=None,  # layers on disk only where host memory cannot hold them (as bench and serve)
    )
    workload = cm.Workload(a.prompt_len, a.gen_len, a.batch_size)
    result = planner.plan(dims, wbf, workload, profile, fixed, max_batch=a.max_batch)
    report = plan_report(a.model, workload, result, profile, where, dims.num_layers)
    report["bench_command"] = bench_command(a.model, workload, where, fixed)
    if a.json:
        print(json.dumps(report), flush=True)
    else:
        out = Console()
        print_plan(report, out if out.is_terminal else Console(width=160))
    return 0


def bench_command(model: str, w: cm.Workload, profile_path: str, fixed: planner.Fixed) -> str:
    """The `strata bench` line that plans this placement itself (same planner, same profile),
    with the fields the plan was asked to keep."""
    args = [f"strata bench --model {model} --dummy --prompt-len {w.prompt_len} --gen-len {w.gen_len}",
            f"--profile {profile_path}"]
    if fixed.kv_on_host:
        args.append("--kv-offload")
    args.append(f"--kv-bits {fixed.kv_bits or 'auto'}")
    if fixed.batch_size:
        args.append(f"--batch-size {fixed.batch_size}")
    return " ".join(args)


def _choice_dict(pl: cm.Placement, pr: cm.Prediction, num_layers: int) -> dict:
    flags = [f"--batch-size {pl.batch_size}", f"--gpu-weight-share {pl.gpu_weight_share:.4g}",
             f"--micro-batches {pl.micro_batches}", f"--quant-bits {pl.quant_bits}", f"--kv-bits {pl.kv_bits}"]
    if pl.kv_on_host:  # the KV store's capacity must hold the batch's cache
        flags += ["--kv-offload", f"--kv-capacity-gb {-(-pr.host_breakdown['KV'] // GIB) + 1:.0f}"]
    resident, host_n, disk_n = pl.layer_counts(num_layers)
    return {
        "placement": dataclasses.asdict(pl),
        "layers": {"gpu": resident, "host": host_n, "disk": disk_n},
        "kv": "host (KV store, CPU attention)" if pl.kv_on_host else "gpu",
        # pinned flags; layers on disk come from a host budget that only a planned bench
        # (bench_command) works out from the shard sizes
        "bench_flags": " ".join(flags),
        "prefill_s": round(pr.prefill_s, 4),
        "decode_step_s": round(pr.decode_step_s, 5),
        "decode_s": round(pr.decode_s, 4),
        "total_tokens_per_s": round(pr.total_tokens_per_s, 2),
        "prefill_binding": pr.prefill_binding,
        "decode_binding": pr.decode_binding,
        "gpu_bytes_needed": int(pr.gpu_bytes_needed),  # device bytes, margin included: <= the GPU's
        "gpu_peak_allocated_bytes": int(pr.gpu_peak_allocated),  # beside the bench's measured peak_gpu_bytes
        "host_bytes_needed": int(pr.host_bytes_needed),
        "gpu_breakdown": {k: int(v) for k, v in pr.gpu_breakdown.items()},
        "host_breakdown": {k: int(v) for k, v in pr.host_breakdown.items()},
    }


def plan_report(model: str, w: cm.Workload, result: planner.Plan, profile: hardware.HardwareProfile,
                where: str, num_layers: int) -> dict:
    return {
        "model": model,
        "prompt_len": w.prompt_len,
        "gen_len": w.gen_len,
        "profile": {"machine": profile.machine, "measured_at": profile.measured_at, "path": where,
                    "gpu_bytes": profile.gpu_bytes, "host_bytes": profile.host_bytes, "source": profile.source},
        **_choice_dict(result.placement, result.prediction, num_layers),
        "considered": result.considered,
        "alternatives": [_choice_dict(c.placement, c.prediction, num_layers) for c in result.alternatives],
    }


def print_plan(report: dict, console) -> None:
    from rich.table import Table

    prof = report["profile"]
    t = Table(title=f"strata plan: {report['model']}, prompt {report['prompt_len']}, gen {report['gen_len']} "
                    f"on {prof['machine']} (profile {prof['measured_at'][:10]})")
    for col in ("", "layers GPU/host/disk", "bits", "KV", "KV bits", "µb", "batch", "prefill s", "step ms",
                "tok/s", "bound: prefill / decode", "peak GiB", "GPU GiB", "host GiB"):
        t.add_column(col, justify="left" if col in ("", "KV", "bound: prefill / decode") else "right",
                     no_wrap=True)
    for i, c in enumerate([report, *report["alternatives"]]):
        pl, n = c["placement"], c["layers"]
        t.add_row(
            "chosen" if i == 0 else f"alt {i}", f"{n['gpu']}/{n['host']}/{n['disk']}",
            str(pl["quant_bits"]), "host" if pl["kv_on_host"] else "GPU", str(pl["kv_bits"]), str(pl["micro_batches"]),
            str(pl["batch_size"]), f"{c['prefill_s']:.2f}", f"{c['decode_step_s'] * 1e3:.1f}",
            f"{c['total_tokens_per_s']:.1f}", f"{c['prefill_binding']} / {c['decode_binding']}",
            f"{c['gpu_peak_allocated_bytes'] / GIB:.1f}",
            f"{c['gpu_bytes_needed'] / GIB:.1f} / {prof['gpu_bytes'] / GIB:.0f}",
            f"{c['host_bytes_needed'] / GIB:.1f} / {prof['host_bytes'] / GIB:.0f}",
            style="bold" if i == 0 else None,
        )
    console.print(t)
    console.print("peak GiB: PyTorch's allocated peak predicted (the bench's peak_gpu_bytes); GPU GiB: what the "
                  "placement asks of the device, margin included")
    if report.get("bench_command"):
        console.print(report["bench_command"])
    if not report["layers"]["disk"]:
        console.print(f"strata bench --model {report['model']} --dummy --prompt-len {report['prompt_len']} "
                      f"--gen-len {report['gen_len']} {report['bench_flags']}")


# ---- strata profile ----------------------------------------------------------------------------------------


def _timed(fn, sync=lambda: None, reps: int = 3) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_gpu(quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    sync = torch.cuda.synchronize
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    flops = 2 * n**3 / _timed(lambda: a @ a, sync, 5)
    nbytes = (256 << 20) if quick else GIB
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    out = {
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_bytes": float(torch.cuda.get_device_properties(0).total_memory),
        "gpu_flops": flops,
        "hbm_bytes_per_s": 2 * nbytes / _timed(lambda: dev2.copy_(dev), sync),
        "h2d_pinned": nbytes / _timed(lambda: dev.copy_(pinned, non_blocking=True), sync),
        "h2d_pageable": nbytes / _timed(lambda: dev.copy_(pageable), sync),
        "d2h_pinned": nbytes / _timed(lambda: pinned.copy_(dev, non_blocking=True), sync),
    }
    del a, dev, dev2, pinned, pageable
    out["dequant_bytes_per_s"] = _dequant_rate(quick, sync)
    torch.cuda.empty_cache()
    return out


def _dequant_rate(quick: bool, sync) -> float:
    """Dense bf16 bytes per second the compute node's fused INT4 dequant writes, on an
    OPT-30B fc1-sized weight (what every decode step pays per quantized layer)."""
    import torch

    from compute_node.kernels import dequantize

    n, k, g = 28672, (2048 if quick else 7168), 64
    data = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scale = torch.rand(n, k // g, device="cuda", dtype=torch.float16)
    mn = torch.rand(n, k // g, device="cuda", dtype=torch.float16)
    return 2 * n * k / _timed(lambda: dequantize(data, scale, mn, 4, g, torch.bfloat16), sync, 5)


def measure_host(quick: bool) -> dict:
    import psutil
    import torch

    from tools.bench_attention import dram_read_gbps, profile_rates

    torch.set_num_threads(os.cpu_count() or 1)
    dram = dram_read_gbps((256 << 20) if quick else GIB, repeats=3 if quick else 5)
    # the KV store's attention as it runs in the service: its kernel on every core
    # (kv_store/server.py), over bf16, INT8 and INT4 caches
    attention = profile_rates(threads=os.cpu_count() or 1, quick=quick, dram=dram)
    return {"dram_read_bytes_per_s": dram * 1e9, **attention,
            "host_bytes": float(psutil.virtual_memory().total), "cpu_cores": os.cpu_count() or 0}


def measure_disk(quick: bool, directory: str | None = None, piece: int = 256 << 20) -> tuple[float, str]:
    """Reads of a fresh file (evicted from the page cache) with the weight store's own
    shard reader, as its disk tier reads: shard-sized pieces in file order, one per
    staging slot in flight. (bytes/s, the reader backend in use)."""
    import concurrent.futures

    from strata.policy.placement import STAGING_SLOTS
    from weight_store.reader import make_reader

    nbytes, chunk = ((192 << 20) if quick else 3 * GIB), 16 << 20
    piece = min(piece, nbytes // STAGING_SLOTS)
    buf = mmap.mmap(-1, STAGING_SLOTS * piece)  # page aligned, as O_DIRECT needs
    block = os.urandom(1 << 20) * (chunk >> 20)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="strata-profile-") as f:
        for _ in range(nbytes // chunk):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        reader = make_reader()
        view = memoryview(buf)
        pieces = nbytes // piece
        try:
            with concurrent.futures.ThreadPoolExecutor(STAGING_SLOTS) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda i: reader.read_into(f.name, view[(i % STAGING_SLOTS) * piece:][:piece],
                                                         i * piece, piece), range(pieces)))
                return pieces * piece / (time.perf_counter() - t0), reader.name
        finally:
            reader.close()
            view.release()
            buf.close()


def measure(quick: bool, progress: bool = True, scratch: str | None = None) -> hardware.HardwareProfile:
    """This machine's profile; the disk is read in `scratch` (default: the temporary directory)."""
    from rich.progress import Progress

    steps = [("GPU: memory, matmul FLOP/s, copies", lambda: measure_gpu(quick)),
             ("host DRAM and CPU attention", lambda: measure_host(quick)),
             ("disk read", lambda: dict(zip(("disk_read_bytes_per_s", "disk_how"), measure_disk(quick, scratch))))]
    fields: dict = {}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("profiling", total=len(steps))
        for what, fn in steps:
            bar.update(task, description=f"profiling: {what}")
            fields.update(fn())
            bar.advance(task)
    how = fields.pop("disk_how")
    source = (f"strata profile{' --quick' if quick else ''} on {socket.gethostname()} "
              f"({platform.processor() or platform.machine()}); disk read by the weight store's reader: {how}")
    if not fields.get("gpu_name"):
        source += "; no CUDA GPU: GPU fields are 0"
    return hardware.HardwareProfile(machine=socket.gethostname(), measured_at=hardware.today(), source=source,
                                    **fields)


def profile_main(a) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    path = pathlib.Path(a.output) if a.output else hardware.default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = measure(a.quick, progress=console.is_terminal, scratch=str(path.parent))
    hardware.save(prof, path)
    d = dataclasses.asdict(prof)
    for k, v in d.items():
        shown = f"{v / 1e9:.1f} G{'B' if 'bytes' in k or k.startswith(('h2d', 'd2h')) else 'FLOP'}" + (
            "/s" if k not in ("gpu_bytes", "host_bytes") else "") if isinstance(v, float) and v else v
        console.print(f"{k:>26}: {shown}")
    print(f"saved {path}", file=sys.stderr)
    return 0

"""`strata profile`: measure this machine once (GPU memory, matmul FLOP/s and copies,
host DRAM and the KV store's CPU attention, disk reads through the weight store's
reader) and cache the profile per host with the date; and `load_profile`, the profile
that plan, bench and serve plan with (a given file, else this machine's cached one,
measured first where it is missing or stale)."""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import platform
import socket
import sys
import tempfile
import time

from strata.policy import hardware

GIB = 1 << 30


def add_profile_parser(sub) -> None:
    f = sub.add_parser("profile", help="measure this machine's bandwidths and FLOP/s (cached per host)")
    f.add_argument("--output", help=f"where to save (default {hardware.default_path()})")
    f.add_argument("--quick", action="store_true", help="small sizes: seconds, not a minute; less accurate")
    f.set_defaults(fn=profile_main)


def load_profile(path: str | None, console=None) -> tuple[hardware.HardwareProfile, str]:
    """(profile, its path): the file at `path`; else this machine's cached profile, measured
    now (and saved) where it is missing or stale; `console` says so."""
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

"""`strata plan`: the placement the planner chooses for a model and workload, with
predicted figures (a table, or one JSON line), and `--cases` (deploy/plan_cases.py).
The hardware profile comes from deploy/profile_cli.py, the model's dimensions and
weight bytes from strata/policy/model_bytes.py."""

from __future__ import annotations

import dataclasses
import json

from deploy.profile_cli import load_profile
from strata.policy import cost_model as cm
from strata.policy import hardware, planner
from strata.policy.model_bytes import model_for
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
    dims, wbf, bits = model_for(a.model, a.quant_bits or None, a.group_size)
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
    if pl.prefill_chunk_tokens:
        flags.append(f"--prefill-chunk-tokens {pl.prefill_chunk_tokens}")
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

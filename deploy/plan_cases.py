"""`strata plan --cases`: the planner's choice and prediction for each benchmark case of
DESIGN.md (prompt 512, generation 32, --dummy weights), with the `strata bench` line
that measures it: predicted beside measured, case by case."""

from __future__ import annotations

import dataclasses
import json

from strata.policy import cost_model as cm
from strata.policy import planner

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str
    kv_on_host: bool | None  # None: the planner's choice
    kv_bits: int | None  # None: --kv-bits auto
    setting: str


CASES = (
    Case("T1", "facebook/opt-30b", True, 16, "OPT-30B INT4, every KV in the KV store, bf16 cache"),
    Case("T1 INT4 KV", "facebook/opt-30b", True, 4, "OPT-30B INT4, every KV in the KV store, INT4 cache"),
    Case("T2", "facebook/opt-30b", None, 16, "OPT-30B INT4, placement chosen freely"),
    Case("T3", "facebook/opt-175b", None, None, "OPT-175B INT4, placement chosen freely (--kv-bits auto)"),
    Case("T4", "meta-llama/Llama-3.1-405B", None, None,
         "Llama-3.1-405B INT4, larger than the GPU, placement chosen freely (--kv-bits auto)"),
)
PROMPT_LEN, GEN_LEN = 512, 32


def case_report(case: Case, profile, where: str) -> dict:
    from deploy.plan_cli import bench_command, plan_report
    from strata.policy.model_bytes import model_for

    dims, wbf, bits = model_for(case.model, 4, 64)
    fixed = planner.Fixed(kv_on_host=case.kv_on_host, quant_bits=bits, kv_bits=case.kv_bits, disk_weight_share=None)
    w = cm.Workload(PROMPT_LEN, GEN_LEN)
    report = plan_report(case.model, w, planner.plan(dims, wbf, w, profile, fixed), profile, where, dims.num_layers)
    report.pop("alternatives")
    return {"case": case.name, "setting": case.setting, **report,
            "bench_command": bench_command(case.model, w, where, fixed)}


def cases_main(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from deploy.profile_cli import load_profile

    profile, where = load_profile(a.profile, None if a.json else Console(stderr=True))
    reports = [case_report(c, profile, where) for c in CASES]
    if a.json:
        for r in reports:
            print(json.dumps(r), flush=True)
        return 0
    t = Table(title=f"DESIGN.md's cases on {profile.machine} (profile {profile.measured_at[:10]}: {where}), "
                    f"prompt {PROMPT_LEN}, gen {GEN_LEN}")
    for col in ("case", "model", "layers GPU/host/disk", "KV", "µb", "batch", "prefill s", "decode s", "tok/s",
                "bound: prefill / decode", "peak GiB", "GPU GiB", "host GiB"):
        t.add_column(col, justify="left" if col in ("case", "model", "KV", "bound: prefill / decode") else "right",
                     no_wrap=True)
    for r in reports:
        pl, n = r["placement"], r["layers"]
        t.add_row(r["case"], r["model"].split("/")[-1], f"{n['gpu']}/{n['host']}/{n['disk']}",
                  f"{'host' if pl['kv_on_host'] else 'GPU'} {pl['kv_bits']}-bit", str(pl["micro_batches"]),
                  str(pl["batch_size"]), f"{r['prefill_s']:.2f}", f"{r['decode_s']:.2f}",
                  f"{r['total_tokens_per_s']:.1f}", f"{r['prefill_binding']} / {r['decode_binding']}",
                  f"{r['gpu_peak_allocated_bytes'] / GIB:.1f}", f"{r['gpu_bytes_needed'] / GIB:.1f}",
                  f"{r['host_bytes_needed'] / GIB:.1f}")
    out = Console()
    out = out if out.is_terminal else Console(width=200)
    out.print(t)
    for r in reports:
        out.print(f"{r['case']}: {r['bench_command']}", soft_wrap=True)
    return 0

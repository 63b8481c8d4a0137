"""The cost model's prediction beside each measured `strata bench` run.

    python3 bench/compare_predictions.py [--profile P] RESULTS.jsonl...

For every bench JSON line, the placement it ran with is predicted with the profile
(default: the measured nvidia-h100-x1 profile) and one row is printed: measured and
predicted total tokens/s, prefill and decode seconds, and measured / predicted. With
--json, one JSON line per run instead.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.plan_cli import _model  # noqa: E402
from strata import cost_model as cm  # noqa: E402
from strata import hardware  # noqa: E402

DEFAULT_PROFILE = ROOT / "bench/profiles/nvidia-h100-x1-measured.json"


def predicted(run: dict, profile: hardware.HardwareProfile) -> cm.Prediction:
    w = run["placement"]["weights"]
    dims, wbf, _ = _model(run["model"], w["quant_bits"], w["group_size"])
    wb = wbf(w["quant_bits"])
    disk_share = w.get("disk_layers_per_pass", 0) / dims.num_layers
    pl = cm.Placement(w["gpu_share"], run["placement"]["kv"].startswith("host"), run["placement"]["micro_batches"],
                      run["batch_size"], w["quant_bits"], disk_share, run["placement"].get("kv_bits", 16))
    return cm.predict(dims, wb, cm.Workload(run["prompt_len"], run["gen_len"], run["batch_size"]), pl, profile)


def rows(paths: list[str], profile: hardware.HardwareProfile):
    for path in paths:
        for line in open(path):
            run = json.loads(line)
            if "placement" not in run:
                continue
            p = predicted(run, profile)
            yield {
                "file": pathlib.Path(path).name, "model": run["model"], "case": run.get("case"),
                "batch": run["batch_size"], "measured": run["total_tokens_per_s"],
                "predicted": round(p.total_tokens_per_s, 2),
                "ratio": round(run["total_tokens_per_s"] / p.total_tokens_per_s, 3),
                "prefill": [run["prefill_s"], round(p.prefill_s, 3)], "decode": [run["decode_s"], round(p.decode_s, 3)],
                "binding": [p.prefill_binding, p.decode_binding],
            }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--profile", default=str(DEFAULT_PROFILE))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    profile = hardware.load(a.profile)
    for r in rows(a.results, profile):
        if a.json:
            print(json.dumps(r))
        else:
            print(f"{r['file'][:28]:28} {r['model'][-14:]:14} {str(r['case']):5} B={r['batch']:<4} "
                  f"meas {r['measured']:8.2f} pred {r['predicted']:8.2f} ratio {r['ratio']:5.2f}  "
                  f"prefill {r['prefill'][0]:7.2f}/{r['prefill'][1]:7.2f} decode {r['decode'][0]:7.2f}/"
                  f"{r['decode'][1]:7.2f}  {r['binding']}")


if __name__ == "__main__":
    main()

"""The cost model's prediction beside each measured `strata bench` run.

    python3 bench/compare_predictions.py [--profile P] RESULTS.jsonl...

For every bench JSON line, the placement it ran with is predicted with the profile
(default: the one of the run's device: bench/profiles/nvidia-h200.json for an H200, the
measured nvidia-h100-x1 profile otherwise) and one row is printed: measured and
predicted total tokens/s, prefill and decode seconds, measured / predicted, and the
measured peak GPU bytes beside the predicted allocated peak. With --json, one JSON line
per run instead.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.bench_plan import predict_run  # noqa: E402
from strata.policy import cost_model as cm  # noqa: E402
from strata.policy import hardware  # noqa: E402

PROFILES = {"H200": ROOT / "bench/profiles/nvidia-h200.json"}  # by the run's device
DEFAULT_PROFILE = ROOT / "bench/profiles/nvidia-h100-x1-measured.json"


def profile_for(run: dict) -> pathlib.Path:
    device = run.get("device", "")
    return next((p for key, p in PROFILES.items() if key in device), DEFAULT_PROFILE)


def predicted(run: dict, profile: hardware.HardwareProfile) -> cm.Prediction:
    return predict_run(run, profile)


def rows(paths: list[str], profile: hardware.HardwareProfile | None):
    for path in paths:
        for line in open(path):
            run = json.loads(line)
            if "placement" not in run:
                continue
            p = predicted(run, profile or hardware.load(profile_for(run)))
            yield {
                "file": pathlib.Path(path).name, "model": run["model"], "case": run.get("case"),
                "batch": run["batch_size"], "measured": run["total_tokens_per_s"],
                "predicted": round(p.total_tokens_per_s, 2),
                "ratio": round(run["total_tokens_per_s"] / p.total_tokens_per_s, 3),
                "prefill": [run["prefill_s"], round(p.prefill_s, 3)], "decode": [run["decode_s"], round(p.decode_s, 3)],
                "binding": [p.prefill_binding, p.decode_binding],
                "peak_gpu_gib": [round(run.get("peak_gpu_bytes", 0) / 2**30, 2), round(p.gpu_peak_allocated / 2**30, 2)],
            }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--profile", help="default: the profile of each run's device (PROFILES, else the H100's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    profile = hardware.load(a.profile) if a.profile else None
    for r in rows(a.results, profile):
        if a.json:
            print(json.dumps(r))
        else:
            print(f"{r['file'][:28]:28} {r['model'][-14:]:14} {str(r['case']):5} B={r['batch']:<4} "
                  f"meas {r['measured']:8.2f} pred {r['predicted']:8.2f} ratio {r['ratio']:5.2f}  "
                  f"prefill {r['prefill'][0]:7.2f}/{r['prefill'][1]:7.2f} decode {r['decode'][0]:7.2f}/"
                  f"{r['decode'][1]:7.2f}  peak GiB {r['peak_gpu_gib'][0]:6.1f}/{r['peak_gpu_gib'][1]:6.1f}  "
                  f"{r['binding']}")


if __name__ == "__main__":
    main()

"""A grid of placements to measure against the planner's choice (issue 4).

    python3 bench/grid.py MODEL [--kv-offload] [--kv-bits 16|auto] [--n 8] [--profile P]

Prints one `strata bench` argument line per placement: first the planner's choice
(for prompt 512, gen 32), then the best-predicted other placements of a coarse grid
that fits the profile's memory (batch, GPU share, micro-batches, KV place and, with
--kv-bits auto, KV precision on the GPU): the competitors the planner's choice must beat when measured. Each line is tagged with
its prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.policy import cost_model as cm  # noqa: E402
from strata.policy import hardware, planner  # noqa: E402
from strata.policy.model_bytes import model_for  # noqa: E402


def coarse(dims, wb, w, profile, kv_choices, batches) -> list[tuple[cm.Placement, float]]:
    out = []
    L = dims.num_layers
    for kv, kv_bits in kv_choices:
        for m in (1, 2, 4, 8):
            for b in batches:
                if b < m:
                    continue
                for share in [k / L for k in range(0, L + 1, max(1, L // 8))] + [1.0]:
                    pl = cm.Placement(share, kv, m, b, 4, kv_bits=kv_bits)
                    if cm.fits(dims, wb, w, pl, profile):
                        out.append((pl, cm.predict(dims, wb, w, pl, profile).total_tokens_per_s))
    return out


def args_for(pl: cm.Placement) -> str:
    kv = " --kv-offload" if pl.kv_on_host else ""
    return (f"--batch-size {pl.batch_size} --gpu-weight-share {pl.gpu_weight_share:.4f} "
            f"--micro-batches {pl.micro_batches} --kv-bits {pl.kv_bits}{kv}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--kv-offload", action="store_true", help="KV in the KV store only (T1)")
    ap.add_argument("--kv-bits", default="16", choices=["16", "auto"],
                    help="auto: the planner and the grid may quantize a GPU cache to 8/4 bits")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--profile", default=str(ROOT / "bench/profiles/nvidia-h200.json"))  # the benchmark machine
    ap.add_argument("--batches", default="8,16,24,32,48,64,96,128")
    a = ap.parse_args()
    profile = hardware.load(a.profile)
    dims, wbf, _ = model_for(a.model, 4, 64)
    wb = wbf(4)
    w = cm.Workload(512, 32)
    auto = a.kv_bits == "auto"
    best = planner.plan(dims, wbf, w, profile, planner.Fixed(kv_on_host=True if a.kv_offload else None, quant_bits=4,
                                                            kv_bits=None if auto else 16))
    kv_choices = [(True, 16)] + ([] if a.kv_offload else [(False, 16)] + ([(False, 8), (False, 4)] if auto else []))
    grid = coarse(dims, wb, w, profile, kv_choices, [int(x) for x in a.batches.split(",")])
    grid.sort(key=lambda x: -x[1])
    picked = [best.placement]
    # the best others of the planner's KV place, then (when both are allowed) of the other
    for same, quota in ((True, a.n if a.kv_offload else a.n // 2 + 1), (False, a.n)):
        for pl, _ in grid:
            if len(picked) >= min(quota, a.n):
                break
            if (pl.kv_on_host == best.placement.kv_on_host) == same and all(
                    args_for(pl) != args_for(q) for q in picked):
                picked.append(pl)
    for pl in picked:
        pred = cm.predict(dims, wb, w, pl, profile).total_tokens_per_s
        print(f"{args_for(dataclasses.replace(pl))} # predicted {pred:.1f}")


if __name__ == "__main__":
    main()

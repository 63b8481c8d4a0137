"""Fused W4A16 linear (compute_node.kernels.w4a16.int4_linear) against dequantize +
F.linear and a plain 16-bit F.linear, at decode sizes, on one CUDA GPU.

    PYTHONPATH=. python3 bench/bench_w4a16.py [--dtype bfloat16] [--no-flush] [--sweep]

One JSON line per (N, K, M) case, then a compact table. Times are medians of per-call
CUDA-event timings; by default L2 is flushed before every timed call (a decode step
streams each weight once, and 7168x7168 at INT4 would otherwise sit in the 50 MB L2).
`--sweep` also tries variants of the kernel config around the heuristic (greedy, one
knob at a time) and prints the best per case: a few minutes, for tuning `pick_config`.
`--configs` times given overrides against the default in interleaved rounds
(`--rounds`). `--grid` times every combination of GRID's knobs (split-K filling one or
two waves of SMs) and, with `--sweep` too, sweeps greedily from the grid's best. Every
config timed by `--configs` or `--grid` goes to `--grid-log` as a JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from compute_node.kernels import dequantize
from compute_node.kernels import w4a16
from strata.model import quant

SHAPES = [(7168, 7168), (28672, 7168), (7168, 28672), (21504, 7168)]
MS = [8, 16, 32, 64, 128, 256]
GROUP = 64


class Timer:
    def __init__(self, flush: bool, reps: int, warmup: int, device: str = "cuda"):
        self.cuda = device == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if flush and self.cuda else None
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn) -> float:
        """Median seconds of one call."""
        for _ in range(self.warmup):
            fn()
        if not self.cuda:  # smoke runs of this script on CPU (TRITON_INTERPRET=1)
            times = []
            for _ in range(self.reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for a, b in zip(starts, ends):
            if self.flush is not None:
                self.flush.zero_()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) / 1e3


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def sweep_run(timer: Timer, x, data, scale, mn, ref, cfg: dict) -> float:
    """Seconds per call of one config; inf where it fails to compile or is wrong."""
    try:
        y = w4a16.int4_linear(x, data, scale, mn, GROUP, config=cfg)
        if rel_err(y, ref) > 1e-2:
            return float("inf")
        return timer(lambda: w4a16.int4_linear(x, data, scale, mn, GROUP, config=cfg))
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is skipped
        print(f"# variant {cfg} failed: {repr(e)[:200]}", file=sys.stderr)
        return float("inf")


def sweep(timer: Timer, x, data, scale, mn, ref, base: dict) -> tuple[dict, float]:
    """Greedy one-knob-at-a-time search around `base`; returns (best config, seconds)."""
    def run(cfg):
        return sweep_run(timer, x, data, scale, mn, ref, cfg)

    best, best_t = dict(base), run(base)
    knobs = {
        "WIDE": [False, True], "ASM": [False, True], "JOIN": [False, True], "ALGEBRAIC": [False, True], "SWAP": [False, True], "BLOCK_N": [64, 128, 256],
        "BLOCK_M": [16, 32, 64, 128], "BLOCK_K": [64, 128, 256],
        "SPLIT_K": sorted({max(1, base["SPLIT_K"] // 2), base["SPLIT_K"], base["SPLIT_K"] * 2, 1, 4, 8}),
        "num_warps": [4, 8], "num_stages": [2, 3, 4, 5],
    }
    for key, values in knobs.items():
        for v in values:
            if v == best[key]:
                continue
            if key == "BLOCK_M" and v > max(16, triton_next_pow2(x.shape[0])):
                continue
            cfg = dict(best, **{key: v})
            t = run(cfg)
            if t < best_t:
                best, best_t = cfg, t
    return best, best_t


def compare(timer: Timer, x, data, scale, mn, ref, base: dict, overrides: list[dict], rounds: int, log) -> None:
    """The default config and each override, timed in `rounds` interleaved rounds (so a
    drifting clock or host affects them alike); the median round per config is printed
    and logged."""
    m, k = x.shape
    n = data.shape[0]
    cfgs = [dict(base)] + [dict(base, **over) for over in overrides]
    times = [[sweep_run(timer, x, data, scale, mn, ref, cfg) for cfg in cfgs] for _ in range(rounds)]
    for i, (cfg, over) in enumerate(zip(cfgs, [{}] + overrides)):
        t = statistics.median(r[i] for r in times)
        rec = {"N": n, "K": k, "M": m, "config": cfg, "s": t, "rounds": [r[i] for r in times]}
        log.write(json.dumps(rec) + "\n")
        print(f"# {n}x{k} M={m} {over or 'default'}: {t * 1e3:.3f} ms (median of {rounds})")


def fill_split(m: int, n: int, k: int, cfg: dict, num_sms: int) -> int:
    """Smallest power-of-two split-K whose programs fill one wave of SMs (at least 4 K steps each)."""
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    return w4a16.split_to_fill(tiles, k // cfg["BLOCK_K"], num_sms)


GRID = {"JOIN": [True], "WIDE": [False, True], "ASM": [False, True], "ALGEBRAIC": [False], "SWAP": [False, True],
        "BLOCK_N": [128, 256], "num_warps": [4, 8], "BLOCK_K": [64, 128], "num_stages": [3, 4], "waves": [1, 2]}


def grid(timer: Timer, x, data, scale, mn, ref, base: dict, num_sms: int, log) -> tuple[dict, float]:
    """Every combination of GRID's knobs (split-K filling 1 or 2 waves of SMs); returns
    the fastest (config, seconds)."""
    m, k = x.shape
    n = data.shape[0]
    best, best_t = dict(base), float("inf")
    for values in itertools.product(*GRID.values()):
        knobs = dict(zip(GRID, values))
        waves = knobs.pop("waves")
        cfg = dict(base, **knobs, BLOCK_M=max(16, min(64, triton_next_pow2(m))))
        cfg["SPLIT_K"] = fill_split(m, n, k, cfg, num_sms * waves)
        t = sweep_run(timer, x, data, scale, mn, ref, cfg)
        log.write(json.dumps({"N": n, "K": k, "M": m, "config": cfg, "s": t}) + "\n")
        if t < best_t:
            best, best_t = cfg, t
    return best, best_t


def triton_next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 before timed calls")
    ap.add_argument("--sweep", action="store_true", help="also search kernel configs (minutes)")
    ap.add_argument("--grid", action="store_true", help="grid over layout knobs, then --sweep from the best")
    ap.add_argument("--grid-log", default="w4grid.jsonl", help="where --grid writes every timed config")
    ap.add_argument("--grid-knobs", default="", help="JSON: replace some of GRID's value lists")
    ap.add_argument("--configs", default="", help="JSON list of config overrides to time as well (to --grid-log)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --configs")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test this script (with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.grid_knobs:
        GRID.update(json.loads(args.grid_knobs))
    dev = args.device
    dtype = getattr(torch, args.dtype)
    ms = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    timer = Timer(not args.no_flush, args.reps, warmup=3 if dev == "cuda" else 1, device=dev)
    t_start = time.time()
    rows = []
    torch.manual_seed(0)
    for n, k in shapes:
        data, scale, mn = quant.random_packed((n, k), 4, GROUP, device=dev)
        w = dequantize(data, scale, mn, 4, GROUP, dtype)  # 16-bit weight for the dense / dequant baselines
        w32 = dequantize(data, scale, mn, 4, GROUP, torch.float32)  # fp32 reference (= strata.model.quant.dequantize)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ref = F.linear(x.float(), w32)  # error of the fused kernel ~ rounding of its 16-bit output
            row = {"what": "w4a16", "N": n, "K": k, "M": m, "dtype": args.dtype, "flush_l2": not args.no_flush}
            num_sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 4
            row["config"] = w4a16.pick_config(m, n, k, GROUP, num_sms)
            row["dense_s"] = timer(lambda: F.linear(x, w))
            row["dequant_linear_s"] = timer(lambda: F.linear(x, dequantize(data, scale, mn, 4, GROUP, dtype)))
            try:
                y = w4a16.int4_linear(x, data, scale, mn, GROUP)
                row["rel_err"] = rel_err(y, ref)
                row["ok"] = row["rel_err"] < 1e-2
                row["fused_s"] = timer(lambda: w4a16.int4_linear(x, data, scale, mn, GROUP))
                nbytes = data.numel() + 2 * (scale.numel() + mn.numel()) + 2 * m * (k + n)
                row["fused_GBps"] = nbytes / row["fused_s"] / 1e9
                row["speedup_vs_dequant"] = row["dequant_linear_s"] / row["fused_s"]
                row["speedup_vs_dense"] = row["dense_s"] / row["fused_s"]
                if args.configs:
                    with open(args.grid_log, "a") as log:
                        compare(timer, x, data, scale, mn, ref, row["config"], json.loads(args.configs),
                                args.rounds, log)
                if args.grid:
                    with open(args.grid_log, "a") as log:
                        best, best_t = grid(timer, x, data, scale, mn, ref, row["config"], num_sms, log)
                    if args.sweep:
                        best, best_t = sweep(timer, x, data, scale, mn, ref, best)
                    row["sweep_best"], row["sweep_best_s"] = best, best_t
                elif args.sweep:
                    best, best_t = sweep(timer, x, data, scale, mn, ref, row["config"])
                    row["sweep_best"], row["sweep_best_s"] = best, best_t
            except Exception as e:  # noqa: BLE001 - report and go on to the next case
                row["ok"] = False
                row["error"] = repr(e)[:500]
                traceback.print_exc(file=sys.stderr)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del data, scale, mn, w, w32
        if dev == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(0) if dev == "cuda" else dev
    print(f"\n# {name}, {args.dtype}, L2 flush {'off' if args.no_flush else 'on'}, "
          f"{time.time() - t_start:.1f} s; times in ms")
    head = f"{'N':>6} {'K':>6} {'M':>4} | {'fused':>7} {'dq+lin':>7} {'dense':>7} | {'x dq':>5} {'x dense':>7} " \
           f"{'GB/s':>6} {'err':>8} {'cfg (BM,BN,BK,split,alg,swap)':>30}"
    if args.sweep or args.grid:
        head += f" | {'best':>7} best cfg"
    print(head)
    for r in rows:
        c = r["config"]
        cfg = f"{c['BLOCK_M']},{c['BLOCK_N']},{c['BLOCK_K']},{c['SPLIT_K']},{int(c['ALGEBRAIC'])},{int(c['SWAP'])}"
        if "fused_s" in r:
            line = (f"{r['N']:>6} {r['K']:>6} {r['M']:>4} | {r['fused_s'] * 1e3:7.3f} {r['dequant_linear_s'] * 1e3:7.3f} "
                    f"{r['dense_s'] * 1e3:7.3f} | {r['speedup_vs_dequant']:5.2f} {r['speedup_vs_dense']:7.2f} "
                    f"{r['fused_GBps']:6.0f} {r['rel_err']:8.1e} {cfg:>30}")
            if "sweep_best" in r:
                b = r["sweep_best"]
                line += (f" | {r['sweep_best_s'] * 1e3:7.3f} {b['BLOCK_M']},{b['BLOCK_N']},{b['BLOCK_K']},"
                         f"{b['SPLIT_K']},{int(b['ALGEBRAIC'])},{int(b['SWAP'])},j{int(b['JOIN'])},w{b['num_warps']},"
                         f"s{b['num_stages']}")
        else:
            line = f"{r['N']:>6} {r['K']:>6} {r['M']:>4} | FAILED {r.get('error', '')[:100]}"
        print(line)
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

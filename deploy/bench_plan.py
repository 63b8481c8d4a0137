"""What a `strata bench` run measures against: the placement (pinned by flags, else the
planner's choice on the profile, as `strata serve` plans: deploy/serve_plan.py), the
cost model's prediction of it, and the profile the floor takes its figures from."""

from __future__ import annotations

import pathlib

from deploy import serve_plan
from strata.runtime import paths


def offload_base(offload_dir: str) -> pathlib.Path:
    """Where dummy runs write their disk-tier files (below it: offload/)."""
    return pathlib.Path(offload_dir) if offload_dir else paths.cache_root()


def prediction_dict(pr, profile_path: str) -> dict:
    """The cost model's figures to report beside the measured ones (peak_gpu_bytes: PyTorch's
    allocated peak, as the compute node measures it)."""
    return {"profile": profile_path, "total_tokens_per_s": round(pr.total_tokens_per_s, 2),
            "prefill_s": round(pr.prefill_s, 4), "decode_s": round(pr.decode_s, 4),
            "binding": [pr.prefill_binding, pr.decode_binding], "peak_gpu_bytes": int(pr.gpu_peak_allocated),
            "gpu_bytes_needed": int(pr.gpu_bytes_needed), "host_bytes_needed": int(pr.host_bytes_needed),
            "gpu_breakdown": {k: int(v) for k, v in pr.gpu_breakdown.items()}}


def predict_run(run: dict, profile):
    """The cost model's prediction of a bench JSON line's placement on `profile`."""
    from strata.policy import cost_model as cm
    from strata.policy.model_bytes import model_for

    w = run["placement"]["weights"]
    dims, wbf, _ = model_for(run["model"], w["quant_bits"], w["group_size"])
    disk_share = w.get("disk_layers_per_pass", 0) / dims.num_layers
    pl = cm.Placement(w["gpu_share"], run["placement"]["kv"].startswith("host"), run["placement"]["micro_batches"],
                      run["batch_size"], w["quant_bits"], disk_share, run["placement"].get("kv_bits", 16),
                      prefill_chunk_tokens=run["placement"].get("prefill_chunk_tokens", 0),
                      prefill_tokens_per_pass=run["placement"].get("prefill_tokens_per_pass", 0))
    return cm.predict(dims, wbf(w["quant_bits"]), cm.Workload(run["prompt_len"], run["gen_len"], run["batch_size"]),
                      pl, profile)


def _disk_layers_room(ns, layer_bytes: float) -> int | None:
    """Dummy runs write their disk layers first: at most as many as the offload directory's
    free space holds (1 GiB kept free); None where nothing must be written."""
    if not getattr(ns, "dummy", False):
        return None
    from weight_store.diskspace import disk_free_bytes

    free = disk_free_bytes(offload_base(getattr(ns, "offload_dir", "")))
    return max(0, int((free - 2**30) // layer_bytes))


def planned(ns, profile_path: str | None = None) -> tuple[dict, dict]:
    """The planner's placement for a bench run whose placement flags were not given:
    (placement fields, the prediction to report beside the measurement)."""
    from deploy.profile_cli import load_profile
    from strata.policy import cost_model as cm
    from strata.policy import planner
    from strata.policy.model_bytes import model_for

    profile, where = load_profile(profile_path or ns.profile)
    dims, wbf, bits = model_for(ns.model, ns.quant_bits, ns.group_size)
    fixed = planner.Fixed(kv_on_host=True if ns.kv_offload else None, batch_size=ns.batch_size, quant_bits=bits,
                          disk_weight_share=None, kv_bits=ns.kv_bits,
                          max_disk_layers=_disk_layers_room(ns, wbf(bits).layer))
    workload = cm.Workload(ns.prompt_len, ns.gen_len, ns.batch_size)
    result = planner.plan(dims, wbf, workload, profile, fixed)
    pl, pr = result.placement, result.prediction
    fields = {"gpu_weight_share": pl.gpu_weight_share, "kv_offload": pl.kv_on_host,
              "micro_batches": pl.micro_batches, "batch_size": pl.batch_size, "kv_bits": pl.kv_bits,
              "disk_layers": pl.layer_counts(dims.num_layers)[2], "prefill_chunk_tokens": pl.prefill_chunk_tokens}
    return fields, prediction_dict(pr, where)


def floor_profile(ns, prediction: dict | None):
    """(profile, path) for the floor and the prediction: the planner's; else --profile;
    else this machine's cached profile where one is fresh (never measured here); else
    (None, "") and the floor takes DESIGN.md's H100 figures."""
    from strata.policy import hardware

    path = prediction["profile"] if prediction else ns.profile
    if path:
        return hardware.load(path), str(path)
    default = hardware.default_path()
    if default.exists():
        prof = hardware.load(default)
        if not prof.is_stale():
            return prof, str(default)
    return None, ""


def placement(ns) -> tuple[dict, dict | None]:
    """Pinned by flags (or no GPU to plan for), else planned: serve's rule (deploy/serve_plan.py)."""
    if not serve_plan.pinned(ns):
        return planned(ns)
    return {"gpu_weight_share": serve_plan.pinned_share(ns), "kv_offload": ns.kv_offload, "micro_batches": ns.micro_batches or 1,
            "batch_size": ns.batch_size or 8, "kv_bits": ns.kv_bits or 16, "disk_layers": 0,
            "prefill_chunk_tokens": 0}, None

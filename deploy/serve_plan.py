"""The run plan of `strata serve` and `strata bench`, resolved once (strata/policy/run_plan.py):
pinned by the placement flags, or on a GPU without any, the planner's placement for the
workload the server expects (`--plan-prompt-len`, `--plan-gen-len`, `--plan-batch`), on
this machine's profile (measured on first use) or `--profile`. The launcher writes it
into the run directory and every service reads it."""

from __future__ import annotations

import sys

from strata.model.manifest import Manifest
from strata.policy.run_plan import RunPlan
from strata.runtime.errors import ErrorKind, StrataError


def pinned(a) -> bool:
    """Whether the user chose the placement (any placement flag given), or there is no
    GPU to plan for. One rule for serve and bench."""
    return (a.gpu_weight_share is not None or a.micro_batches is not None or getattr(a, "cpu_offload", False)
            or a.disk_offload or bool(a.host_budget_gb) or not a.device.startswith("cuda"))


def pinned_share(a) -> float:
    """The GPU weight share of a pinned placement: the flag's; else 0 where weights are
    offloaded (--cpu-offload, --disk-offload, --host-budget-gb), else 1."""
    if getattr(a, "cpu_offload", False):
        return 0.0
    if a.gpu_weight_share is not None:
        return a.gpu_weight_share
    return 0.0 if a.disk_offload or a.host_budget_gb else 1.0


def resolve(m: Manifest, *, gpu_weight_share: float, disk_layers: int = 0, disk_offload: bool = False,
            host_budget_bytes: int = 0, kv_offload: bool = False, kv_bits: int = 16, **fields) -> RunPlan:
    """The run plan of a placement: resident layers spread by `gpu_weight_share`
    (strata/policy/placement.py), the layers read from disk every pass either the planner's
    count (`disk_layers`: the last streamed ones) or those the host tier cannot hold
    under `host_budget_bytes` / `disk_offload` (`tier_plan`). `fields`: the rest of
    RunPlan's (micro_batches, max_batch, ...)."""
    from strata.model.arch import dims_for
    from strata.model.kv_quant import default_group

    plan = RunPlan.with_share(m.num_layers, gpu_weight_share)
    resident = set(plan.resident_layers)
    disk: list[int] = []
    if disk_layers:
        disk = list(plan.streamed_layers[max(len(plan.streamed_layers) - disk_layers, 0):])
    elif disk_offload or host_budget_bytes:
        from strata.policy.placement import tier_plan
        from weight_store.host_tier import shard_sizes

        tiers = tier_plan(shard_sizes(m), m.num_layers, gpu_weight_share, host_budget_bytes or None, disk_offload)
        disk = [i for i in range(m.num_layers) if f"layer.{i}" in tiers.disk and i not in resident]
    group = default_group(dims_for(m.config).head_dim) if kv_bits != 16 else 0
    return RunPlan(num_layers=m.num_layers, resident_layers=plan.resident_layers, disk_layers=tuple(disk),
                   kv_home="kv_store" if kv_offload else "gpu", kv_bits=kv_bits, kv_group_size=group, **fields)


def serve_plan(a) -> tuple[RunPlan, int]:
    """`strata serve`'s run plan from its flags, and the KV store capacity the plan needs
    (0 = the flag's)."""
    m = Manifest.load(a.model)
    batch = dict(max_queue=a.max_queue, dtype=a.dtype, decode_graphs=not a.no_decode_graphs,
                 prefill_tokens_per_pass=a.prefill_tokens_per_pass)
    if pinned(a):
        plan = resolve(m, gpu_weight_share=pinned_share(a), disk_offload=a.disk_offload,
                       host_budget_bytes=int(a.host_budget_gb * 2**30), kv_offload=a.kv_offload,
                       kv_bits=a.kv_bits or 16, micro_batches=a.micro_batches or 1, max_batch=a.max_batch or 16,
                       max_seq_len=a.max_seq_len or 0, **batch)
        kv_bytes = 0
    else:
        plan, kv_bytes = _planned(a, m, batch)
    if plan.disk_layers and a.transport != "shm":
        raise StrataError(ErrorKind.FAILED_PRECONDITION, f"the plan keeps {len(plan.disk_layers)} layers on disk; "
                          "that needs --transport shm")
    return plan, kv_bytes


def _planned(a, m: Manifest, batch: dict) -> tuple[RunPlan, int]:
    """The planner's GPU share, KV place, bits and capacity, micro-batches and disk
    layers; prints the plan on stderr."""
    from deploy.profile_cli import load_profile
    from strata.policy import cost_model as cm
    from strata.policy import planner
    from strata.policy.model_bytes import model_for

    dims, wbf, bits = model_for(a.model, None, 64)
    profile, where = load_profile(a.profile)
    # the scheduler allocates every slot's KV at start: plan for the slots and slot length
    # it will have where the user sets them (--max-batch, --max-seq-len)
    slots = a.plan_batch or a.max_batch or None
    gen_len = max(a.plan_gen_len, (a.max_seq_len or 0) - a.plan_prompt_len)
    fixed = planner.Fixed(kv_on_host=True if a.kv_offload else None, batch_size=slots, quant_bits=bits,
                          disk_weight_share=None, kv_bits=a.kv_bits)
    result = planner.plan(dims, wbf, cm.Workload(a.plan_prompt_len, gen_len, slots), profile, fixed)
    pl, pr = result.placement, result.prediction
    disk_n = pl.layer_counts(dims.num_layers)[2]
    print(f"strata serve: planned for {pl.batch_size} prompts of {a.plan_prompt_len} tokens + {a.plan_gen_len} "
          f"(profile {where}): GPU weight share {pl.gpu_weight_share:.3f}, KV {'host' if pl.kv_on_host else 'GPU'}, "
          f"KV at {pl.kv_bits} bits, {pl.micro_batches} micro-batches, {disk_n} layers on disk; predicted "
          f"{pr.total_tokens_per_s:.1f} tokens/s (bound by {pr.prefill_binding} / {pr.decode_binding}), GPU memory "
          f"{pr.gpu_peak_allocated / 2**30:.1f} GiB at its peak, {pr.gpu_bytes_needed / 2**30:.1f} of "
          f"{profile.gpu_bytes / 2**30:.1f} GiB with the margin",
          file=sys.stderr, flush=True)
    plan = resolve(m, gpu_weight_share=pl.gpu_weight_share, disk_layers=disk_n, kv_offload=pl.kv_on_host,
                   kv_bits=pl.kv_bits, micro_batches=pl.micro_batches, max_batch=a.max_batch or pl.batch_size,
                   prefill_chunk_tokens=pl.prefill_chunk_tokens,
                   max_seq_len=a.max_seq_len or a.plan_prompt_len + a.plan_gen_len, **batch)
    return plan, int(pr.host_breakdown.get("KV", 0.0)) + (256 << 20)

"""`strata serve` on a GPU without placement flags: the planner's placement for the
workload the server expects (`--plan-prompt-len`, `--plan-gen-len`, `--plan-batch`),
on this machine's profile (measured on first use) or `--profile`."""

from __future__ import annotations

import dataclasses
import sys

from strata.errors import ErrorKind, StrataError


def pinned(a) -> bool:
    """Whether the user chose the placement (any placement flag given)."""
    return (a.gpu_weight_share is not None or a.micro_batches is not None or a.disk_offload
            or a.host_budget_gb > 0 or a.device in ("cpu", "mock-cuda"))


def planned_options(a, opts):
    """`opts` (ServeOptions) with the planner's GPU share, KV place and capacity,
    micro-batches and disk layers (as a host budget); prints the plan on stderr."""
    from deploy.plan_cli import _model, load_profile
    from strata import cost_model as cm
    from strata import planner
    from strata.manifest import Manifest
    from strata.placement import host_budget_for
    from weight_store.host_tier import shard_sizes

    m = Manifest.load(a.model)
    dims, wbf, bits = _model(a.model, None, 64)
    profile, where = load_profile(a.profile)
    # the scheduler allocates every slot's KV at start: plan for the slots and slot length
    # it will have where the user sets them (--max-batch, --max-seq-len)
    batch = a.plan_batch or a.max_batch or None
    gen_len = max(a.plan_gen_len, (a.max_seq_len or 0) - a.plan_prompt_len)
    fixed = planner.Fixed(kv_on_host=True if a.kv_offload else None, batch_size=batch, quant_bits=bits,
                          disk_weight_share=None, kv_bits=a.kv_bits)
    workload = cm.Workload(a.plan_prompt_len, gen_len, batch)
    result = planner.plan(dims, wbf, workload, profile, fixed)
    pl, pr = result.placement, result.prediction
    disk_n = pl.layer_counts(dims.num_layers)[2]
    budget = 0
    if disk_n:
        budget = host_budget_for(shard_sizes(m), dims.num_layers, pl.gpu_weight_share, disk_n)
    kv_bytes = int(pr.host_breakdown.get("KV", 0.0)) + (256 << 20)
    print(f"strata serve: planned for {pl.batch_size} prompts of {a.plan_prompt_len} tokens + {a.plan_gen_len} "
          f"(profile {where}): GPU weight share {pl.gpu_weight_share:.3f}, KV {'host' if pl.kv_on_host else 'GPU'}, "
          f"KV at {pl.kv_bits} bits, {pl.micro_batches} micro-batches, {disk_n} layers on disk; predicted "
          f"{pr.total_tokens_per_s:.1f} tokens/s (bound by {pr.prefill_binding} / {pr.decode_binding}), GPU memory "
          f"{pr.gpu_peak_allocated / 2**30:.1f} GiB at its peak, {pr.gpu_bytes_needed / 2**30:.1f} of "
          f"{profile.gpu_bytes / 2**30:.1f} GiB with the margin",
          file=sys.stderr, flush=True)
    if disk_n and a.transport != "shm":
        raise StrataError(ErrorKind.FAILED_PRECONDITION, "the plan keeps layers on disk; that needs --transport shm")
    return dataclasses.replace(
        opts, gpu_weight_share=pl.gpu_weight_share, kv_offload=pl.kv_on_host, kv_bits=pl.kv_bits,
        micro_batches=pl.micro_batches, max_batch=a.max_batch or pl.batch_size,
        max_seq_len=a.max_seq_len or a.plan_prompt_len + a.plan_gen_len,
        kv_capacity_bytes=max(kv_bytes, opts.kv_capacity_bytes), host_budget_bytes=budget)

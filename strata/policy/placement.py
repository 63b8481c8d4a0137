"""Placement policy (no torch): which layers stay resident on the compute device
(the rest stream every forward pass), and which shards the weight store holds in the
host tier rather than reading them from disk."""

from __future__ import annotations

import dataclasses

from strata.runtime.errors import ErrorKind, StrataError


def resident_layers(num_layers: int, gpu_share: float) -> set[int]:
    """round(share * L) resident layers, spread evenly through the model, so that the
    host-to-GPU stream of the others keeps going while resident layers compute
    (resident and streamed layers interleave instead of forming two blocks)."""
    if not 0.0 <= gpu_share <= 1.0:
        raise ValueError(f"GPU weight share must be in [0, 1], got {gpu_share}")
    k = round(gpu_share * num_layers)
    if k == 0:
        return set()
    return {int(j * num_layers / k) for j in range(k)}


STAGING_SLOTS = 3  # disk reads in flight while the compute node copies the third slot to the GPU
# The smaller prefill chunk the planner may choose (cost_model.Placement.prefill_chunk_tokens):
# at this many prompt tokens a layer's matmuls still run near the GPU's rate, and the
# activation memory it saves can hold resident layers or a larger batch instead
SMALL_PREFILL_CHUNK_TOKENS = 4096
RING_DEPTH = 3  # streamed layers loading or loaded on the GPU ahead of use (packed slots)
# Decode rows (sequences of a micro-batch) up to which a GPU-resident INT4 layer runs
# the fused W4A16 kernels on its packed weights instead of dequantize + cuBLAS. The
# wgmma kernel takes 128 rows a call (FUSED_KERNEL_ROWS; the mma.sync kernel of GPUs
# before Hopper 64); more rows go in even chunks, each reading the packed layer again:
# 2 chunks read 2 x 0.28 of the bf16 bytes, still under the dense copy's write and read
# (2 x 1.0). The kernel is faster than the dequantize + cuBLAS pair on every OPT-30B
# shape measured (BENCHMARKS.md, "Kernel measurements").
FUSED_INT4_MAX_ROWS = 256
FUSED_KERNEL_ROWS = 128  # as compute_node/kernels/w4a16_wgmma.py MAX_ROWS (a test holds them equal)


@dataclasses.dataclass(frozen=True)
class TierPlan:
    """Where the weight store keeps each shard: `host` shards in the host tier, `disk`
    shards read from their files into `staging_slots` slots of `slot_bytes` on request."""

    host: frozenset[str]
    disk: frozenset[str]
    staging_slots: int
    slot_bytes: int

    @property
    def staging_bytes(self) -> int:
        return self.staging_slots * self.slot_bytes

    def summary(self) -> str:
        return (f"{len(self.host)} shards in the host tier, {len(self.disk)} on disk "
                f"({self.staging_slots} staging slots of {self.slot_bytes} bytes)")


def tier_plan(sizes: dict[str, int], num_layers: int, gpu_share: float, host_budget: int | None,
              disk_offload: bool, slots: int = STAGING_SLOTS) -> TierPlan:
    """Which shards the host tier holds within `host_budget` bytes (None: no limit).

    `sizes`: each shard's aligned size ("embed", "head", "layer.{i}"). Embeddings and
    head always sit in the host tier; layers resident on the GPU never do (they are
    read once from disk through the staging slots). Streamed layers fill the host tier
    in pass order until the budget, less the staging slots, is spent; the rest (the
    last ones) are read from disk every pass. `disk_offload` with no budget keeps
    every layer on disk. With no budget, no offload and nothing resident, the host
    tier holds everything and there is no staging."""
    layers = [f"layer.{i}" for i in range(num_layers)]
    fixed = [n for n in sizes if n not in set(layers)]
    if host_budget is None and not disk_offload and not resident_layers(num_layers, gpu_share):
        return TierPlan(frozenset(sizes), frozenset(), 0, 0)
    resident = {f"layer.{i}" for i in resident_layers(num_layers, gpu_share)}
    streamed = [n for n in layers if n not in resident]
    slot_bytes = max(sizes[n] for n in layers)
    need = sum(sizes[n] for n in fixed) + slots * slot_bytes
    if host_budget is not None and host_budget < need:
        raise StrataError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"host budget of {host_budget} bytes is {need - host_budget} bytes short of what embeddings, head "
            f"and {slots} staging slots need ({need} bytes)")
    room = (host_budget - need) if host_budget is not None else (0 if disk_offload else float("inf"))
    cached = []
    for n in streamed:
        if sizes[n] > room:
            break
        cached.append(n)
        room -= sizes[n]
    host = frozenset(fixed + cached)
    disk = frozenset(n for n in layers if n not in host)
    return TierPlan(host, disk, slots if disk else 0, slot_bytes if disk else 0)


def host_budget_for(sizes: dict[str, int], num_layers: int, gpu_share: float, disk_layers: int) -> int:
    """The host budget with which `tier_plan` (given the same `sizes`) keeps exactly the
    last `disk_layers` streamed layers on disk: embeddings, head, staging slots and
    the other streamed layers. (Passed on as GiB floats: bytes / 2**30 and back are
    exact below 2**53 bytes.)"""
    layers = [f"layer.{i}" for i in range(num_layers)]
    resident = {f"layer.{i}" for i in resident_layers(num_layers, gpu_share)}
    streamed = [n for n in layers if n not in resident]
    held = streamed[: max(len(streamed) - disk_layers, 0)]
    fixed = sum(v for n, v in sizes.items() if n not in set(layers))
    return fixed + STAGING_SLOTS * max(sizes[n] for n in layers) + sum(sizes[n] for n in held)

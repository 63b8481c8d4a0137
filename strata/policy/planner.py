"""The planner: the placement with the highest predicted tokens/s that fits the
machine's GPU and host memory (with headroom), from the cost model over a grid.
No torch, no grpc.

Grid: quantization bits (fixed, or 4/8/16), GPU weight share in steps of one layer,
KV on the GPU or in the KV store, KV precision (16 unless the user allows 8/4: a
lossy cache is the user's call), 1/2/4/8/16 micro-batches, batch sizes (powers of two,
1.5x powers of two, and the largest that fits). For a given rest of the placement,
more resident layers never predict a slower run (the cost model's monotonicity,
tested), so only the largest share that fits is predicted for each combination."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from strata.model.arch import ModelDims
from strata.policy import cost_model as cm
from strata.policy.hardware import HardwareProfile
from strata.policy.placement import SMALL_PREFILL_CHUNK_TOKENS
from strata.runtime.errors import ErrorKind, StrataError

MICRO_BATCHES = (1, 2, 4, 8, 16)
QUANT_BITS = (4, 8, 16)
KV_BITS = (16, 8, 4)
MAX_BATCH = 256  # the compute node's default batch limit (strata/runtime/config.py)
ALTERNATIVES = 5


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Placement fields the user pinned (None: the planner chooses)."""

    gpu_weight_share: float | None = None
    kv_on_host: bool | None = None
    micro_batches: int | None = None
    batch_size: int | None = None
    quant_bits: int | None = None
    disk_weight_share: float | None = 0.0  # None: the least share of layers on disk that fits host memory
    max_disk_layers: int | None = None  # with disk_weight_share None: at most this many (disk space)
    kv_bits: int | None = 16  # None: the planner's choice among KV_BITS


@dataclasses.dataclass(frozen=True)
class Choice:
    placement: cm.Placement
    prediction: cm.Prediction


@dataclasses.dataclass(frozen=True)
class Plan:
    placement: cm.Placement
    prediction: cm.Prediction
    alternatives: tuple[Choice, ...]  # the next best, best first
    considered: int  # placements predicted
    machine: str


WeightBytesFn = Callable[[int], cm.WeightBytes]  # quant bits -> stored bytes


def batch_candidates(limit: int = MAX_BATCH) -> list[int]:
    out = {1}
    k = 1
    while k <= limit:
        out.update(x for x in (k, k * 3 // 2) if 1 <= x <= limit)
        k *= 2
    return sorted(out)


def _fits(dims, wb, w, pl, profile, host: bool = True) -> bool:
    return cm.fits(dims, wb, w, pl, profile, host=host)


def _shares(dims: ModelDims, fixed: Fixed) -> list[float]:
    if fixed.gpu_weight_share is not None:
        return [fixed.gpu_weight_share]
    L = dims.num_layers
    return [k / L for k in range(L + 1)]


def _largest_share(dims, wb, w, pl: cm.Placement, profile, shares: list[float]) -> float | None:
    """The largest share that fits. GPU memory grows with the share and host memory
    shrinks (resident layers are not held by the weight store), so the shares that fit
    form a range that need not start at 0: scanned from the top."""
    usable = [s for s in shares if s + pl.disk_weight_share <= 1.0 + 1e-9]
    for share in reversed(usable):
        if _fits(dims, wb, w, dataclasses.replace(pl, gpu_weight_share=share), profile):
            return share
    return None


def _largest_batch(dims, wb, w, pl: cm.Placement, profile, limit: int) -> int | None:
    lo, hi, best = 1, limit, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fits(dims, wb, w, dataclasses.replace(pl, batch_size=mid), profile):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _most_batch(dims, wb, w, pl: cm.Placement, profile, shares: list[float], limit: int) -> int | None:
    """The largest batch that fits at some share. Resident layers take GPU memory and
    free host memory (the weight store does not hold them), so the largest batch may
    need a share in between: every eighth share is tried, and all resident."""
    sample = set(shares[:: max(1, len(shares) // 8)]) | {shares[-1]}
    fits = [_largest_batch(dims, wb, w, dataclasses.replace(pl, gpu_weight_share=s), profile, limit)
            for s in sample]
    return max((b for b in fits if b), default=None)


def _largest_share_with_disk(dims, wb, w, pl: cm.Placement, profile, shares: list[float]) -> float | None:
    """The largest share that fits the GPU with some streamed layer on disk. GPU memory
    is the same for any number of disk layers from one up (the count only moves bytes
    between host memory and disk), but may differ from none: `--dummy` resident layers
    are made on the GPU only where nothing is on disk (cost_model.memory_shape)."""
    L = dims.num_layers
    for share in reversed(shares):
        resident = round(share * L)
        if resident < L and _fits(dims, wb, w, dataclasses.replace(
                pl, gpu_weight_share=share, disk_weight_share=(L - resident) / L), profile, host=False):
            return share
    return None


def _least_disk(dims, wb, w, pl: cm.Placement, profile) -> float | None:
    """The smallest share of layers kept on disk (whole layers, at least one, of those
    not resident) with which the placement fits; None if not even every streamed layer
    on disk does."""
    L = dims.num_layers
    resident = pl.layer_counts(L)[0]
    for k in range(1, L - resident + 1):
        if cm.fits(dims, wb, w, dataclasses.replace(pl, disk_weight_share=k / L), profile):
            return k / L
    return None


def _kv_choices(fixed: Fixed) -> list[tuple[bool, int]]:
    """(KV in the KV store, KV bits) pairs to try."""
    places = [fixed.kv_on_host] if fixed.kv_on_host is not None else [False, True]
    bits = [fixed.kv_bits] if fixed.kv_bits else list(KV_BITS)
    return [(p, b) for p in places for b in bits]


def _groups_and_chunks(fixed: Fixed, w: cm.Workload, batch: int | None) -> list[tuple[int, int]]:
    """(micro-batches, prefill chunk tokens) pairs to try: each count with the compute
    node's default chunk (0), and with SMALL_PREFILL_CHUNK_TOKENS where that is smaller
    than a micro-batch's slots hold (it may be at any batch the search tries)."""
    out = []
    for m in [fixed.micro_batches] if fixed.micro_batches else MICRO_BATCHES:
        out.append((m, 0))
        rows = -(-batch // m) if batch else MAX_BATCH
        if SMALL_PREFILL_CHUNK_TOKENS < rows * (w.prompt_len + w.gen_len):
            out.append((m, SMALL_PREFILL_CHUNK_TOKENS))
    return out


def _grid(dims, wbf: WeightBytesFn, w: cm.Workload, profile, fixed: Fixed,
          max_batch: int) -> Iterator[tuple[cm.WeightBytes, cm.Placement]]:
    """Placements that fit, each with the largest share that fits for the rest (and,
    when the disk share is the planner's, the least disk share that fits)."""
    batch = fixed.batch_size or w.batch_size
    shares = _shares(dims, fixed)
    auto_disk = fixed.disk_weight_share is None
    for bits in [fixed.quant_bits] if fixed.quant_bits else QUANT_BITS:
        wb = wbf(bits)
        for kv, kv_bits in _kv_choices(fixed):
            for m, chunk in _groups_and_chunks(fixed, w, batch):
                base = cm.Placement(shares[0], kv, m, max(batch or 1, m), bits,
                                    1.0 if auto_disk else fixed.disk_weight_share, kv_bits, prefill_chunk_tokens=chunk)
                most = batch or _most_batch(dims, wb, w, base, profile, shares, max_batch)
                if most is None:
                    continue
                sizes = [batch] if batch else sorted({b for b in batch_candidates(most) if b >= m} | {most})
                if auto_disk and not batch:  # also the largest batch with every layer off the disk
                    no_disk = _most_batch(dims, wb, w, dataclasses.replace(base, disk_weight_share=0.0), profile,
                                          shares, max_batch)
                    sizes = sorted(set(sizes) | ({no_disk} if no_disk and no_disk >= m else set()))
                for b in sizes:
                    if b < m:
                        continue
                    pl = dataclasses.replace(base, batch_size=b)
                    if auto_disk:  # no disk where some share fits without
                        pl = dataclasses.replace(pl, disk_weight_share=0.0)
                        share = _largest_share(dims, wb, w, pl, profile, shares)
                        if share is not None:
                            yield wb, dataclasses.replace(pl, gpu_weight_share=share)
                            continue
                        # else as many layers resident as the GPU holds with layers on disk, and
                        # the fewest on disk that host memory needs there: fewer resident layers
                        # would only put more on disk
                        share = _largest_share_with_disk(dims, wb, w, pl, profile, shares)
                        if share is None:
                            continue
                        disk = _least_disk(dims, wb, w, dataclasses.replace(pl, gpu_weight_share=share), profile)
                        if disk is None or (fixed.max_disk_layers is not None
                                            and round(disk * dims.num_layers) > fixed.max_disk_layers):
                            continue
                        yield wb, dataclasses.replace(pl, gpu_weight_share=share, disk_weight_share=disk)
                        continue
                    share = _largest_share(dims, wb, w, pl, profile, shares)
                    if share is not None:
                        yield wb, dataclasses.replace(pl, gpu_weight_share=share)


def plan(dims: ModelDims, weight_bytes_fn: WeightBytesFn, workload: cm.Workload, profile: HardwareProfile,
         fixed: Fixed = Fixed(), max_batch: int = MAX_BATCH) -> Plan:
    if not profile.has_gpu:
        raise StrataError(ErrorKind.FAILED_PRECONDITION,
                          f"profile {profile.machine!r} has no GPU; plan with the profile of a GPU machine (--profile)")
    choices = [Choice(pl, cm.predict(dims, wb, workload, pl, profile))
               for wb, pl in _grid(dims, weight_bytes_fn, workload, profile, fixed, max_batch)]
    if not choices:
        raise _does_not_fit(dims, weight_bytes_fn, workload, profile, fixed)
    # ties: the compute node's default prefill chunk (the larger matmuls), then less memory
    choices.sort(key=lambda c: (-c.prediction.total_tokens_per_s, c.placement.prefill_chunk_tokens != 0,
                                c.prediction.gpu_bytes_needed))
    best = choices[0]
    return Plan(best.placement, best.prediction, tuple(choices[1 : 1 + ALTERNATIVES]), len(choices), profile.machine)


def _does_not_fit(dims, wbf: WeightBytesFn, w: cm.Workload, profile: HardwareProfile, fixed: Fixed) -> StrataError:
    """The error for the smallest placement allowed: what does not fit, by how many bytes."""
    bits = fixed.quant_bits or min(QUANT_BITS)
    wb = wbf(bits)
    batch = fixed.batch_size or w.batch_size or 1
    share = fixed.gpu_weight_share or 0.0
    best = None
    for kv, kv_bits in _kv_choices(fixed):
        m = fixed.micro_batches or 1
        pl = cm.Placement(share, kv, m, max(batch, m), bits,
                          1.0 if fixed.disk_weight_share is None else fixed.disk_weight_share, kv_bits)
        gpu, host = cm.memory(dims, wb, w, pl, profile.gpu_bytes)
        short = max(sum(gpu.values()) - profile.gpu_bytes, 0) + max(sum(host.values()) - profile.host_bytes, 0)
        if best is None or short < best[0]:
            best = (short, pl, gpu, host)
    _, pl, gpu, host = best
    parts = []
    for tier, need, have in (("GPU", gpu, profile.gpu_bytes), ("host", host, profile.host_bytes)):
        total = sum(need.values())
        if total > have:
            items = ", ".join(f"{k} {v:,.0f}" for k, v in need.items() if v)
            parts.append(f"{tier} memory needs {total:,.0f} bytes ({items}) but {profile.machine} has "
                         f"{have:,.0f}: short by {total - have:,.0f} bytes")
    where = (f"batch {pl.batch_size}, GPU weight share {pl.gpu_weight_share:g}, INT{bits}" if bits < 16
             else f"batch {pl.batch_size}, GPU weight share {pl.gpu_weight_share:g}, fp16")
    kv = "KV in host memory" if pl.kv_on_host else "KV on the GPU"
    if fixed.max_disk_layers is not None:
        parts.append(f"and at most {fixed.max_disk_layers} layers may stay on disk (its free space)")
    return StrataError(ErrorKind.RESOURCE_EXHAUSTED,
                       f"no placement fits, not even the smallest ({where}, {kv}): " + "; ".join(parts))

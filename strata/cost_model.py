"""Cost model: predicted prefill time, decode step times and tokens/s of a placement
on a profiled machine, modelled on how the engine runs (compute_node/engine.py,
layer_weights.py), not on an idealised system. No torch, no grpc.

Per forward pass, layer i takes max(GPU work of i, CPU attention of i, load of
layer i+1) plus control overhead: the load of i+1 (PCIe, or NVMe then PCIe) runs
on a side stream while i computes, at the rate streamed layers were measured to
reach (STREAM_EFFICIENCY); resident layers are the first ones, and a pass
whose layer 0 is streamed waits for its load first. GPU work of a layer: read the
packed bytes, write the dequantized fp16 layer, read it again once per micro-batch,
plus KV reads when KV is on the GPU; or FLOPs at a GEMM efficiency, whichever is
larger. With KV in the KV store, CPU attention of micro-batch j overlaps the GPU
work of j-1 (a two-stage pipeline: max + min / micro_batches)."""

from __future__ import annotations

import dataclasses

from strata.arch import ModelDims
from strata.floor import kv_bytes_per_token
from strata.hardware import HardwareProfile
from strata.placement import FUSED_INT4_MAX_ROWS, RING_DEPTH, STAGING_SLOTS

GIB = 1 << 30
# Prefill activations of one micro-batch, in FFN-wide bf16 tensors alive at once: 6
# matches run 5's measured peak (T3: 57.2 GiB allocated against 55.7 predicted with 3).
ACTIVATION_COPIES = 6
GPU_HEADROOM = 4 * GIB  # CUDA context and allocator slack: 2 GiB was not enough (run 13: an OOM at a predicted fit)
HOST_HEADROOM = 13 * GIB  # beyond tier and KV: 12.2 GiB in run 8 (T1, B=150: 117.1 GiB peak, 104.9 GiB of KV; the KV store keeps 5% spare)
RPC_OVERHEAD_S = 1.5e-3  # per layer per micro-batch, KV in the KV store: an Attend round trip (run 21, 1.4-1.6 ms)
LAUNCH_OVERHEAD_S = 0.05e-3  # per layer per micro-batch otherwise (kernel launches)
STEP_OVERHEAD_S = 1e-3  # per pass: embedding, sampling, the host sync of the tokens
GEMM_EFFICIENCY = 0.82  # of the measured 8192^3 rate, at large M: prefill reached ~0.8 (T2 run 8: 3.18 s; T3 run 16: 27.0 s)
GEMM_HALF_M = 64  # rows at which efficiency is half of GEMM_EFFICIENCY
# The KV store's attention inside the service reads KV at about 0.88 of the isolated
# kernel's rate the profile measures (95.5 GB/s): 83-90 GB/s at T1 with the bf16
# kernel's software prefetch (runs 82-84 of 2026-11-27). 0.73 before the prefetch (70
# GB/s on three hosts, runs 36-39 of 2026-11-26), 0.65 before the kernel's threads
# claimed rows dynamically and took every core.
SERVICE_ATTENTION_EFFICIENCY = 0.88
# Over a quantized cache the KV store's kernel reads the codes in place; it is
# compute-bound there, so it gains less than the bytes it saves: in bf16-equivalent
# bytes it runs at this share of the bf16 rate: run 78 (16 threads, T1's call shape,
# one layer), against the bf16 kernel with its prefetch: 12.47 ms bf16, 13.55 INT8,
# 9.66 INT4. Before that prefetch they were 1.05 and 1.30 (run 36; at T1 in the
# service INT4 reached 1.41x the bf16 cache, run 42).
CPU_QUANT_ATTENTION_RATE = {16: 1.0, 8: 0.92, 4: 1.29}
# Streamed layers reach about 0.95 of the profile's pinned host-to-GPU copy rate with
# the packed ring (one copy per layer, dequant on the compute stream): an OPT-175B
# decode step with every layer streamed took 1.84-1.88 s for 99 GB (52-54 GB/s against
# 55, runs 16 and 20). Before the ring it was 0.58 (32-35 GB/s, run 14).
STREAM_EFFICIENCY = 0.95
# A layer that streams from the host tier while the KV store attends over host KV:
# the copy and the attention both read host DRAM, and together they moved only ~0.45
# of the profile's DRAM read rate (layer bytes + KV bytes over the layer's time: 43,
# 43 and 36 GB/s in runs 16, 18 and 19, against 97; in-sample, and 64 GB/s in run 19's
# OPT-30B B=128 placement, which this under-predicts by 1.26x).
HOST_SHARED_SHARE = 0.45
# The fused W4A16 kernel (GPU-resident INT4 layers at up to FUSED_INT4_MAX_ROWS rows)
# reads a layer's packed bytes at this share of the profile's HBM rate, by rows: an
# OPT-30B layer's q/k/v/o/fc1/fc2 took 0.43, 0.69 and 0.86 ms at 16, 32 and 64 rows
# (run 3's kernel table), 0.81, 0.51 and 0.41 TB/s against 2.96. Stale at 64 rows: the
# wgmma kernel reads ~1.3-1.4 TB/s there (0.45; runs 66-68 of 2026-11-27), but with
# that figure the planner moves T1 to 4 micro-batches, which measured slower (run 51):
# the model has no per-micro-batch cost of the KV store's attention yet.
FUSED_HBM_SHARE = ((16, 0.27), (32, 0.17), (64, 0.14))
DECODE_SAMPLES = 32  # decode steps evaluated at most (evenly spaced), the rest interpolated

TERMS = ("PCIe weights", "NVMe weights", "CPU KV read", "KV to host", "HBM", "GPU FLOPs", "control overhead")


@dataclasses.dataclass(frozen=True)
class Workload:
    """A generate call. Unlike strata.floor.Workload, the batch may be left to the planner."""

    prompt_len: int
    gen_len: int
    batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Placement:
    gpu_weight_share: float  # share of layers resident on the GPU (the first ones)
    kv_on_host: bool  # all KV in the KV store, decode attention on its CPU
    micro_batches: int
    batch_size: int
    quant_bits: int = 4
    disk_weight_share: float = 0.0  # share of layers read from NVMe every pass (the last ones)
    kv_bits: int = 16  # KV cache precision (8/4: group-wise codes plus fp16 scale/min per 64)

    def layer_counts(self, num_layers: int) -> tuple[int, int, int]:
        """(resident, host-streamed, disk-streamed) layers, rounded as compute_node.placement does."""
        resident = round(self.gpu_weight_share * num_layers)
        disk = min(num_layers - resident, round(self.disk_weight_share * num_layers))
        return resident, num_layers - resident - disk, disk


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    """Stored bytes of a model at one quantization: every layer alike."""

    layer: float  # one layer shard as stored (packed codes + scales + norms, aligned)
    other: float  # embeddings and head (fp16, resident)
    layer_params: float  # elements of one layer (its dense fp16 copy is 2x this)
    quantized: bool
    num_layers: int

    @property
    def total(self) -> float:
        return self.layer * self.num_layers + self.other


def weight_bytes_from_shards(sizes: dict[str, float], dims: ModelDims, quant_bits: int) -> WeightBytes:
    """From a manifest's shard sizes ('layer.N', 'embed', 'head')."""
    layers = [v for k, v in sizes.items() if k.startswith("layer.")]
    other = sum(v for k, v in sizes.items() if not k.startswith("layer."))
    return WeightBytes(max(layers), other, layer_params(dims), quant_bits < 16, len(layers))


def estimate_weight_bytes(dims: ModelDims, quant_bits: int, group_size: int = 64) -> WeightBytes:
    """Closed form of the converter's layout (within a percent of the manifest)."""
    p = layer_params(dims)
    per = quant_bits / 8 + 4 / group_size if quant_bits < 16 else 2.0
    small = (9 * dims.hidden + dims.ffn) * 2  # biases and layer norms, fp16
    other = (dims.vocab + dims.max_positions + 2) * dims.hidden * 2
    return WeightBytes(p * per + small, other, p, quant_bits < 16, dims.num_layers)


def layer_params(d: ModelDims) -> float:
    return d.layer_params


def kv_bytes_per_token_layer(d: ModelDims, kv_bits: int = 16) -> float:
    """Keys and values of one token in one layer, as cached (16-bit, or INT8/INT4 codes
    plus an fp16 scale and min per group of 64)."""
    per_element = {16: 2.0, 8: 1 + 4 / 64, 4: 0.5 + 4 / 64}[kv_bits]
    return kv_bytes_per_token(d) / d.num_layers / 2 * per_element


@dataclasses.dataclass(frozen=True)
class Prediction:
    prefill_s: float
    decode_step_s: float  # mean over the decode steps
    decode_steps_s: tuple[float, ...]  # sampled steps (first to last)
    decode_s: float
    total_tokens_per_s: float
    gpu_bytes_needed: float
    host_bytes_needed: float
    prefill_binding: str
    decode_binding: str
    gpu_breakdown: dict
    host_breakdown: dict

    def fits(self, profile: HardwareProfile) -> bool:
        return self.gpu_bytes_needed <= profile.gpu_bytes and self.host_bytes_needed <= profile.host_bytes


def _gemm_flops(p: HardwareProfile, rows: float) -> float:
    return p.gpu_flops * GEMM_EFFICIENCY * rows / (rows + GEMM_HALF_M)


def _load_s(wb: WeightBytes, p: HardwareProfile, from_disk: bool) -> float:
    h2d = p.h2d_pinned * STREAM_EFFICIENCY
    rate = min(h2d, p.disk_read_bytes_per_s) if from_disk else h2d
    return wb.layer / rate


def _pass_terms(dims, wb, pl, p, tokens_per_seq: int, kv_len: int, prefill: bool) -> dict[str, float]:
    """Per-layer seconds of each resource in one pass (decode: kv_len cached tokens)."""
    b, m = pl.batch_size, pl.micro_batches
    rows = b * tokens_per_seq
    dense = 2 * wb.layer_params
    # quantized: read the packed layer, write its dense copy (at the dequant kernel's
    # rate), read that once per micro-batch
    weights_traffic = (wb.layer + m * dense) if wb.quantized else m * wb.layer
    dequant_s = dense / (p.dequant_bytes_per_s or p.hbm_bytes_per_s / 2) if wb.quantized else 0.0
    kv_layer = b * kv_len * kv_bytes_per_token_layer(dims, pl.kv_bits)
    kv_layer_bf16 = b * kv_len * kv_bytes_per_token_layer(dims, 16)  # what attention reads, whatever is stored
    act = rows * (8 * dims.hidden + 2 * dims.ffn) * 2 if prefill else 0.0
    gpu_kv = kv_layer if (not pl.kv_on_host or prefill) else 0.0
    if not pl.kv_on_host and not prefill and pl.kv_bits < 16:
        gpu_kv += 2 * kv_layer_bf16  # the layer rebuilt in bf16, then read
    cpu_attention = pl.kv_on_host and not prefill
    attn_flops = 0.0 if cpu_attention else 4 * b * tokens_per_seq * kv_len * dims.hidden * (0.5 if prefill else 1.0)
    flops = 2 * wb.layer_params * rows + attn_flops
    hbm = (weights_traffic + gpu_kv + act) / p.hbm_bytes_per_s + dequant_s
    mb_rows = rows / m
    fused = wb.quantized and pl.quant_bits == 4 and mb_rows <= FUSED_INT4_MAX_ROWS
    if fused:  # a resident layer keeps its INT4 packed: each micro-batch's fused matmul reads it
        share = next(s for r, s in FUSED_HBM_SHARE if mb_rows <= r)
        resident_hbm = m * wb.layer / (p.hbm_bytes_per_s * share) + (gpu_kv + act) / p.hbm_bytes_per_s
    return {
        "HBM": hbm,
        "HBM resident": resident_hbm if fused else hbm,
        "GPU FLOPs": flops / _gemm_flops(p, rows / m),
        "CPU KV read": (kv_layer_bf16 / (p.cpu_attention_bytes_per_s * SERVICE_ATTENTION_EFFICIENCY
                                         * CPU_QUANT_ATTENTION_RATE[pl.kv_bits]) if cpu_attention else 0.0),
        "KV to host": kv_layer / p.d2h_pinned if (pl.kv_on_host and prefill) else 0.0,
        # KV in the KV store: decode runs as a wavefront (compute_node/engine.py), so
        # with 2+ micro-batches one micro-batch's round trip overlaps another's
        # attention; one stays exposed per layer (run 29: 2 micro-batches 75.3
        # tokens/s against 71.8 with one, same machine)
        "control overhead": (RPC_OVERHEAD_S if cpu_attention else m * RPC_OVERHEAD_S) if pl.kv_on_host
        else m * LAUNCH_OVERHEAD_S,
        "host KV bytes": kv_layer if cpu_attention else 0.0,  # read from host DRAM by the attention
    }


def _pass_time(dims, wb, pl, p, t: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Seconds of one pass over all layers, and each term's total (for the binding)."""
    L = dims.num_layers
    resident, host_n, disk_n = pl.layer_counts(L)
    cpu = t["CPU KV read"]

    def layer_work(hbm: float) -> float:
        gpu = max(hbm, t["GPU FLOPs"])
        return max(gpu, cpu) + min(gpu, cpu) / pl.micro_batches if cpu else max(gpu, t["KV to host"])

    work, resident_work = layer_work(t["HBM"]), layer_work(t["HBM resident"])
    # a host-streamed layer's copy shares host DRAM with the CPU attention
    shared = (t["host KV bytes"] + wb.layer) / (p.dram_read_bytes_per_s * HOST_SHARED_SHARE) if cpu else 0.0
    over = t["control overhead"]
    host_load, disk_load = _load_s(wb, p, False), _load_s(wb, p, True)
    # layer i waits for the load of i+1; streamed layers are resident..L-1, disk ones last
    n_host = host_n - (1 if resident == 0 and host_n else 0)
    n_disk = disk_n - (1 if resident == 0 and not host_n and disk_n else 0)
    first = (host_load if host_n else disk_load) if resident == 0 and (host_n or disk_n) else 0.0
    rest = L - n_host - n_disk
    # `rest`: the resident layers, and a first streamed layer whose load `first` waited for
    total = (first + resident * resident_work + (rest - resident) * work + n_host * max(work, host_load, shared)
             + n_disk * max(work, disk_load) + L * over)
    totals = {k: v * L for k, v in t.items() if k in TERMS}
    totals["PCIe weights"] = host_n * host_load
    totals["NVMe weights"] = disk_n * disk_load
    head = pl.micro_batches * (dims.vocab * dims.hidden * 2) / p.hbm_bytes_per_s
    return total + head + STEP_OVERHEAD_S, totals


def _binding(totals: dict[str, float]) -> str:
    return max(TERMS, key=lambda k: totals.get(k, 0.0))


def _decode(dims, wb, w: Workload, pl, p) -> tuple[tuple[float, ...], float, dict[str, float]]:
    steps = w.gen_len - 1  # the prefill pass yields the first token
    if steps <= 0:
        return (), 0.0, {}
    n = min(steps, DECODE_SAMPLES)
    idx = [1 + round(k * (steps - 1) / max(n - 1, 1)) for k in range(n)]
    times, totals = [], dict.fromkeys(TERMS, 0.0)
    for s in idx:
        step_s, tt = _pass_time(dims, wb, pl, p, _pass_terms(dims, wb, pl, p, 1, w.prompt_len + s, False))
        times.append(step_s)
        for k, v in tt.items():
            totals[k] += v
    return tuple(times), sum(times) / n * steps, totals


def memory(dims: ModelDims, wb: WeightBytes, w: Workload, pl: Placement) -> tuple[dict, dict]:
    """(GPU, host) bytes needed, by item."""
    L = dims.num_layers
    resident, host_n, disk_n = pl.layer_counts(L)
    # a ring of packed slots for streamed layers; the dense copy of the layer running
    # and of the next one (dequantized, or converted from fp16, as each layer runs)
    dense = 2 * wb.layer_params
    buffers = RING_DEPTH * wb.layer + 2 * dense if host_n + disk_n else (2 * dense if wb.quantized else 0.0)
    kv = pl.batch_size * (w.prompt_len + w.gen_len) * kv_bytes_per_token_layer(dims, pl.kv_bits) * L
    mb = -(-pl.batch_size // pl.micro_batches)
    mb_tokens = mb * w.prompt_len
    # a quantized GPU cache rebuilds one layer of a micro-batch in bf16 to attend (two alive)
    rebuild = (2 * mb * (w.prompt_len + w.gen_len) * kv_bytes_per_token_layer(dims, 16)
               if not pl.kv_on_host and pl.kv_bits < 16 else 0.0)
    gpu = {
        "resident weights": resident * wb.layer + wb.other, "layer buffers": buffers,
        "KV": 0.0 if pl.kv_on_host else kv + rebuild,
        "activations": mb_tokens * max(dims.ffn, 3 * dims.hidden) * 2 * ACTIVATION_COPIES,
        "headroom": GPU_HEADROOM,
    }
    # the weight store holds neither GPU-resident layers (read once through the staging
    # slots) nor disk layers (strata/placement.py tier_plan)
    host = {"weights": wb.total - (resident + disk_n) * wb.layer,
            "staging": STAGING_SLOTS * wb.layer if resident + disk_n else 0.0,
            "KV": kv if pl.kv_on_host else 0.0, "headroom": HOST_HEADROOM}
    return gpu, host


def predict(dims: ModelDims, weight_bytes: WeightBytes, workload: Workload, placement: Placement,
            profile: HardwareProfile) -> Prediction:
    if not profile.has_gpu:
        raise ValueError(f"profile {profile.machine!r} has no GPU; the cost model is for GPU placements")
    pl, w, wb = placement, workload, weight_bytes
    pre_t = _pass_terms(dims, wb, pl, profile, w.prompt_len, w.prompt_len, True)
    prefill, pre_totals = _pass_time(dims, wb, pl, profile, pre_t)
    steps, decode, dec_totals = _decode(dims, wb, w, pl, profile)
    gpu, host = memory(dims, wb, w, pl)
    return Prediction(
        prefill_s=prefill, decode_step_s=decode / max(w.gen_len - 1, 1), decode_steps_s=steps, decode_s=decode,
        total_tokens_per_s=pl.batch_size * w.gen_len / (prefill + decode),
        gpu_bytes_needed=sum(gpu.values()), host_bytes_needed=sum(host.values()),
        prefill_binding=_binding(pre_totals), decode_binding=_binding(dec_totals) if dec_totals else "",
        gpu_breakdown=gpu, host_breakdown=host,
    )

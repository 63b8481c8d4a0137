"""Cost model: predicted prefill time, decode step times and tokens/s of a placement
on a profiled machine, modelled on how the compute node runs (compute_node/runner.py,
layer_weights.py), not on an idealised system. No torch, no grpc.

A pass over the layers is bound by the busiest of four chains that run side by side:
the GPU's work on every layer; the host-to-GPU copies of the streamed layers (a ring of
RING_DEPTH packed slots keeps them going ahead of use, at STREAM_EFFICIENCY of the
profile's pinned rate); the disk reads of the layers kept on disk (staging slots ahead
of use); and, with KV in the KV store, host DRAM shared by those copies and the CPU
attention. Resident layers are spread evenly through the model (strata/policy/placement.py
resident_layers), so the copies of streamed layers overlap resident layers' work too,
and the ring runs on from one pass into the next. Control overhead is added per layer.

GPU work of a layer: read the packed bytes, write the dequantized copy, read it once per
micro-batch, plus KV reads when KV is on the GPU; a resident INT4 layer at few rows reads
its packed bytes once per micro-batch in the fused kernel instead; or FLOPs at a GEMM
efficiency, whichever is larger. With KV in the KV store, its attention of micro-batch j
overlaps the GPU work of j-1 (a two-stage pipeline: max + min / micro_batches); the KV
store serves one micro-batch's call at a time, each with a fixed cost (KV_CALL_S) and
its KV bytes at the profile's rate for the cache's bits. With a prefill budget the
prompts join in waves, a pass each, beside the decode of those before (_budgeted).
Memory: strata/policy/memory_model.py."""

from __future__ import annotations

import dataclasses
import math

from strata.model.arch import ModelDims
from strata.policy import memory_model as mm
from strata.policy.floor import kv_bytes_per_token
from strata.policy.hardware import HardwareProfile
from strata.policy.placement import FUSED_INT4_MAX_ROWS, FUSED_KERNEL_ROWS

# The constants below are calibrated on measured runs; their runs, dates and figures are
# in BENCHMARKS.md ("Planner (issue 4): predicted against measured" and the sessions).
GIB = 1 << 30
HOST_HEADROOM = mm.HOST_HEADROOM
HOST_OS_RESERVE = mm.HOST_OS_RESERVE
RPC_OVERHEAD_S = 1.5e-3  # per layer, KV in the KV store: the Attend round trip left exposed (measured 1.4-1.6 ms)
# The KV store's own cost per Attend call, serial with its attention (request handling,
# the threads' start, the mask): what makes more micro-batches slower with KV in the KV
# store (T1, B=159: 2 micro-batches 86.4 tokens/s, 4 micro-batches 78.3 on the H100).
KV_CALL_S = 1.0e-3
# With one micro-batch nothing overlaps its round trip: the staging of q, k, v and the
# copy back are exposed too (T1: 1 micro-batch 71.8 tokens/s against 75.3 with 2 on the H100).
ONE_MICRO_BATCH_EXPOSED_S = 1.5e-3
LAUNCH_OVERHEAD_S = 0.05e-3  # per layer per micro-batch otherwise (kernel launches)
STEP_OVERHEAD_S = 1e-3  # per pass: embedding, sampling, the host sync of the tokens
GEMM_EFFICIENCY = 0.82  # of the measured 8192^3 rate, at large M: T2's and T3's prefill reached ~0.8 of it
GEMM_HALF_M = 64  # rows at which efficiency is half of GEMM_EFFICIENCY
# The KV store's attention inside the service reads KV at this share of the rate the
# profile measures for its kernel alone (tools/bench_attention.py). With the kernel's own
# thread pool (kv_store/decode_attention_pool.c) T1 on the H200 read its bf16 cache at
# 107 GB/s in the service against 105.8 alone: nothing is lost beside KV_CALL_S.
SERVICE_ATTENTION_EFFICIENCY = 1.0
# The quantized caches' speed against the bf16 one for the same tokens, for profiles that
# did not measure them (tools/bench_attention.py at T1's call shape, 16 threads: 12.47
# ms bf16, 13.55 INT8, 9.66 INT4).
CPU_QUANT_SPEED_FALLBACK = {8: 0.92, 4: 1.29}
# Streamed layers reach about 0.95 of the profile's pinned host-to-GPU copy rate with
# the packed ring (one copy per layer, dequant on the compute stream): an OPT-175B
# decode step with every layer streamed took 1.84-1.88 s for 99 GB.
STREAM_EFFICIENCY = 0.95
# Host-streamed layers while the KV store attends over host KV: the copies and the
# attention both read host DRAM, and together reached only ~0.45 of the profile's DRAM
# read rate (36-43 GB/s against 97 on the H100's host).
HOST_SHARED_SHARE = 0.45
# The fused W4A16 kernels (GPU-resident INT4 layers at up to FUSED_INT4_MAX_ROWS rows)
# read a layer's packed bytes at this share of the profile's HBM rate, by rows a call: 0.81
# and 0.51 TB/s at 16 and 32 rows (mma.sync), 1.3-1.4 TB/s at 33-64 (the wgmma kernel) on
# an H100 (2.96 TB/s); at 65-128 rows the wgmma kernel's one call takes 0.667 of two 64-row
# calls' time on an H200 (OPT-30B's four shapes, run 102: 0.371 against 0.556 ms a
# layer), so half the 64-row share over 0.667.
FUSED_HBM_SHARE = ((16, 0.27), (32, 0.17), (64, 0.45), (128, 0.34))
# The fused decode attention (compute_node/kernels/decode_attention.py) reads a GPU cache
# at this share of the profile's HBM rate, codes and scales alike, by KV bits: on the H200
# at T2's shape (128 rows, 56 heads, 544 columns) the 16-bit cache at the HBM's rate, the
# quantized kernels at 0.30 (INT8) and 0.16 (INT4) of it (BENCHMARKS.md).
GPU_ATTENTION_EFFICIENCY = {16: 1.0, 8: 0.30, 4: 0.16}
DECODE_SAMPLES = 32  # decode steps evaluated at most (evenly spaced), the rest interpolated

TERMS = ("PCIe weights", "NVMe weights", "CPU KV read", "host DRAM", "KV to host", "HBM", "GPU FLOPs",
         "control overhead")


@dataclasses.dataclass(frozen=True)
class Workload:
    """A generate call. Unlike strata.policy.floor.Workload, the batch may be left to the planner."""

    prompt_len: int
    gen_len: int
    batch_size: int | None = None


def default_kv_group(head_dim: int) -> int:
    """strata/model/kv_quant.py default_group: 64 elements where that divides head_dim, else
    the whole head_dim (the device cache's and the KV store's groups)."""
    return 64 if head_dim % 64 == 0 else head_dim


@dataclasses.dataclass(frozen=True)
class Placement:
    gpu_weight_share: float  # share of layers resident on the GPU (spread: strata/policy/placement.py)
    kv_on_host: bool  # all KV in the KV store, decode attention on its CPU
    micro_batches: int
    batch_size: int
    quant_bits: int = 4
    disk_weight_share: float = 0.0  # share of layers read from disk every pass (the last streamed ones)
    kv_bits: int = 16  # KV cache precision (8/4: group-wise codes plus an fp16 scale and min per group)
    kv_group: int = 0  # head_dim elements per KV quantization group; 0 = default_kv_group
    # prompt tokens prefilled through a layer at once; 0 = the compute node's default (a
    # micro-batch's slots x their length: memory_model.Shape.chunk_rows)
    prefill_chunk_tokens: int = 0
    # prompt tokens a pass prefills, at most (compute_node/scheduler.py); 0 = the whole
    # batch in the first pass
    prefill_tokens_per_pass: int = 0

    def layer_counts(self, num_layers: int) -> tuple[int, int, int]:
        """(resident, host-streamed, disk-streamed) layers, rounded as
        strata/policy/placement.py resident_layers and host_budget_for count them."""
        resident = round(self.gpu_weight_share * num_layers)
        disk = min(num_layers - resident, round(self.disk_weight_share * num_layers))
        return resident, num_layers - resident - disk, disk


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    """Stored bytes of a model at one quantization: every layer alike."""

    layer: float  # one layer shard as stored (packed codes + scales + norms, aligned)
    other: float  # embeddings and head (16-bit, resident)
    layer_params: float  # elements of one layer's matrices (its dense copy is 2x this)
    quantized: bool
    num_layers: int
    dummy: bool = False  # `--dummy`: resident layers made on the GPU where no layer is on disk (memory_shape)

    @property
    def total(self) -> float:
        return self.layer * self.num_layers + self.other


def weight_bytes_from_shards(sizes: dict[str, float], dims: ModelDims, quant_bits: int) -> WeightBytes:
    """From a manifest's shard sizes ('layer.N', 'embed', 'head')."""
    layers = [v for k, v in sizes.items() if k.startswith("layer.")]
    other = sum(v for k, v in sizes.items() if not k.startswith("layer."))
    return WeightBytes(max(layers), other, layer_params(dims), quant_bits < 16, len(layers))


def estimate_weight_bytes(dims: ModelDims, quant_bits: int, group_size: int = 64, dummy: bool = False) -> WeightBytes:
    """Closed form of the converter's layout (within a percent of the manifest). `dummy`:
    weights the compute node makes on the GPU itself (`--dummy`; a buffer per part, as a
    layer read from files, so they hold no more than its shard)."""
    p = layer_params(dims)
    per = quant_bits / 8 + 4 / group_size if quant_bits < 16 else 2.0
    small = (9 * dims.hidden + dims.ffn) * 2  # biases and layer norms, fp16
    other = ((1 if dims.tied_head else 2) * dims.vocab + dims.position_rows + 2) * dims.hidden * 2
    return WeightBytes(p * per + small, other, p, quant_bits < 16, dims.num_layers, dummy)


def layer_params(d: ModelDims) -> float:
    return d.layer_params


def kv_bytes_per_token_layer(d: ModelDims, kv_bits: int = 16, group: int = 0) -> float:
    """Keys and values of one token in one layer, as cached: 16-bit, or INT8/INT4 codes
    plus an fp16 scale and min per group of `group` elements (0: default_kv_group) of
    head_dim (strata/model/kv_quant.py KVFormat.vector_bytes)."""
    if kv_bits == 16:
        return float(kv_bytes_per_token(d) / d.num_layers)
    g = group or default_kv_group(d.head_dim)
    vector = d.head_dim * kv_bits / 8 + 4 * (d.head_dim // g)
    return 2.0 * d.kv_heads * vector


@dataclasses.dataclass(frozen=True)
class Prediction:
    prefill_s: float
    decode_step_s: float  # mean over the decode steps
    decode_steps_s: tuple[float, ...]  # sampled steps (first to last)
    decode_s: float
    total_tokens_per_s: float
    gpu_bytes_needed: float  # device bytes the placement asks for, margin included (strata/policy/memory_model.py)
    host_bytes_needed: float
    prefill_binding: str
    decode_binding: str
    gpu_breakdown: dict
    host_breakdown: dict
    gpu_peak_allocated: float = 0.0  # PyTorch's allocated peak: what the bench measures as peak_gpu_bytes

    def fits(self, profile: HardwareProfile) -> bool:
        return self.gpu_bytes_needed <= profile.gpu_bytes and self.host_bytes_needed <= profile.host_bytes


def _gemm_flops(p: HardwareProfile, rows: float) -> float:
    return p.gpu_flops * GEMM_EFFICIENCY * rows / (rows + GEMM_HALF_M)


def cpu_attention_s(p: HardwareProfile, kv_bits: int, stored_bytes: float, bf16_bytes: float) -> float:
    """Seconds of the KV store's kernel alone over a cache holding `stored_bytes` at
    `kv_bits` (`bf16_bytes` in bf16): at the profile's rate for those bits, else the bf16
    rate scaled by CPU_QUANT_SPEED_FALLBACK."""
    rate = p.cpu_attention_rate(kv_bits)
    if rate:
        return stored_bytes / rate
    return bf16_bytes / (p.cpu_attention_bytes_per_s * CPU_QUANT_SPEED_FALLBACK.get(kv_bits, 1.0))


def _load_s(wb: WeightBytes, p: HardwareProfile) -> float:
    return wb.layer / (p.h2d_pinned * STREAM_EFFICIENCY)


def _pass_terms(dims, wb, pl, p, tokens_per_seq: int, kv_len: int, prefill: bool) -> dict[str, float]:
    """Per-layer seconds of each resource in one pass (decode: kv_len cached tokens)."""
    b, m = pl.batch_size, pl.micro_batches
    rows = b * tokens_per_seq
    dense = 2 * wb.layer_params
    # quantized: read the packed layer, write its dense copy (at the dequant kernel's
    # rate), read that once per micro-batch
    weights_traffic = (wb.layer + m * dense) if wb.quantized else m * wb.layer
    dequant_s = dense / (p.dequant_bytes_per_s or p.hbm_bytes_per_s / 2) if wb.quantized else 0.0
    kv_layer = b * kv_len * kv_bytes_per_token_layer(dims, pl.kv_bits, pl.kv_group)
    kv_layer_bf16 = b * kv_len * kv_bytes_per_token_layer(dims, 16)  # the KV store's fallback rate is bf16's
    act = rows * (8 * dims.hidden + 2 * dims.ffn) * 2 if prefill else 0.0
    gpu_kv = kv_layer if (not pl.kv_on_host or prefill) else 0.0
    if not pl.kv_on_host and not prefill:  # the fused decode attention reads the cache where it lies
        gpu_kv /= GPU_ATTENTION_EFFICIENCY[pl.kv_bits]
    cpu_attention = pl.kv_on_host and not prefill
    attn_flops = 0.0 if cpu_attention else 4 * b * tokens_per_seq * kv_len * dims.hidden * (0.5 if prefill else 1.0)
    flops = 2 * wb.layer_params * rows + attn_flops
    hbm = (weights_traffic + gpu_kv + act) / p.hbm_bytes_per_s + dequant_s
    mb_rows = rows / m
    fused = wb.quantized and pl.quant_bits == 4 and mb_rows <= FUSED_INT4_MAX_ROWS
    if fused:  # a resident layer keeps its INT4 packed: each micro-batch's fused matmuls read it, once a chunk
        chunks = math.ceil(mb_rows / FUSED_KERNEL_ROWS)
        share = next(s for r, s in FUSED_HBM_SHARE if mb_rows / chunks <= r)
        resident_hbm = m * chunks * wb.layer / (p.hbm_bytes_per_s * share) + (gpu_kv + act) / p.hbm_bytes_per_s
    return {
        "HBM": hbm,
        "HBM resident": resident_hbm if fused else hbm,
        "GPU FLOPs": flops / _gemm_flops(p, rows / m),
        "CPU KV read": (cpu_attention_s(p, pl.kv_bits, kv_layer, kv_layer_bf16) / SERVICE_ATTENTION_EFFICIENCY
                        if cpu_attention else 0.0),
        "KV store calls": m * KV_CALL_S if cpu_attention else 0.0,  # one micro-batch's call at a time
        "KV to host": kv_layer / p.d2h_pinned if (pl.kv_on_host and prefill) else 0.0,
        # KV in the KV store: decode runs as a wavefront (compute_node/runner.py), so
        # with 2+ micro-batches one micro-batch's round trip overlaps another's
        # attention; one stays exposed per layer
        "control overhead": ((RPC_OVERHEAD_S + (ONE_MICRO_BATCH_EXPOSED_S if m == 1 else 0.0)) if cpu_attention
                             else m * RPC_OVERHEAD_S) if pl.kv_on_host else m * LAUNCH_OVERHEAD_S,
        "host KV bytes": kv_layer if cpu_attention else 0.0,  # read from host DRAM by the attention
    }


def _pass_time(dims, wb, pl, p, t: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Seconds of one pass over all layers, and each term's total (for the binding)."""
    L = dims.num_layers
    resident, host_n, disk_n = pl.layer_counts(L)
    cpu = t["CPU KV read"] + t["KV store calls"]

    def layer_work(hbm: float) -> float:
        gpu = max(hbm, t["GPU FLOPs"])
        return max(gpu, cpu) + min(gpu, cpu) / pl.micro_batches if cpu else max(gpu, t["KV to host"])

    load = _load_s(wb, p)
    chains = {
        "GPU": resident * layer_work(t["HBM resident"]) + (host_n + disk_n) * layer_work(t["HBM"]),
        "PCIe weights": (host_n + disk_n) * load,
        "NVMe weights": disk_n * wb.layer / p.disk_read_bytes_per_s if disk_n else 0.0,
        # host-streamed layers' copies and the KV store's attention share host DRAM
        "host DRAM": ((host_n * wb.layer + L * t["host KV bytes"]) / (p.dram_read_bytes_per_s * HOST_SHARED_SHARE)
                      if cpu and host_n else 0.0),
    }
    total = max(chains.values()) + L * t["control overhead"]
    totals = {k: v * L for k, v in t.items() if k in TERMS}
    totals["control overhead"] += L * t["KV store calls"]
    totals.update({k: v for k, v in chains.items() if k != "GPU"})
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


def _budgeted(dims, wb, w: Workload, pl, p) -> tuple[float, float]:
    """(first pass, the passes after it) in seconds with a prefill budget: prompts join a
    wave of max(1, budget // prompt_len) a pass, and each pass takes its wave's prefill
    and the running sequences' decode step, side by side with KV in the KV store (its
    attention of one runs while the GPU prefills the other: compute_node/runner.py), one
    after the other with KV on the GPU."""
    wave = max(1, pl.prefill_tokens_per_pass // max(w.prompt_len, 1))
    waiting, running, passes = pl.batch_size, [], []  # running: each sequence's tokens so far
    while waiting or running:
        n = min(wave, waiting)
        waiting -= n
        pre = dec = 0.0
        if n:
            at = dataclasses.replace(pl, batch_size=n)
            pre = _pass_time(dims, wb, at, p, _pass_terms(dims, wb, at, p, w.prompt_len, w.prompt_len, True))[0]
        if running:
            at = dataclasses.replace(pl, batch_size=len(running))
            kv_len = w.prompt_len + round(sum(running) / len(running))
            dec = _pass_time(dims, wb, at, p, _pass_terms(dims, wb, at, p, 1, kv_len, False))[0]
        passes.append(max(pre, dec) if pl.kv_on_host else pre + dec)
        # a token each, the joining ones their first from the prefill; done at gen_len
        running = [g for g in [g + 1 for g in running] + [1] * n if g < w.gen_len]
    return passes[0], sum(passes[1:])


def memory_shape(dims: ModelDims, wb: WeightBytes, w: Workload, pl: Placement) -> mm.Shape:
    resident, host_n, disk_n = pl.layer_counts(dims.num_layers)
    # `--dummy` resident layers (and embeddings, head) are made on the GPU (no staging
    # slots, not in the host tier) only where no
    # layer is on disk: with a disk tier the bench runs a dummy directory (deploy/bench.py
    # _offload_dir), whose resident layers are read once through the staging slots, like
    # a converted model's
    made_on_gpu = wb.dummy and not disk_n
    return mm.Shape(
        batch=pl.batch_size, micro_batches=pl.micro_batches, prompt_len=w.prompt_len, gen_len=w.gen_len,
        resident=resident, host_layers=host_n, disk_layers=disk_n, kv_on_host=pl.kv_on_host, kv_bits=pl.kv_bits,
        kv_token_layer_bytes=kv_bytes_per_token_layer(dims, pl.kv_bits, pl.kv_group),
        quant_bits=pl.quant_bits, layer_bytes=wb.layer,
        other_bytes=wb.other, dense_layer_bytes=2 * wb.layer_params,
        resident_from_files=not made_on_gpu, prefill_chunk_tokens=pl.prefill_chunk_tokens,
    )


def gpu_memory(dims: ModelDims, wb: WeightBytes, w: Workload, pl: Placement, gpu_bytes: float) -> mm.GpuMemory:
    """The placement's GPU memory on a device of `gpu_bytes` (the margin is a share of it)."""
    return mm.gpu(dims, memory_shape(dims, wb, w, pl), gpu_bytes)


def memory(dims: ModelDims, wb: WeightBytes, w: Workload, pl: Placement, gpu_bytes: float) -> tuple[dict, dict]:
    """(GPU, host) bytes needed, by item (strata/policy/memory_model.py); each sums to what must fit."""
    shape = memory_shape(dims, wb, w, pl)
    return mm.gpu(dims, shape, gpu_bytes).breakdown(), mm.host(shape, wb.total)


def fits(dims: ModelDims, wb: WeightBytes, w: Workload, pl: Placement, profile: HardwareProfile,
         gpu: bool = True, host: bool = True) -> bool:
    """Whether the placement fits the profile's GPU and host memory (`gpu`/`host`: check
    that one)."""
    shape = memory_shape(dims, wb, w, pl)
    return ((not gpu or mm.gpu(dims, shape, profile.gpu_bytes).total <= profile.gpu_bytes)
            and (not host or sum(mm.host(shape, wb.total).values()) <= profile.host_bytes))


def predict(dims: ModelDims, weight_bytes: WeightBytes, workload: Workload, placement: Placement,
            profile: HardwareProfile) -> Prediction:
    if not profile.has_gpu:
        raise ValueError(f"profile {profile.machine!r} has no GPU; the cost model is for GPU placements")
    pl, w, wb = placement, workload, weight_bytes
    pre_t = _pass_terms(dims, wb, pl, profile, w.prompt_len, w.prompt_len, True)
    prefill, pre_totals = _pass_time(dims, wb, pl, profile, pre_t)
    steps, decode, dec_totals = _decode(dims, wb, w, pl, profile)
    if pl.prefill_tokens_per_pass and pl.prefill_tokens_per_pass < pl.batch_size * w.prompt_len:
        prefill, decode = _budgeted(dims, wb, w, pl, profile)  # the bench's prefill_s is its first pass
    shape = memory_shape(dims, wb, w, pl)
    gpu = mm.gpu(dims, shape, profile.gpu_bytes)
    host = mm.host(shape, wb.total)
    return Prediction(
        prefill_s=prefill, decode_step_s=decode / max(w.gen_len - 1, 1), decode_steps_s=steps, decode_s=decode,
        total_tokens_per_s=pl.batch_size * w.gen_len / (prefill + decode),
        gpu_bytes_needed=gpu.total, host_bytes_needed=sum(host.values()),
        prefill_binding=_binding(pre_totals), decode_binding=_binding(dec_totals) if dec_totals else "",
        gpu_breakdown=gpu.breakdown(), host_breakdown=host, gpu_peak_allocated=gpu.peak_allocated,
    )

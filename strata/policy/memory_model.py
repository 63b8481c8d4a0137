"""GPU and host memory of a placement, item by item, as the engine allocates it
(compute_node/): what must fit for a plan to run. No torch, no grpc.

GPU. A plan fits when `GpuMemory.total` <= the device's bytes. Four kinds of bytes:
- held for the whole run: resident layers (packed) with embeddings and head, the ring of
  packed slots streamed layers pass through (placement.RING_DEPTH), the KV cache of the
  planner's batch (slots x (prompt_len + gen_len) tokens, allocated once; the compute
  node keeps the last request's caches only for a request of the same shapes, which
  renews them in place, so they are never held twice);
- the working set of the larger of two phases:
    prefill: every joining prompt's hidden states; the dense copies of a layer
      (`dense_copies`); one prefill chunk's layer activations (q, k, v,
      attention output, residuals, the MLP's intermediates: one ffn-wide tensor where
      relu is fused into the matmul, two for another plain MLP, three gated); quantizing
      its keys and values where a quantized cache is on the GPU; the logits;
    decode: the dense copies where a layer is dequantized (streamed, or more rows than
      the fused INT4 kernel takes), the fused decode attention's partial outputs (it
      reads a GPU cache where it lies, quantized or not), the logits.
  Held + the larger phase is PyTorch's allocated peak (torch.cuda.max_memory_allocated:
  the bench's peak_gpu_bytes), `GpuMemory.peak_allocated`;
- outside that peak: the private pools of the decode graphs the compute node keeps
  for the life of the server (compute_node/slot_graphs.py: one decode step's working set
  per group of slots and bucket of rows: 1, 2, 4, ... up to the group's slots); the CUDA
  context and the kernels' module images; the caching allocator's reserve (cached blocks
  a later size cannot reuse);
- the safety margin: GPU_MARGIN_SHARE of the device plus GPU_MARGIN_BYTES, the one
  place it is set.

Host: the weight store's tier (every layer neither resident on the GPU nor on disk,
embeddings and head unless dummy ones are made on the GPU), staging slots where some layer is read from disk, the KV store's
cache with its spare, HOST_HEADROOM for the processes themselves, and HOST_OS_RESERVE
left to the operating system (a profile's host_bytes is the machine's whole RAM).
"""

from __future__ import annotations

import dataclasses

from strata.model.arch import ModelDims
from strata.policy.placement import FUSED_INT4_MAX_ROWS, RING_DEPTH, STAGING_SLOTS

GIB = 1 << 30
# Column splits of the fused decode attention at the row counts that matter for memory
# (compute_node/kernels/decode_attention.py: about two programs per SM)
ATTENTION_SPLITS = 2
# The safety margin, on top of everything modelled below: 6% of the device plus 0.5 GiB.
GPU_MARGIN_SHARE = 0.06
GPU_MARGIN_BYTES = GIB // 2
# Device memory outside PyTorch's allocator: the CUDA context, cuBLAS/cuDNN handles and the
# module images of the kernels the compute node loads (Triton, the nvcc-built W4A16).
CUDA_CONTEXT_BYTES = 1 * GIB
# Cached blocks the allocator holds that a later request of another size cannot reuse
# (reserved - allocated), as a share of the peak phase's working set: what is freed and
# allocated again layer after layer.
ALLOCATOR_RESERVE_SHARE = 0.10
# Host memory of the three processes themselves beyond the tier and the KV cache (CUDA
# and torch runtimes, exchange buffers), and the spare the KV store's ledger keeps: 12.2
# GiB at T1, B=150, with 104.9 GiB of KV; 2.3 GB with no KV store (H100 host).
HOST_HEADROOM = 7 * GIB
# Host memory left to the operating system beyond the processes (the kernel, its page
# tables over the mapped and pinned tiers, the page cache the disk tier reads through,
# the machine's own daemons): a profile's host_bytes is the whole RAM. T1 at B=159 on
# the H200 left 2.1 of its 125.9 GiB (BENCHMARKS.md).
HOST_OS_RESERVE = 2 * GIB
KV_STORE_SPARE_SHARE = 0.05
# Quantizing a key or value element into a GPU cache (strata/model/quant.py): a contiguous bf16
# copy, float32 groups, the shifted and the scaled values alive at once.
QUANTIZE_BYTES_PER_ELEMENT = 14


@dataclasses.dataclass(frozen=True)
class GpuMemory:
    """Bytes by item: `held` all run, each phase's working set, and `outside` PyTorch's
    allocated peak (graph pools, context, allocator reserve, margin)."""

    held: dict[str, float]
    prefill: dict[str, float]
    decode: dict[str, float]
    outside: dict[str, float]

    @property
    def peak_phase(self) -> str:
        return "prefill" if sum(self.prefill.values()) >= sum(self.decode.values()) else "decode"

    @property
    def peak_working_set(self) -> dict[str, float]:
        return self.prefill if self.peak_phase == "prefill" else self.decode

    @property
    def peak_allocated(self) -> float:
        """What torch.cuda.max_memory_allocated should read at the run's peak."""
        return sum(self.held.values()) + sum(self.peak_working_set.values())

    @property
    def total(self) -> float:
        """Device bytes the plan asks for, margin included."""
        return self.peak_allocated + sum(self.outside.values())

    def breakdown(self) -> dict[str, float]:
        """Every item that adds up to `total`: the peak phase's items named by it."""
        phase = self.peak_phase
        return {**self.held, **{f"{phase}: {k}": v for k, v in self.peak_working_set.items()}, **self.outside}


def margin(gpu_bytes: float) -> float:
    return GPU_MARGIN_SHARE * gpu_bytes + GPU_MARGIN_BYTES


def _mlp_width(d: ModelDims) -> float:
    """ffn-wide tensors alive at the MLP's peak, in hidden-sized units besides: gated
    act(gate), up and their product; plain relu fused into fc1 (compute_node/model.py
    _linear_relu) with fc2's output; another plain activation, its input and output."""
    if d.mlp_matrices == 3:
        return 3 * d.ffn
    return d.ffn + d.hidden if d.mlp_activation == "relu" else 2 * d.ffn


def activation_bytes_per_row(d: ModelDims, itemsize: int = 2) -> float:
    """One token's activations at a layer's peak (the MLP): q, k, v (still bound in the
    engine's loop), the attention output, the out-projection, the residual, the new
    hidden state and its norm, and the MLP's intermediates."""
    q, kv = d.num_heads * d.head_dim, d.kv_heads * d.head_dim
    return itemsize * (q + 2 * kv + q + 4 * d.hidden + _mlp_width(d))


def quantize_bytes_per_row(d: ModelDims, itemsize: int = 2) -> float:
    """One token while its keys and values are quantized into a GPU cache: q, k, v and the
    hidden state alive, plus the quantizer's temporaries over one of K or V."""
    q, kv = d.num_heads * d.head_dim, d.kv_heads * d.head_dim
    return itemsize * (q + 2 * kv + d.hidden) + QUANTIZE_BYTES_PER_ELEMENT * kv


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the memory model needs of a placement and workload (cost_model builds it)."""

    batch: int
    micro_batches: int
    prompt_len: int
    gen_len: int
    resident: int  # layers resident on the GPU
    host_layers: int  # streamed from the host tier
    disk_layers: int  # streamed from disk
    kv_on_host: bool
    kv_bits: int
    kv_token_layer_bytes: float  # one token of one layer as cached (keys and values)
    quant_bits: int
    layer_bytes: float  # one layer's shard
    other_bytes: float  # embeddings and head
    dense_layer_bytes: float  # one layer's matmul weights in the compute dtype
    # resident layers read once through the staging slots, embeddings and head in the host
    # tier (not --dummy, which makes them on the GPU)
    resident_from_files: bool = True
    prefill_chunk_tokens: int = 0  # the placement's chunk; 0 = the compute node's default

    @property
    def streamed(self) -> int:
        return self.host_layers + self.disk_layers

    @property
    def mb_rows(self) -> int:
        """Sequences of the largest micro-batch."""
        return -(-self.batch // self.micro_batches)

    @property
    def chunk_rows(self) -> int:
        """Prompt tokens through a layer at once: the compute node packs whole prompts into
        chunks of up to the placement's prefill_chunk_tokens, by default a group's slots x
        (prompt + generation) tokens (compute_node/runner.py)."""
        tokens = self.prefill_chunk_tokens or self.mb_rows * (self.prompt_len + self.gen_len)
        prompts = max(1, tokens // max(self.prompt_len, 1))
        return min(prompts, self.batch) * self.prompt_len

    @property
    def fused_decode(self) -> bool:
        """Resident INT4 layers run the fused kernel on their packed bytes at decode."""
        return self.quant_bits == 4 and self.mb_rows <= FUSED_INT4_MAX_ROWS

    @property
    def decode_graphs(self) -> bool:
        """compute_node/runner.py: every layer resident, the KV cache on the GPU."""
        return self.streamed == 0 and not self.kv_on_host


def dense_copies(s: Shape) -> int:
    """Dense layer copies alive at once (compute_node/runner.py): two where the KV store
    attends (layer i-1's weights wait for its attention while layer i is dequantized),
    else one (each layer finishes before the next is asked for)."""
    return 2 if s.kv_on_host else 1


def _decode_step(d: ModelDims, s: Shape, rows: int) -> dict[str, float]:
    """One decode step's working set over `rows` sequences (a group's, or a graph's bucket)."""
    out = {}
    if s.streamed or not (s.quant_bits == 4 and rows <= FUSED_INT4_MAX_ROWS):
        out["dense layer copies"] = dense_copies(s) * s.dense_layer_bytes
    if not s.kv_on_host:  # float32 partial outputs, max and sum of up to ATTENTION_SPLITS column splits
        out["attention partials"] = ATTENTION_SPLITS * rows * d.num_heads * (d.head_dim + 2) * 4
    out["activations"] = rows * activation_bytes_per_row(d)
    out["logits"] = rows * d.vocab * 6  # compute dtype, then float32 to sample
    return out


def graph_buckets(slots: int) -> list[int]:
    """The row counts a group's decode graphs are captured for (compute_node/slot_graphs.py
    bucket): powers of two below its slots, and its slots."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def gpu(d: ModelDims, s: Shape, gpu_bytes: float) -> GpuMemory:
    L = d.num_layers
    held = {
        "resident weights": s.resident * s.layer_bytes + s.other_bytes,
        "layer ring": RING_DEPTH * s.layer_bytes if s.streamed else 0.0,
        "KV": 0.0 if s.kv_on_host else s.batch * (s.prompt_len + s.gen_len) * s.kv_token_layer_bytes * L,
    }
    rows = s.chunk_rows
    per_row = activation_bytes_per_row(d)
    if not s.kv_on_host and s.kv_bits < 16:
        per_row = max(per_row, quantize_bytes_per_row(d))
    prefill = {
        "hidden states": s.batch * s.prompt_len * d.hidden * 2,
        "dense layer copies": dense_copies(s) * s.dense_layer_bytes,
        "activations": rows * per_row,
        "logits": s.batch * d.vocab * 6,
    }
    decode = _decode_step(d, s, s.mb_rows)
    decode["logits"] = s.batch * d.vocab * 6
    peak = max(sum(prefill.values()), sum(decode.values()))
    outside = {}
    if s.decode_graphs:  # a private pool per group and bucket of rows
        outside["decode graph pools"] = s.micro_batches * sum(
            sum(_decode_step(d, s, b).values()) for b in graph_buckets(s.mb_rows))
    outside["CUDA context"] = CUDA_CONTEXT_BYTES
    outside["allocator reserve"] = ALLOCATOR_RESERVE_SHARE * peak
    outside["margin"] = margin(gpu_bytes)
    return GpuMemory({k: v for k, v in held.items() if v}, prefill, decode, outside)


def host(s: Shape, total_weight_bytes: float) -> dict[str, float]:
    """Host bytes by item. The weight store holds neither GPU-resident layers (read once
    through the staging slots; dummy ones are made on the GPU) nor disk layers
    (strata/policy/placement.py tier_plan), nor the embeddings and head where dummy ones
    are made on the GPU."""
    kv = s.batch * (s.prompt_len + s.gen_len) * s.kv_token_layer_bytes * _layers(s) if s.kv_on_host else 0.0
    return {
        "weights": total_weight_bytes - (s.resident + s.disk_layers) * s.layer_bytes
        - (0.0 if s.resident_from_files else s.other_bytes),
        "staging": STAGING_SLOTS * s.layer_bytes if s.disk_layers or (s.resident and s.resident_from_files) else 0.0,
        "KV": kv,
        "KV store spare": KV_STORE_SPARE_SHARE * kv,
        "headroom": HOST_HEADROOM,
        "OS reserve": HOST_OS_RESERVE,
    }


def _layers(s: Shape) -> int:
    return s.resident + s.host_layers + s.disk_layers

"""The floor model of DESIGN.md "Performance model": the fastest a placement can run
on a machine, from bytes over bandwidths and FLOPs over peak. Torch-free; the cost
model of the planner grows from here."""

from __future__ import annotations

import dataclasses

from strata.model.arch import ModelDims


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The limits DESIGN.md measured on its benchmark machine (nvidia-h100-x1)."""

    name: str = "nvidia-h100-x1"
    gpu_flops: float = 792e12  # bf16 matmul
    hbm_bytes_per_s: float = 3.0e12  # device-to-device copy, read+write counted
    pcie_bytes_per_s: float = 54.7e9  # pinned host -> GPU
    dram_bytes_per_s: float = 98e9  # host DRAM read, 16 threads
    disk_bytes_per_s: float = 1.2e9
    gpu_bytes: float = 80e9
    host_bytes: float = 125 * 2**30


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int
    prompt_len: int
    gen_len: int


@dataclasses.dataclass(frozen=True)
class Placement:
    weight_bytes: float  # all weights as stored (INT4 packed + scales)
    gpu_weight_share: float  # the rest streams from the host tier every pass
    kv_on_host: bool
    kv_bytes_per_token: float  # all layers, keys and values
    disk_bytes_per_pass: float = 0.0  # of the streamed weights, those read from disk every pass


def params(d: ModelDims) -> float:
    """Matmul parameters (FLOPs per token = 2x this)."""
    return d.num_layers * d.layer_params + d.vocab * d.hidden


def kv_bytes_per_token(d: ModelDims, itemsize: int = 2) -> int:
    return 2 * d.num_layers * d.kv_heads * d.head_dim * itemsize


def floor(d: ModelDims, w: Workload, p: Placement, hw: Hardware = Hardware()) -> dict:
    """Prefill and decode floors (seconds) and the floor throughput (tokens/s)."""
    host_weights = p.weight_bytes * (1 - p.gpu_weight_share)  # crosses PCIe every pass (disk ones too)
    gpu_weights = p.weight_bytes * p.gpu_weight_share
    flops_token = 2 * params(d)
    stream = max(host_weights / hw.pcie_bytes_per_s, p.disk_bytes_per_pass / hw.disk_bytes_per_s)
    prefill = max(flops_token * w.batch * w.prompt_len / hw.gpu_flops, stream)
    decode = 0.0
    for s in range(1, w.gen_len):  # the prefill step yields the first token
        kv = w.batch * (w.prompt_len + s) * p.kv_bytes_per_token
        decode += max(
            stream,
            kv / hw.dram_bytes_per_s if p.kv_on_host else 0.0,
            (gpu_weights + (0.0 if p.kv_on_host else kv)) / hw.hbm_bytes_per_s,
            flops_token * w.batch / hw.gpu_flops,
        )
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "tokens_per_s": w.batch * w.gen_len / (prefill + decode),
    }

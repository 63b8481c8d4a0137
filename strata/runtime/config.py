"""Frozen configs, one per service, built by keyword and passed explicitly.
Facts learned at run time (the manifest, the hardware) live elsewhere."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: strata.runtime imports nothing of strata.policy, which builds on it
    from strata.policy.run_plan import RunPlan


@dataclasses.dataclass(frozen=True)
class WeightStoreConfig:
    model_dir: str
    listen: str  # "unix:///path" or "127.0.0.1:port"
    session: str  # shared-memory name prefix owner (see strata/transport/shm.py)
    reader_threads: int = 8
    preload: bool = True  # load every shard into the host tier at start
    verify: bool = True  # sha256 on first read of each shard
    dummy: str = ""  # bench: "<model shape name>" makes random packed weights in memory, no files
    dummy_bits: int = 4
    dummy_group_size: int = 64
    # Share of layers the compute node keeps resident on the GPU (strata/policy/placement.py):
    # dummy ones are made there; with a disk tier they are read once from disk, not held.
    gpu_share: float = 0.0
    host_budget_bytes: int = 0  # 0 = no limit; else host tier + staging slots fit in it, other layers on disk
    disk_offload: bool = False  # streamed layers on disk (cached in the host tier within the budget)
    # The run plan (strata/policy/run_plan.py), where the launcher gives one: its resident and disk
    # layers replace gpu_share, host_budget_bytes and disk_offload
    plan: RunPlan | None = None


@dataclasses.dataclass(frozen=True)
class KVStoreConfig:
    listen: str
    session: str
    capacity_bytes: int = 8 << 30  # host memory the cache may use
    threads: int = 0  # CPU threads for attention; 0 = every core
    preallocate: bool = True  # fault in the whole capacity at start (an arena), not per request
    attention: str = "native"  # bfloat16 decode attention: "native" (kv_store/native.py; SDPA if it cannot build) or "sdpa"
    plan: RunPlan | None = None  # the run plan, where the launcher gives one: its KV bits and group are the only ones taken


@dataclasses.dataclass(frozen=True)
class ComputeNodeConfig:
    listen: str
    session: str
    weight_store: str  # address
    kv_store: str  # address
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = ""  # compute dtype; "" = float32 on cpu, bfloat16 on cuda
    kv_offload: bool = False  # KV cache in the KV store, attention on its CPU
    kv_bits: int = 16  # KV cache precision (device or KV store): 16 (compute dtype), 8 or 4 (group-wise on head_dim)
    rpc_timeout_s: float = 30.0  # every call to a peer fails after this, never hangs
    gpu_weight_share: float = 1.0  # share of layers kept resident on the device (issue 3)
    micro_batches: int = 1
    exchange_bytes: int = 64 << 20  # shared-memory region for tensors sent to the KV store
    decode_graphs: bool = True  # replay decode steps as CUDA graphs where they allow it
    # What one Generate request may be (compute_node/validation.py RequestLimits); 0 = derived from the model
    max_request_bytes: int = 64 << 20  # also the gRPC receive limit
    max_prompt_tokens: int = 0  # 0 = the tokens a sequence may hold, less one
    max_prompt_chars: int = 0  # 0 = 16 characters per allowed prompt token
    # Who may call (strata/transport/rpc.py): an API key ("" = anyone), TLS certificate and key files
    api_key: str = dataclasses.field(default="", repr=False)
    tls_cert: str = ""
    tls_key: str = ""
    control_listen: str = ""  # a second, local listener (no TLS) for the launcher's health checks
    max_batch: int = 16  # sequence slots of the running batch (the planner's batch)
    max_seq_len: int = 0  # tokens a slot holds (prompt + generated); 0 = 2048 or the model's positions
    max_queue: int = 0  # sequences waiting for a slot, at most; 0 = max(64, 8 x max_batch)
    prefill_chunk_tokens: int = 0  # prompt tokens through a layer at once; 0 = a group's slots x max_seq_len
    prefill_tokens_per_pass: int = 0  # prompt tokens a pass prefills, at most; 0 = no bound
    # The run plan (strata/policy/run_plan.py), where the launcher gives one: it replaces the placement
    # fields above (dtype, kv_offload, kv_bits, gpu_weight_share, micro_batches, decode_graphs,
    # max_batch, max_seq_len, max_queue, prefill_tokens_per_pass), which are for direct use
    plan: RunPlan | None = None

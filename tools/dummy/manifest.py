"""`--dummy` weights for benchmarks: a model shape's manifest made without a
checkpoint, so an OPT-175B run starts in seconds (no disk, no download).

The manifest is the one the converter would write for that checkpoint (same shards,
names, quantization policy and offsets); only the sha256 fields are empty. The
random numbers themselves are written by tools/dummy/weights.py, into the host tier
or, for GPU-resident layers, straight into device memory."""

from __future__ import annotations

import torch

from strata.model import arch, manifest, quant, shapes
from tools.convert import make_policy, plan_shards

def _meta_tensors(config: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF tensor names and shapes of a config, from a model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}


def dummy_manifest(name: str, bits: int, group_size: int) -> manifest.Manifest:
    config = shapes.config_for(name)
    spec = arch.spec_for(config)
    logical = "bfloat16" if config.get("torch_dtype") == "bfloat16" else "float16"
    tensors = _meta_tensors(config)
    policy = make_policy(spec.linears, bits, group_size, None, False)
    shards = {}
    for shard, members in plan_shards(spec, config, list(tensors)).items():
        pos, entries = 0, {}
        for hf_name, local in members:
            shape = tensors[hf_name][0]
            q = policy.spec_for(hf_name, local, shape) if shard.startswith("layer.") else None
            layout = [("data", logical, shape)] if q is None else [
                ("data", "uint8", quant.packed_shape(shape, q.bits)),
                ("scale", "float16", (shape[0], shape[1] // q.group_size)),
                ("min", "float16", (shape[0], shape[1] // q.group_size)),
            ]
            parts = {}
            for pname, dtype, pshape in layout:
                pos = manifest.align(pos)
                nbytes = torch.Size(pshape).numel() * (1 if dtype == "uint8" else 2)
                parts[pname] = manifest.Part(pos, nbytes, dtype, tuple(pshape), sha256="")
                pos += nbytes
            entries[local] = manifest.TensorEntry(tuple(shape), logical, q, parts)
        shards[shard] = manifest.Shard(shard, manifest.shard_file(shard), manifest.align(pos), entries)
    return manifest.Manifest(spec.name, config, shards,
                             {"bits": bits, "group_size": group_size, "ds_config": None, "dummy": name})

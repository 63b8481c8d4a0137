"""A converted model directory written directly, without the converter: fp16 random
tensors in a few shards, every part 4 KiB aligned, sha256 in the manifest."""

import hashlib
import pathlib

import torch

from strata.model.manifest import Manifest, Part, Shard, TensorEntry, align, shard_file

SHAPES = {"embed": [(64, 48)], "layer.0": [(96, 48), (48,)], "layer.1": [(96, 48), (48,)], "head": [(48,)]}


def write_model(directory: pathlib.Path, seed: int = 0) -> Manifest:
    """A converted model directory written directly: fp16 random tensors, every part
    4 KiB aligned, sha256 in the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards = {}
    for name, shapes in SHAPES.items():
        buf, tensors = bytearray(), {}
        for i, shape in enumerate(shapes):
            data = torch.randn(shape, generator=gen).half().numpy().tobytes()
            buf += bytes(align(len(buf)) - len(buf))
            part = Part(len(buf), len(data), "float16", shape, hashlib.sha256(data).hexdigest())
            tensors[f"{name}.t{i}"] = TensorEntry(shape, "float16", None, {"data": part})
            buf += data
        buf += bytes(align(len(buf)) - len(buf))
        (directory / shard_file(name)).write_bytes(bytes(buf))
        shards[name] = Shard(name, shard_file(name), len(buf), tensors)
    manifest = Manifest("opt", {"hidden_size": 48}, shards, {"default_bits": 16})
    manifest.save(directory)
    return manifest

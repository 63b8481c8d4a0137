"""Strata shard files: how `tools.convert` lays tensors out in them, and what that costs.

A shard file holds its tensors' parts one after another, every part 4 KiB aligned
(`manifest.align`, zeros between parts) and hashed (sha256), the file padded to a
multiple of the alignment. A tensor is one "data" part stored 16-bit (floats; other
dtypes as they are), or, quantized, its "data", "scale" and "min" parts (`quant.quantize`).
Each file is written under `writing`, so a disk that fills is RESOURCE_EXHAUSTED naming it.

`estimate_output_bytes` computes the same layout from the safetensors headers only, so
a conversion can check the destination's free space before writing anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import pathlib
from typing import TYPE_CHECKING, Callable

import torch

from strata.model import manifest, quant
from weight_store.diskspace import writing

if TYPE_CHECKING:
    from tools.convert import QuantPolicy

MANIFEST_BYTES, PER_TENSOR_BYTES = 1 << 20, 1 << 10  # room kept for manifest.json: fixed + a tensor
# bytes per element of safetensors dtypes that are stored as they are (floats become 16-bit)
_ITEMSIZE = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit dtype a source tensor is stored (or dequantized) as."""
    if dtype == torch.bfloat16:
        return torch.bfloat16
    if dtype.is_floating_point:
        return torch.float16
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _ShardWriter:
    """Appends 4 KiB aligned parts to one shard file, hashing each."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        with writing(path):
            self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self._pos = 0

    def write_part(self, t: torch.Tensor) -> manifest.Part:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        with writing(self.path):
            self._pad_to(manifest.align(self._pos))
            self._file.write(memoryview(raw))
        part = manifest.Part(
            offset=self._pos, length=raw.nbytes, dtype=_dtype_name(t.dtype),
            shape=tuple(t.shape), sha256=hashlib.sha256(memoryview(raw)).hexdigest(),
        )
        self._pos += raw.nbytes
        return part

    def _pad_to(self, pos: int) -> None:
        if pos > self._pos:
            self._file.write(b"\0" * (pos - self._pos))
            self._pos = pos

    def finish(self) -> int:
        """Pads the file to a multiple of ALIGN, closes it and returns its size."""
        with writing(self.path):
            self._pad_to(manifest.align(self._pos))
            self._file.close()
        return self._pos

    def close(self) -> None:
        """Closes the file, if finish() did not; the file is being abandoned, so a
        failing flush of its buffer (the disk that failed the write) is not reported."""
        with contextlib.suppress(OSError):
            self._file.close()


def _tensor_entry(
    writer: _ShardWriter, t: torch.Tensor, qspec: manifest.QuantSpec | None
) -> manifest.TensorEntry:
    """Writes one tensor's parts and returns its manifest entry."""
    logical = _storage_dtype(t.dtype)
    if qspec is None:
        parts = {"data": writer.write_part(t.to(logical))}
    else:
        data, scale, w_min = quant.quantize(t, qspec.bits, qspec.group_size)
        parts = {"data": writer.write_part(data), "scale": writer.write_part(scale), "min": writer.write_part(w_min)}
    return manifest.TensorEntry(tuple(t.shape), _dtype_name(logical), qspec, parts)


def write_shard(
    directory: pathlib.Path, shard: str, tensors: list[tuple[str, str]],
    read: Callable[[str], torch.Tensor], policy: QuantPolicy,
) -> manifest.Shard:
    """Writes one shard file from (HF name, local name) pairs, one tensor in memory at
    a time; only layer tensors are quantization candidates."""
    file = manifest.shard_file(shard)
    writer = _ShardWriter(directory / file)
    is_layer = shard.startswith("layer.")
    entries = {}
    try:
        for hf_name, local in tensors:
            t = read(hf_name)
            qspec = policy.spec_for(hf_name, local, tuple(t.shape)) if is_layer else None
            entries[local] = _tensor_entry(writer, t, qspec)
            del t
        size = writer.finish()
    finally:
        writer.close()
    return manifest.Shard(shard, file, size, entries)


def _stored_part_bytes(shape: tuple[int, ...], st_dtype: str, qspec: manifest.QuantSpec | None) -> list[int]:
    """The byte length of each part a tensor is written as (see `_tensor_entry`)."""
    numel = math.prod(shape)
    if qspec is None:
        return [numel * _ITEMSIZE.get(st_dtype, 2)]  # floats are stored 16-bit
    groups = numel // qspec.group_size
    return [numel * qspec.bits // 8, 2 * groups, 2 * groups]  # data, fp16 scale, fp16 min


def estimate_output_bytes(
    plan: dict[str, list[tuple[str, str]]], handle: Callable[[str], object], policy: QuantPolicy
) -> int:
    """The bytes `convert` will write for `plan`, from the safetensors headers only
    (shapes and dtypes; no tensor is read): every shard laid out as `_ShardWriter` lays
    it out, plus room for the manifest."""
    total, tensors = MANIFEST_BYTES, 0
    for shard, entries in plan.items():
        pos = 0
        for hf_name, local in entries:
            piece = handle(hf_name).get_slice(hf_name)
            shape = tuple(piece.get_shape())
            qspec = policy.spec_for(hf_name, local, shape) if shard.startswith("layer.") else None
            for n in _stored_part_bytes(shape, piece.get_dtype(), qspec):
                pos = manifest.align(pos) + n
            tensors += 1
        total += manifest.align(pos)
    return total + tensors * PER_TENSOR_BYTES

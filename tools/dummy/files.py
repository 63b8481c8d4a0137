"""Dummy weights written to disk as a converted model directory, for benchmarks of
the disk tier (`strata bench --dummy --disk-offload`): the dummy shape's manifest
with real sha256 fields, one file per shard, evicted from the page cache after
writing so that reads come from the disk. Written into a temporary directory and
renamed into place; a complete directory for the same shape is reused.

Only the shards read from disk every pass need their bytes there (`data`): the others
(held in the host tier, or made on the GPU by the compute node) are written as sparse
files of zeros, which take no disk space and read at memory speed, so a model larger
than the disk (Llama-3.1-405B's 234 GB) is benchmarked with only its disk tier on disk.
DATA_FILE lists the shards written with their random bytes."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
from typing import Callable, Iterable

import torch

from strata.model.manifest import Manifest
from strata.runtime.errors import StrataError
from tools.dummy.manifest import dummy_manifest
from tools.dummy.weights import fill
from weight_store.diskspace import check_free_space, writing
from weight_store.host_tier import part_digests


DATA_FILE = "dummy-data.json"  # the shards written with their bytes (the rest are sparse zeros)


def data_shards(directory: pathlib.Path) -> set[str]:
    """Shards of a dummy directory written with their random bytes (every shard where
    DATA_FILE is absent: directories written before sparse shards)."""
    try:
        return set(json.loads((pathlib.Path(directory) / DATA_FILE).read_text()))
    except FileNotFoundError:
        return set(Manifest.load(directory).shards)


def _complete(directory: pathlib.Path, want: Manifest, data: set[str]) -> bool:
    try:
        have = Manifest.load(directory)
    except StrataError:
        return False
    if have.quantization != want.quantization or list(have.shards) != list(want.shards):
        return False
    if not data <= data_shards(directory):
        return False
    return all((directory / s.file).is_file() and (directory / s.file).stat().st_size == s.size
               for s in have.shards.values())


@functools.lru_cache(maxsize=64)
def _zeros_digest(length: int) -> str:
    h, block = hashlib.sha256(), bytes(min(length, 64 << 20))
    left = length
    while left:
        n = min(left, len(block))
        h.update(block[:n])
        left -= n
    return h.hexdigest()


def _sparse(shard, path: pathlib.Path):
    """A shard of zeros that takes no disk space, and its entry with the zeros' digests."""
    with writing(path):
        with open(path, "wb") as f:
            f.truncate(shard.size)
    tensors = {t: dataclasses.replace(e, parts={p: dataclasses.replace(part, sha256=_zeros_digest(part.length))
                                               for p, part in e.parts.items()})
               for t, e in shard.tensors.items()}
    return dataclasses.replace(shard, tensors=tensors)


def _write_shard(path: pathlib.Path, data: torch.Tensor) -> None:
    """Write, fsync, and drop the file's pages from the page cache."""
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data.numpy())
            pos = 0
            while pos < len(view):
                pos += os.write(fd, view[pos:])
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_dummy_model(name: str, bits: int, group_size: int, directory: str | pathlib.Path,
                      progress: Callable[[int, int], None] | None = None,
                      data: Iterable[str] | None = None) -> Manifest:
    """The directory's manifest, writing the dummy model there first unless present.
    `data`: the shards written with random bytes (default: all); the others are sparse
    zeros. A present directory is reused when it holds at least these shards' bytes."""
    out = pathlib.Path(directory)
    m = dummy_manifest(name, bits, group_size)
    data = set(m.shards) if data is None else set(data)
    if _complete(out, m, data):
        return Manifest.load(out)
    check_free_space(out.parent, sum(m.shards[n].size for n in data) + (1 << 20), what=f"dummy {name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = {}
        with concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="dummy-hash") as pool:
            for done, (shard_name, shard) in enumerate(m.shards.items()):
                if shard_name not in data:
                    shards[shard_name] = _sparse(shard, tmp / shard.file)
                else:
                    raw = torch.zeros(shard.size, dtype=torch.uint8)  # the padding between parts: zeros
                    fill({shard_name: raw}, m, threads=1)
                    shards[shard_name] = _hashed(shard, raw, pool)
                    _write_shard(tmp / shard.file, raw)
                if progress:
                    progress(done + 1, len(m.shards))
        (tmp / DATA_FILE).write_text(json.dumps(sorted(data)))
        Manifest(m.architecture, m.config, shards, m.quantization).save(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest.load(out)


def _hashed(shard, data: torch.Tensor, pool: concurrent.futures.Executor):
    """The shard's entry with each part's sha256 filled in (parts hashed in parallel)."""
    tensors = {t: dataclasses.replace(e, parts=dict(e.parts)) for t, e in shard.tensors.items()}
    for t, p, part, digest in part_digests(shard, data, pool):
        tensors[t].parts[p] = dataclasses.replace(part, sha256=digest)
    return dataclasses.replace(shard, tensors=tensors)

"""Dummy weights written to disk as a converted model directory, for benchmarks of
the disk tier (`strata bench --dummy --disk-offload`): the dummy shape's manifest
with real sha256 fields, one file per shard, evicted from the page cache after
writing so that reads come from the disk. Written into a temporary directory and
renamed into place; a complete directory for the same shape is reused."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
from typing import Callable

import torch

from strata.dummy_fill import fill
from strata.errors import StrataError
from strata.manifest import Manifest
from weight_store.diskspace import check_free_space, writing
from weight_store.dummy import dummy_manifest
from weight_store.host_tier import part_digests


def _complete(directory: pathlib.Path, want: Manifest) -> bool:
    try:
        have = Manifest.load(directory)
    except StrataError:
        return False
    if have.quantization != want.quantization or list(have.shards) != list(want.shards):
        return False
    return all((directory / s.file).is_file() and (directory / s.file).stat().st_size == s.size
               for s in have.shards.values())


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
                      progress: Callable[[int, int], None] | None = None) -> Manifest:
    """The directory's manifest, writing the dummy model there first unless present."""
    out = pathlib.Path(directory)
    m = dummy_manifest(name, bits, group_size)
    if _complete(out, m):
        return Manifest.load(out)
    check_free_space(out.parent, sum(s.size for s in m.shards.values()) + (1 << 20), what=f"dummy {name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = {}
        with concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="dummy-hash") as pool:
            for done, (shard_name, shard) in enumerate(m.shards.items()):
                data = torch.empty(shard.size, dtype=torch.uint8)
                fill({shard_name: data}, m, threads=1)
                shards[shard_name] = _hashed(shard, data, pool)
                _write_shard(tmp / shard.file, data)
                if progress:
                    progress(done + 1, len(m.shards))
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

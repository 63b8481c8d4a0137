"""Where Strata keeps what it builds or writes for reuse: one root, $STRATA_CACHE
(default ~/.cache/strata), with a folder per kind:

    native/    the KV store's C attention kernel, per CPU (kv_store/native.py)
    kernels/   the CUDA W4A16 kernels, per GPU architecture (compute_node/kernels/cuda_build.py)
    offload/   `strata bench --dummy`'s shards for the disk tier (deploy/bench.py)
    demo/      `strata demo`'s random OPT and its conversion (deploy/demo.py)

Everything under it can be deleted; it is made again when needed."""

from __future__ import annotations

import os
import pathlib

ENV = "STRATA_CACHE"
KINDS = ("native", "kernels", "offload", "demo")


def cache_root() -> pathlib.Path:
    """$STRATA_CACHE, else ~/.cache/strata (read on every call: tests and tools set it)."""
    return pathlib.Path(os.environ.get(ENV) or pathlib.Path.home() / ".cache" / "strata")


def cache_dir(kind: str) -> pathlib.Path:
    """The folder for one kind of cached thing (not created here: writers make it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(KINDS)}")
    return cache_root() / kind

"""Where Strata keeps what it builds or writes for reuse: one root, `cache_root()`:
$STRATA_CACHE, else $XDG_CACHE_HOME/strata, else ~/.cache/strata. Nothing else reads
those variables. A folder per kind:

    native/    the KV store's C attention kernel, per CPU and macros (kv_store/native.py)
    kernels/   the CUDA W4A16 kernels, per GPU architecture (compute_node/kernels/cuda_build.py)
    offload/   `strata bench --dummy`'s shards for the disk tier (deploy/bench.py)
    demo/      `strata demo`'s random OPT and its conversion (deploy/demo.py)

and at the root itself `strata profile`'s hardware profile, profile-<hostname>.json
(strata/policy/hardware.py). Everything under it can be deleted; it is made again when needed
(the profile by measuring)."""

from __future__ import annotations

import os
import pathlib

ENV = "STRATA_CACHE"
XDG_ENV = "XDG_CACHE_HOME"  # the user's cache directory (XDG Base Directory), when STRATA_CACHE is not set
KINDS = ("native", "kernels", "offload", "demo")


def cache_root() -> pathlib.Path:
    """$STRATA_CACHE, else $XDG_CACHE_HOME/strata, else ~/.cache/strata (empty counts as
    unset; read on every call: tests and tools set them)."""
    if os.environ.get(ENV):
        return pathlib.Path(os.environ[ENV])
    return pathlib.Path(os.environ.get(XDG_ENV) or pathlib.Path.home() / ".cache") / "strata"


def cache_dir(kind: str) -> pathlib.Path:
    """The folder for one kind of cached thing (not created here: writers make it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; one of {', '.join(KINDS)}")
    return cache_root() / kind

"""Offline conversion: a Hugging Face checkpoint -> Strata layer shards + manifest.

This module reads the checkpoint, decides what goes where and runs the conversion:
which tensors make up each shard ("embed", "layer.{i}", "head"; `plan_shards`), which
layer linears are quantized (`QuantPolicy`), the free-space check, and the temporary
directory the output is written into. How a shard file is laid out (4 KiB aligned,
sha256-hashed parts) and what that layout costs is `tools.shard_writer`.

Streams tensor by tensor with `safetensors.safe_open` (memory bounded by one tensor
plus its quantized parts), one shard file at a time. Everything is written into a
temporary directory next to `dst` and renamed into place at the end; on any failure
the temporary directory is removed, so nothing that looks complete is left; one left
by a conversion that was killed is removed by the next conversion beside it.
A damaged checkpoint file is DATA_LOSS naming the file.
Before writing, the output's size is estimated from the checkpoint's headers and
checked against the destination filesystem's free space; a disk that fills anyway
(ENOSPC, EFBIG, EDQUOT) is RESOURCE_EXHAUSTED naming the file being written.

Which weights are quantized follows DeepSpeed's `weight_quantization` section when a
`ds_config` is given (see `QuantPolicy`), else every layer linear at `bits`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from strata.model import arch, manifest, quant
from strata.runtime.errors import ErrorKind, StrataError
from strata.runtime.lifetime import process_alive
from tools.shard_writer import MANIFEST_BYTES, PER_TENSOR_BYTES  # noqa: F401 - read from here by callers
# _write_shards calls write_shard through this module's name, so replacing
# tools.convert.write_shard (as the tests do) takes effect
from tools.shard_writer import estimate_output_bytes, write_shard
from weight_store.diskspace import FreeBytes, check_free_space, writing

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "generation_config.json",
)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Progress = Callable[[int, int], None]
log = logging.getLogger("strata.convert")


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    """Which layer linears are quantized, and how.

    `patterns`: DeepSpeed `post_init_quant` (pattern -> QuantSpec), matched as DeepSpeed
    matches module names: a pattern applies when it is a substring of the module name
    (the HF tensor name without ".weight"); the first matching pattern wins.
    `default`: the spec for linears no pattern matches (`quantized_initialization`, or
    the `bits` argument without a ds_config); None keeps them 16-bit."""

    linears: tuple[str, ...]  # candidates: local names of a layer's matmul weights
    default: manifest.QuantSpec | None
    patterns: tuple[tuple[str, manifest.QuantSpec], ...] = ()

    def spec_for(self, hf_name: str, local: str, shape: tuple[int, ...]) -> manifest.QuantSpec | None:
        """The QuantSpec of a layer tensor, or None to keep it 16-bit."""
        if local not in self.linears:
            return None
        module = hf_name.removesuffix(".weight")
        chosen = next((spec for pattern, spec in self.patterns if pattern in module), self.default)
        if chosen is None or not quant.quantizable(shape, chosen.group_size):
            return None
        return chosen


def find_weight_quantization(ds_config: dict) -> dict | None:
    """The `weight_quantization` section of a DeepSpeed config, wherever it is nested;
    a dict that is itself the section (has `post_init_quant` or
    `quantized_initialization`) is returned as is. None when there is none."""
    if not isinstance(ds_config, dict):
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"ds_config must be a dict, got {type(ds_config).__name__}")
    if "post_init_quant" in ds_config or "quantized_initialization" in ds_config:
        return ds_config
    pending = [ds_config]
    while pending:
        node = pending.pop(0)
        if isinstance(node.get("weight_quantization"), dict):
            return node["weight_quantization"]
        pending.extend(v for v in node.values() if isinstance(v, dict))
    return None


def _ds_spec(params: dict, where: str) -> manifest.QuantSpec:
    """One DeepSpeed quantization config {num_bits, group_size, group_dim, symmetric}."""
    if not isinstance(params, dict) or "num_bits" not in params or "group_size" not in params:
        raise StrataError(
            ErrorKind.INVALID_ARGUMENT, f"ds_config {where} needs num_bits and group_size, got {params!r}"
        )
    if params.get("symmetric", False):
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"ds_config {where}: symmetric quantization is not supported")
    if params.get("group_dim", 1) != 1:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"ds_config {where}: only group_dim 1 is supported")
    bits, group_size = params["num_bits"], params["group_size"]
    if bits not in quant.BITS:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"ds_config {where}: num_bits must be 4 or 8, got {bits}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"ds_config {where}: bad group_size {group_size!r}")
    return manifest.QuantSpec(bits=bits, group_size=group_size)


def make_policy(
    linears: tuple[str, ...], bits: int, group_size: int, section: dict | None, has_ds_config: bool
) -> QuantPolicy:
    """The QuantPolicy for the converter's arguments (see `convert`)."""
    if not has_ds_config:
        return QuantPolicy(linears, None if bits == 16 else manifest.QuantSpec(bits=bits, group_size=group_size))
    if section is None:
        return QuantPolicy(linears, None)  # a DeepSpeed config without weight quantization: 16-bit, as DeepSpeed
    init = section.get("quantized_initialization") or None
    default = _ds_spec(init, "quantized_initialization") if init else None
    post = section.get("post_init_quant") or {}
    if not isinstance(post, dict):
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"ds_config post_init_quant must be a dict, got {post!r}")
    patterns = tuple((p, _ds_spec(c, f"post_init_quant[{p!r}]")) for p, c in post.items())
    return QuantPolicy(linears, default, patterns)


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StrataError(ErrorKind.DATA_LOSS, f"{str(path)!r} is corrupt: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise StrataError(ErrorKind.DATA_LOSS, f"{str(path)!r} is corrupt: not a JSON object")
    return data


def _read_config(src: pathlib.Path) -> dict:
    if not src.is_dir():
        raise StrataError(ErrorKind.NOT_FOUND, f"checkpoint directory {str(src)!r} does not exist")
    path = src / "config.json"
    if not path.is_file():
        raise StrataError(ErrorKind.NOT_FOUND, f"{str(src)!r} has no config.json: not a Hugging Face checkpoint")
    return _read_json(path)


def _corrupt(path: pathlib.Path, e: Exception) -> StrataError:
    return StrataError(
        ErrorKind.DATA_LOSS, f"{str(path)!r} is corrupt or truncated: not a valid safetensors file ({e})"
    )


def _open_safetensors(path: pathlib.Path):
    """safe_open, with a damaged file as DATA_LOSS naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise _corrupt(path, e) from None


def _weight_files(src: pathlib.Path) -> dict[str, str]:
    """HF tensor name -> safetensors file name (single file or sharded index)."""
    if (src / INDEX_FILE).is_file():
        weight_map = _read_json(src / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise StrataError(ErrorKind.DATA_LOSS, f"{str(src / INDEX_FILE)!r} is corrupt: it has no weight_map")
        return dict(weight_map)
    if (src / SINGLE_FILE).is_file():
        with _open_safetensors(src / SINGLE_FILE) as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise StrataError(ErrorKind.NOT_FOUND, f"{str(src)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def plan_shards(spec: arch.ArchSpec, config: dict, names: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Shard name -> [(HF name, local name)] in shard order: embed, layer.0.., head.
    lm_head is kept only when untied (tie_word_embeddings false and present)."""
    embed, head, layers = [], [], {}
    tied = config.get("tie_word_embeddings", True)
    for name in sorted(names):
        kind, index, local = spec.split_name(name)
        if kind == "layer":
            layers.setdefault(index, []).append((name, local))
        elif kind == "embed":
            embed.append((name, local))
        elif kind == "head" and not (local == "lm_head.weight" and tied):
            head.append((name, local))
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"checkpoint layers are not 0..n-1: found {sorted(layers)}")
    if not tied and not any(local == "lm_head.weight" for _, local in head):
        raise StrataError(ErrorKind.INVALID_ARGUMENT, "config says the lm_head is untied but the checkpoint has none")
    plan = {"embed": embed}
    plan.update({manifest.layer_shard(i): layers[i] for i in range(len(layers))})
    plan["head"] = head
    return plan


@contextlib.contextmanager
def _handles(src: pathlib.Path, files: dict[str, str]) -> Iterator[Callable[[str], object]]:
    """A function HF name -> the open safetensors file holding it (each file opened
    lazily, once; tensors are read one at a time by the caller)."""
    with contextlib.ExitStack() as stack:
        handles = {}

        def handle(name: str):
            file = files[name]
            if file not in handles:
                if not (src / file).is_file():
                    raise StrataError(ErrorKind.NOT_FOUND, f"{str(src / file)!r} (named in {INDEX_FILE}) is missing")
                handles[file] = stack.enter_context(_open_safetensors(src / file))
            return handles[file]

        handle.path = lambda name: src / files[name]  # type: ignore[attr-defined]
        yield handle


def _check_arguments(src: pathlib.Path, dst: pathlib.Path, bits: int, group_size: int) -> dict:
    """Validates the arguments; returns the HF config."""
    config = _read_config(src)
    if bits not in (4, 8, 16):
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"bits must be 4, 8 or 16, got {bits}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"group_size must be a positive integer, got {group_size!r}")
    if dst.exists():
        raise StrataError(
            ErrorKind.FAILED_PRECONDITION, f"destination {str(dst)!r} already exists; remove it or choose another"
        )
    return config


def _tokenizer_files(src: pathlib.Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (src / name).is_file()]


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in _tokenizer_files(src):
        with writing(dst / name):
            shutil.copyfile(src / name, dst / name)


def _write_shards(
    tmp: pathlib.Path, plan: dict[str, list[tuple[str, str]]], handle: Callable[[str], object],
    policy: QuantPolicy, progress: Progress | None,
) -> dict[str, manifest.Shard]:
    """Every shard of `plan` into `tmp`, in order, reporting progress after each."""
    shards = {}

    def read(name: str) -> torch.Tensor:
        try:
            return handle(name).get_tensor(name)
        except SafetensorError as e:
            raise _corrupt(handle.path(name), e) from None

    for done, (name, tensors) in enumerate(plan.items(), start=1):
        shards[name] = write_shard(tmp, name, tensors, read, policy)
        if progress is not None:
            progress(done, len(plan))
    return shards


_TMP_SUFFIX = ".tmp-"  # a conversion in progress writes into .DST.tmp-PID beside DST


def remove_stale_temporaries(parent: pathlib.Path) -> list[pathlib.Path]:
    """Removes the temporary directories under `parent` that conversions killed before
    they finished left behind (their process is gone); returns them. Only a directory
    named as `convert` names them, ours, holding nothing `convert` does not write."""
    removed = []
    for path in parent.glob(f".*{_TMP_SUFFIX}*") if parent.is_dir() else ():
        pid = path.name.rsplit(_TMP_SUFFIX, 1)[-1]
        try:
            ours = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
            names = [p.name for p in path.iterdir()] if ours else []
        except OSError:
            continue
        written = all(n.endswith(".bin") or n == "manifest.json" or n in TOKENIZER_FILES for n in names)
        if ours and pid.isdigit() and written and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    bits: int = 4,
    group_size: int = 64,
    ds_config: dict | None = None,
    progress: Progress | None = None,
    free_bytes: FreeBytes | None = None,
) -> manifest.Manifest:
    """Converts the HF checkpoint `src` into Strata shards at `dst` (which must not exist).

    Without `ds_config`, every layer linear (`ArchSpec.linears`) whose in_features is a
    multiple of `group_size` is quantized at `bits` (16: none). With `ds_config`, its
    `weight_quantization` section decides (`post_init_quant` patterns, else
    `quantized_initialization`, else 16-bit) and `bits`/`group_size` are unused.
    Other tensors are stored float16 (bfloat16 if the source is bfloat16).
    `progress(done_shards, total_shards)` is called after each shard; `free_bytes(dir)`
    is the free space of dir's filesystem (default `disk_free_bytes`).

    Raises StrataError: NOT_FOUND (no such checkpoint / config / weights),
    INVALID_ARGUMENT (unsupported model or quantization), FAILED_PRECONDITION (dst exists),
    RESOURCE_EXHAUSTED (too little free space up front, or the disk filled while writing).
    """
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    config = _check_arguments(src, dst, bits, group_size)
    remove_stale_temporaries(dst.parent)
    spec = arch.spec_for(config)
    if "tokenizer.json" not in _tokenizer_files(src):
        log.warning("%s has no tokenizer.json: the converted model takes and gives token ids only", src)
    section = find_weight_quantization(ds_config) if ds_config is not None else None
    policy = make_policy(spec.linears, bits, group_size, section, ds_config is not None)
    files = _weight_files(src)
    plan = plan_shards(spec, config, list(files))
    with _handles(src, files) as handle:
        needed = estimate_output_bytes(plan, handle, policy)
        needed += sum((src / name).stat().st_size for name in _tokenizer_files(src))
        check_free_space(dst.parent, needed, free_bytes)
        tmp = dst.parent / f".{dst.name}{_TMP_SUFFIX}{os.getpid()}"
        with writing(tmp):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed run with our pid
            tmp.mkdir()
        try:
            shards = _write_shards(tmp, plan, handle, policy, progress)
            result = manifest.Manifest(
                architecture=spec.name, config=config, shards=shards,
                quantization={"bits": bits, "group_size": group_size, "ds_config": section},
            )
            _copy_tokenizer(src, tmp)
            with writing(tmp / "manifest.json"):
                result.save(tmp)
            if dst.exists():  # created while we converted: never replace it
                raise StrataError(ErrorKind.FAILED_PRECONDITION, f"destination {str(dst)!r} appeared during conversion")
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result

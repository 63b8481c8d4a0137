"""The run plan (no torch, no grpc): one placement decision, resolved once by `strata
serve` or `strata bench` (deploy/serve_plan.py) from the flags or the planner, written as
JSON into the run directory and read by all three services (`--plan FILE`). It also
carries the kernel choices: which CUDA W4A16 kernels the compute node may run
(`w4a16_wgmma`, `w4a16_mma`; it keeps those built for its device,
compute_node/kernels/choice.py) and the KV store attention kernel's prefetch macros
(`kv_kernel_defines`, its build options: kv_store/native.py).

Every field is checked here, once, when a plan is made or read; a bad one is an
INVALID_ARGUMENT error naming the field. The services decide nothing of it again:
the weight store keeps the `resident_layers` out of its host tier (dummy weights: the
compute node makes them) and reads `disk_layers` from disk every pass; the compute
node keeps `resident_layers` on its device and sizes its scheduler from the rest."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re

from strata.policy.placement import resident_layers as spread_layers
from strata.runtime.errors import ErrorKind, StrataError

KV_HOMES = ("gpu", "kv_store")  # gpu: the compute device (the CPU with --device cpu); kv_store: host memory
KV_BITS = (4, 8, 16)
DTYPES = ("", "float16", "bfloat16", "float32")  # "": bfloat16 on a GPU, float32 on the CPU
# The KV store kernel's compile-time macros a plan may set (kv_store/decode_attention*.c),
# with their allowed values: prefetch distance in cached vectors (0: no software
# prefetch), __builtin_prefetch's locality hint, the next row's keys during this row's
# values, and the quantized kernels' prefetch distance in bytes.
KV_KERNEL_DEFINES = {"PF_TOKENS": (0, 4096), "PF_HINT": (0, 3), "PF_NEXT_ROW": (0, 1), "QX_PF_BYTES": (0, 1 << 20)}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    num_layers: int  # the model's transformer layers (a plan for another model is refused)
    resident_layers: tuple[int, ...] = ()  # layers kept on the compute device, by index
    disk_layers: tuple[int, ...] = ()  # streamed layers read from disk every pass, by index
    kv_home: str = "gpu"
    kv_bits: int = 16  # 16 = the compute dtype; 8 or 4 group-wise quantized on head_dim
    kv_group_size: int = 0  # values per quantization group of a quantized cache; 0 with 16 bits
    micro_batches: int = 1  # groups of the running batch, each served by a loaded layer in turn
    max_batch: int = 16  # sequence slots of the scheduler's running batch
    max_seq_len: int = 0  # tokens a slot holds (prompt + generated); 0 = the compute node's default
    max_queue: int = 0  # sequences waiting for a slot; 0 = the compute node's default
    # prompt tokens prefilled through a layer at once (activation memory); 0 = a group's
    # slots x max_seq_len
    prefill_chunk_tokens: int = 0
    # prompt tokens a pass prefills, at most, the seated prompts past it waiting for the
    # next passes, which also decode the first ones (compute_node/scheduler.py); 0 = no bound
    prefill_tokens_per_pass: int = 0
    dtype: str = ""
    decode_graphs: bool = True  # decode-only passes replayed as fixed-shape steps where the placement allows
    # Kernels (bench configuration; the defaults are what runs otherwise): the CUDA W4A16
    # kernels the compute node may run at 33-64 rows where built (wgmma on sm_90, else
    # mma.sync; with neither, Triton), and macros for the KV store kernel's build,
    # {name: value} of KV_KERNEL_DEFINES (kept as sorted (name, value) pairs; JSON: an object)
    w4a16_wgmma: bool = True
    w4a16_mma: bool = True
    kv_kernel_defines: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        _whole(self, "num_layers", low=1)
        n = self.num_layers
        resident = _layers(self, "resident_layers", n)
        disk = _layers(self, "disk_layers", n)
        if set(resident) & set(disk):
            _bad("disk_layers", f"layers {sorted(set(resident) & set(disk))} are also resident; disk layers are "
                                "streamed ones")
        object.__setattr__(self, "resident_layers", resident)
        object.__setattr__(self, "disk_layers", disk)
        _choice(self, "kv_home", KV_HOMES)
        _choice(self, "kv_bits", KV_BITS)
        _whole(self, "kv_group_size", low=0)
        if self.kv_bits == 16 and self.kv_group_size:
            _bad("kv_group_size", f"is {self.kv_group_size} for a 16-bit cache; it must be 0 (no groups)")
        if self.kv_bits != 16 and not self.kv_group_size:
            _bad("kv_group_size", f"a {self.kv_bits}-bit cache needs a group size > 0")
        _whole(self, "micro_batches", low=1)
        _whole(self, "max_batch", low=1)
        _whole(self, "max_seq_len", low=0)
        _whole(self, "max_queue", low=0)
        _whole(self, "prefill_chunk_tokens", low=0)
        _whole(self, "prefill_tokens_per_pass", low=0)
        _choice(self, "dtype", DTYPES)
        for flag in ("decode_graphs", "w4a16_wgmma", "w4a16_mma"):
            if not isinstance(getattr(self, flag), bool):
                _bad(flag, f"must be true or false, got {getattr(self, flag)!r}")
        object.__setattr__(self, "kv_kernel_defines", check_kv_kernel_defines(self.kv_kernel_defines))

    @classmethod
    def with_share(cls, num_layers: int, gpu_weight_share: float, **fields) -> RunPlan:
        """A plan whose resident layers are round(share x layers), spread through the model
        (strata/policy/placement.py)."""
        if isinstance(gpu_weight_share, bool) or not isinstance(gpu_weight_share, (int, float)) \
                or not 0.0 <= gpu_weight_share <= 1.0:
            _bad("gpu_weight_share", f"must be a number from 0 to 1, got {gpu_weight_share!r}")
        _whole_value("num_layers", num_layers, 1)
        return cls(num_layers=num_layers, resident_layers=tuple(sorted(spread_layers(num_layers, gpu_weight_share))),
                   **fields)

    @property
    def gpu_weight_share(self) -> float:
        return len(self.resident_layers) / self.num_layers

    @property
    def kv_offload(self) -> bool:
        return self.kv_home == "kv_store"

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        resident = set(self.resident_layers)
        return tuple(i for i in range(self.num_layers) if i not in resident)

    def check_model(self, num_layers: int) -> None:
        """Refuses a plan made for a model of another depth."""
        if num_layers != self.num_layers:
            _bad("num_layers", f"the plan is for {self.num_layers} layers, the model has {num_layers}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["resident_layers"] = list(self.resident_layers)
        d["disk_layers"] = list(self.disk_layers)
        d["kv_kernel_defines"] = dict(self.kv_kernel_defines)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d) -> RunPlan:
        if not isinstance(d, dict):
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"run plan: a JSON object is needed, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"run plan: unknown field(s) {', '.join(unknown)}")
        if "num_layers" not in d:
            _bad("num_layers", "is missing")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"run plan: not JSON ({e})") from None
        return cls.from_dict(d)

    def save(self, path) -> None:
        pathlib.Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> RunPlan:
        try:
            text = pathlib.Path(path).read_text()
        except OSError as e:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"run plan {path}: {e.strerror or e}") from None
        return cls.from_json(text)

    def summary(self) -> str:
        kv = f"KV {self.kv_home} at {self.kv_bits} bits"
        return (f"{len(self.resident_layers)}/{self.num_layers} layers resident, {len(self.disk_layers)} read from "
                f"disk every pass, {kv}, {self.micro_batches} micro-batches, {self.max_batch} slots")


def _bad(field: str, why: str):
    raise StrataError(ErrorKind.INVALID_ARGUMENT, f"run plan: {field} {why}")


def _whole_value(field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _bad(field, f"must be a whole number >= {low}, got {value!r}")


def _whole(plan: RunPlan, field: str, low: int) -> None:
    _whole_value(field, getattr(plan, field), low)


def _choice(plan: RunPlan, field: str, allowed: tuple) -> None:
    value = getattr(plan, field)
    if isinstance(value, bool) or value not in allowed:
        _bad(field, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_kv_kernel_defines(value) -> tuple[tuple[str, int], ...]:
    """kv_kernel_defines as sorted (name, value) pairs, from a mapping or pairs."""
    field = "kv_kernel_defines"
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        _bad(field, f"must be an object of macro names to whole numbers, got {value!r}")
    for name, v in pairs:
        if not isinstance(name, str) or name not in KV_KERNEL_DEFINES:
            _bad(field, f"has {name!r}, not one of {', '.join(KV_KERNEL_DEFINES)}")
        low, high = KV_KERNEL_DEFINES[name]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            _bad(field, f"{name} must be a whole number from {low} to {high}, got {v!r}")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        _bad(field, f"repeats macros: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return tuple(sorted(pairs))


def parse_kv_kernel_defines(text: str) -> dict[str, int]:
    """A command line's KV kernel macros, "PF_TOKENS=0 PF_HINT=2" (a leading -D on each is
    taken too, as compiler flags are written): for argparse's `type=`, checked as a plan's."""
    out: dict[str, int] = {}
    for item in text.replace(",", " ").split():
        m = re.fullmatch(r"(?:-D)?([A-Za-z_][A-Za-z0-9_]*)=(-?[0-9]+)", item)
        if m is None:
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=VALUE (NAME one of {', '.join(KV_KERNEL_DEFINES)})")
        out[m.group(1)] = int(m.group(2))
    try:
        check_kv_kernel_defines(out)
    except StrataError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return out


def _layers(plan: RunPlan, field: str, num_layers: int) -> tuple[int, ...]:
    """The field as a sorted tuple of distinct layer indices below num_layers."""
    value = getattr(plan, field)
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        _bad(field, f"must be a list of layer indices, got {value!r}")
    layers = list(value)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        _bad(field, f"has {bad!r}, not layer indices from 0 to {num_layers - 1}")
    if len(set(layers)) != len(layers):
        _bad(field, f"repeats layers: {sorted(i for i in set(layers) if layers.count(i) > 1)}")
    return tuple(sorted(layers))

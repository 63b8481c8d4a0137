"""The hardware profile: one machine's measured limits, saved as JSON.

`strata profile` measures it (deploy/profile_cli.py); the cost model and the planner read
it. Torch-free: a profile made on the GPU machine can be planned with anywhere."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import socket

from strata.policy.floor import Hardware
from strata.runtime import paths
from strata.runtime.errors import ErrorKind, StrataError

STALE_DAYS = 30


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """Bandwidths in bytes/s, FLOP/s for an 8192^3 fp16 matmul; GPU fields are 0
    (and gpu_name empty) on a machine without one."""

    machine: str
    measured_at: str  # ISO date (UTC) of the measurement
    gpu_name: str = ""
    gpu_bytes: float = 0.0
    gpu_flops: float = 0.0
    hbm_bytes_per_s: float = 0.0  # device-to-device copy, read + write counted
    h2d_pinned: float = 0.0
    h2d_pageable: float = 0.0
    d2h_pinned: float = 0.0
    dram_read_bytes_per_s: float = 0.0  # all threads
    # KV bytes read per second by the KV store's decode attention (the kernel it runs,
    # `cpu_attention_kernel`) over a bfloat16 cache, and over INT8 / INT4 caches (bytes as
    # stored: codes plus scales and mins; 0: not measured, the cost model derives them)
    cpu_attention_bytes_per_s: float = 0.0
    cpu_attention_int8_bytes_per_s: float = 0.0
    cpu_attention_int4_bytes_per_s: float = 0.0
    cpu_attention_kernel: str = ""  # "native" (kv_store/native.py) or "sdpa"; "" = not recorded
    disk_read_bytes_per_s: float = 0.0
    dequant_bytes_per_s: float = 0.0  # dense bf16 bytes written by the fused INT4 dequant; 0: unknown
    host_bytes: float = 0.0
    cpu_cores: int = 0
    source: str = ""  # how the numbers were obtained

    def cpu_attention_rate(self, kv_bits: int) -> float:
        """Stored KV bytes/s of the KV store's attention over a cache of `kv_bits`, as
        measured; 0 where the profile has no figure for those bits."""
        return {16: self.cpu_attention_bytes_per_s, 8: self.cpu_attention_int8_bytes_per_s,
                4: self.cpu_attention_int4_bytes_per_s}[kv_bits]

    @property
    def has_gpu(self) -> bool:
        return self.gpu_bytes > 0 and self.gpu_flops > 0

    def age_days(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        when = datetime.datetime.fromisoformat(self.measured_at)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return (now - when).total_seconds() / 86400

    def is_stale(self, now: datetime.datetime | None = None) -> bool:
        return self.age_days(now) > STALE_DAYS

    def to_hardware(self) -> Hardware:
        """The floor model's view of this machine (strata/policy/floor.py)."""
        return Hardware(
            name=self.machine, gpu_flops=self.gpu_flops, hbm_bytes_per_s=self.hbm_bytes_per_s,
            pcie_bytes_per_s=self.h2d_pinned, dram_bytes_per_s=self.dram_read_bytes_per_s,
            disk_bytes_per_s=self.disk_read_bytes_per_s, gpu_bytes=self.gpu_bytes, host_bytes=self.host_bytes,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, f"hardware profile has unknown fields {unknown}")
        if "machine" not in d or "measured_at" not in d:
            raise StrataError(ErrorKind.INVALID_ARGUMENT, "hardware profile needs 'machine' and 'measured_at'")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        clean = {k: (defaults[k] if v is None and k in defaults else v) for k, v in d.items()}  # null: absent
        return cls(**clean)


def load(path: str | os.PathLike) -> HardwareProfile:
    p = pathlib.Path(path)
    try:
        return HardwareProfile.from_dict(json.loads(p.read_text()))
    except FileNotFoundError:
        raise StrataError(ErrorKind.NOT_FOUND, f"hardware profile {str(p)!r} does not exist") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise StrataError(ErrorKind.INVALID_ARGUMENT, f"hardware profile {str(p)!r} is not valid: {e}") from None


def save(profile: HardwareProfile, path: str | os.PathLike) -> pathlib.Path:
    """Writes atomically (temporary file, then rename)."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(p)
    return p


def default_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """profile-<hostname>.json in `cache_dir`, else at the cache root (strata/runtime/paths.py)."""
    base = pathlib.Path(cache_dir) if cache_dir else paths.cache_root()
    return base / f"profile-{socket.gethostname()}.json"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

"""`strata profile` through the real CLI (a subprocess), the disk measurement, and
`load_profile`: a stale or missing cached profile is measured on first use."""

from __future__ import annotations

import dataclasses
import pathlib
import socket
import sys

import pytest

from serving import strata
from strata.policy import hardware

ROOT = pathlib.Path(__file__).parents[2]
PROFILE = ROOT / "bench" / "profiles" / "nvidia-h100-x1.json"
GIB = 1 << 30


def test_a_stale_or_missing_profile_is_measured_on_first_use(tmp_path, monkeypatch):
    from deploy import profile_cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = dataclasses.replace(hardware.load(PROFILE), measured_at=hardware.today(), machine="measured")
    calls = []
    monkeypatch.setattr(profile_cli, "measure", lambda **kw: calls.append(kw) or fresh)
    prof, where = profile_cli.load_profile(None)
    assert prof.machine == "measured" and len(calls) == 1 and hardware.load(where) == fresh
    profile_cli.load_profile(None)
    assert len(calls) == 1  # cached now
    hardware.save(dataclasses.replace(fresh, measured_at="2020-01-01T00:00:00+00:00"), where)
    profile_cli.load_profile(None)
    assert len(calls) == 2  # stale: measured again


def test_profile_quick_writes_a_valid_profile(tmp_path):
    out = tmp_path / "prof.json"
    r = strata("profile", "--quick", "--output", str(out))
    assert r.returncode == 0, r.stderr
    prof = hardware.load(out)
    assert prof.machine == socket.gethostname() and not prof.is_stale()
    assert prof.dram_read_bytes_per_s > 0 and prof.cpu_attention_bytes_per_s > 0
    # the KV store's kernel over quantized caches too, and which kernel that was
    assert prof.cpu_attention_int8_bytes_per_s > 0 and prof.cpu_attention_int4_bytes_per_s > 0
    assert prof.cpu_attention_kernel in ("native", "sdpa")
    assert prof.disk_read_bytes_per_s > 0 and prof.host_bytes > GIB and prof.cpu_cores >= 1
    import torch

    if not torch.cuda.is_available():
        assert prof.gpu_bytes == 0 and prof.gpu_flops == 0 and not prof.has_gpu
        assert "no CUDA GPU" in prof.source
    else:
        assert prof.has_gpu and prof.h2d_pinned > prof.h2d_pageable > 0
    assert not list(tmp_path.glob("strata-profile-*"))  # the disk test file is gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT")
def test_disk_read_is_measured_in_the_given_directory(tmp_path):
    from deploy.profile_cli import measure_disk

    rate, how = measure_disk(quick=True, directory=str(tmp_path))
    assert rate > 0 and how.startswith(("pread", "kvikio"))  # the weight store's reader backend
    assert not list(tmp_path.iterdir())

"""compute_node/kernels/cuda_build.py: the project's CUDA sources build with nvcc into
libraries exporting their launchers (once, nothing half-written left), and a Launcher
is loaded for each GPU's architecture, typed and looked up once per device. Where nvcc
exists; no GPU needed."""

from __future__ import annotations

import ctypes

import pytest
import torch

from compute_node.kernels import cuda_build, w4a16_mma, w4a16_wgmma

HAVE_NVCC = cuda_build.nvcc() is not None


@pytest.mark.skipif(not HAVE_NVCC, reason="nvcc is not installed")
@pytest.mark.parametrize("name, arch, symbol", [("w4a16_mma", "90", "strata_w4a16_m64"),
                                                ("w4a16_wgmma", "90a", "strata_w4a16_wgmma")])
def test_source_builds_and_exports_its_entry_point(tmp_path, monkeypatch, name, arch, symbol):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    path = cuda_build.build(name, arch, cuda_build.nvcc())
    assert path.parent == tmp_path / "kernels" and path.exists()
    assert cuda_build.build(name, arch, cuda_build.nvcc()) == path  # built once
    assert hasattr(ctypes.CDLL(str(path)), symbol)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.skipif(not HAVE_NVCC, reason="needs nvcc")
def test_launcher_is_typed_and_looked_up_once_per_device(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    caps = {0: (9, 0), 1: (8, 0)}
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or caps[i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel = w4a16_wgmma._KERNEL
    launcher = cuda_build.Launcher(kernel.name, kernel.symbol, kernel.argtypes, kernel.arch_for)
    fn = launcher.on(torch.device("cuda"))
    assert fn is not None and fn.argtypes == kernel.argtypes and fn.restype is ctypes.c_int
    assert launcher.on(torch.device("cuda", 0)) is fn and asked == [0]  # looked up once
    assert launcher.on(torch.device("cuda", 1)) is None  # sm_80: no wgmma
    assert w4a16_mma._KERNEL.arch_for((8, 6)) == "86" and w4a16_mma._KERNEL.arch_for((7, 5)) is None

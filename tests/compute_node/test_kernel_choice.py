"""The W4A16 kernel choice (compute_node/kernels/choice.py), made once at the compute
node's start from its run plan and device, and the per-shape decision `int4_linear`
caches under it (w4a16.decide): which CUDA kernel a shape may take, in what order,
without the environment. CPU only: the CUDA kernels are stand-ins here."""

from __future__ import annotations

import os
import types

import pytest
import torch

import tiny_models
from compute_node.kernels import choice, w4a16, w4a16_mma, w4a16_wgmma
from compute_node.kernels.choice import KernelChoice
from compute_node.kernels.w4a16 import MERGED_QKV, PackedInt4
from in_process import InProcess
from strata.model import quant
from strata.policy.run_plan import RunPlan

CUDA = types.SimpleNamespace(type="cuda", index=0)  # a stand-in device: only its type is read here


def test_the_plan_allows_both_kernels_by_default_and_each_can_be_switched_off():
    assert KernelChoice.from_plan(RunPlan(num_layers=2)) == KernelChoice() == choice.DEFAULT
    assert KernelChoice().names == ("wgmma", "mma")  # the order they are tried
    off = KernelChoice.from_plan(RunPlan(num_layers=2, w4a16_wgmma=False))
    assert off == KernelChoice(wgmma=False, mma=True) and off.names == ("mma",)
    assert KernelChoice.from_plan(RunPlan(num_layers=2, w4a16_wgmma=False, w4a16_mma=False)) == choice.NONE
    assert choice.NONE.names == ()
    with pytest.raises(TypeError, match="must be a bool"):
        KernelChoice(wgmma="0")


def test_the_environment_switches_are_gone(monkeypatch):
    monkeypatch.setenv("STRATA_W4A16_MMA", "0")
    monkeypatch.setenv("STRATA_W4A16_WGMMA", "0")
    assert KernelChoice.from_plan(RunPlan(num_layers=2)).names == ("wgmma", "mma")
    assert not hasattr(w4a16_mma, "enabled") and not hasattr(w4a16_wgmma, "enabled")


def test_on_device_keeps_what_is_built_there_and_builds_only_what_is_allowed(monkeypatch):
    built = []
    monkeypatch.setattr(w4a16_wgmma, "prepare", lambda d: built.append("wgmma") or False)  # not sm_90
    monkeypatch.setattr(w4a16_mma, "prepare", lambda d: built.append("mma") or True)
    assert KernelChoice().on_device(CUDA) == KernelChoice(wgmma=False, mma=True)
    assert sorted(built) == ["mma", "wgmma"]
    built.clear()
    assert KernelChoice(mma=False).on_device(CUDA) == choice.NONE and built == ["wgmma"]
    built.clear()
    assert KernelChoice().on_device(torch.device("cpu")) == choice.NONE and built == []  # nothing built off CUDA


def test_report_is_the_stats_kernel_names():
    assert KernelChoice(wgmma=False).report() == {"w4a16_wgmma": False, "w4a16_mma": True}


@pytest.mark.parametrize("n, k", [(7168, 7168), (21504, 7168), (28672, 7168), (7168, 28672), (384, 512),
                                  (256, 1024), (4096, 128)])
def test_a_bucket_of_rows_decides_as_its_rows_would(n, k):
    """pick_config for the bucket is pick_config for the rows; MMA only where a CUDA
    kernel takes the shape at all (K = 128 here: none)."""
    for m in range(1, 300):
        want = w4a16.pick_config(m, n, k, 64, 132)
        want["MMA"] = want["MMA"] and w4a16_mma.shape_fits(n, k, 64)
        assert dict(w4a16.decide(w4a16.rows_bucket(m), n, k, 64, 132)) == want, m


def test_the_decision_is_made_once_read_only_and_follows_the_choice():
    first = w4a16.decide(64, 1024, 2048, 64, 132)
    assert first["MMA"] and w4a16.decide(64, 1024, 2048, 64, 132) is first  # cached
    with pytest.raises(TypeError):
        first["MMA"] = False  # type: ignore[index]
    assert not w4a16.decide(64, 1024, 2048, 64, 132, choice.NONE)["MMA"]  # straight to Triton
    assert w4a16.decide(64, 1024, 2048, 64, 132, KernelChoice(wgmma=False))["MMA"]
    assert not w4a16.decide(64, 1088, 2048, 64, 132)["MMA"]  # N not a multiple of 128: no CUDA kernel takes it
    assert not w4a16.decide(64, 1024, 1152, 64, 132)["MMA"]  # K not a multiple of 512


@pytest.fixture
def fake_kernels(monkeypatch):
    """Both CUDA kernels replaced: `takes` says which accept the problem; calls recorded."""
    calls: list[str] = []
    takes = {"wgmma": True, "mma": True}
    for name, module in choice.MODULES.items():
        monkeypatch.setattr(module, "supports", lambda *a, _n=name: calls.append(f"supports:{_n}") or takes[_n])
        monkeypatch.setattr(module, "linear", lambda *a, _n=name: calls.append(f"linear:{_n}") or _n)
    return calls, takes


def _cuda_linear(kernels: KernelChoice, **cfg):
    x = torch.zeros(64, 512, dtype=torch.bfloat16)
    data, scale, w_min = quant.quantize(torch.randn(256, 512), 4, 64)
    return w4a16._cuda_linear(x, data, scale, w_min, 64, None, 132, {**w4a16.pick_config(64, 256, 512, 64), **cfg},
                              kernels)


def test_the_allowed_kernels_are_tried_in_order(fake_kernels):
    calls, takes = fake_kernels
    assert _cuda_linear(KernelChoice()) == "wgmma" and calls == ["supports:wgmma", "linear:wgmma"]
    calls.clear()
    takes["wgmma"] = False  # e.g. not built for this GPU
    assert _cuda_linear(KernelChoice()) == "mma" and calls == ["supports:wgmma", "supports:mma", "linear:mma"]
    calls.clear()
    takes["wgmma"] = True
    assert _cuda_linear(KernelChoice(wgmma=False)) == "mma" and calls == ["supports:mma", "linear:mma"]
    calls.clear()
    assert _cuda_linear(choice.NONE) is None and calls == []  # the Triton kernel then
    assert _cuda_linear(KernelChoice(wgmma=False), MMA_KERNEL="wgmma") is None and calls == []
    assert _cuda_linear(KernelChoice(), MMA_KERNEL="mma") == "mma" and calls == ["supports:mma", "linear:mma"]


class _Watched(dict):
    """os.environ that records the names read."""

    def __init__(self, env, seen):
        super().__init__(env)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.append(key)
        return super().__getitem__(key)


def test_a_matmul_reads_no_environment(monkeypatch, fake_kernels):
    seen: list[str] = []
    monkeypatch.setattr(os, "environ", _Watched(os.environ, seen))
    _cuda_linear(KernelChoice())
    w4a16.decide(64, 3072, 4096, 64, 96, KernelChoice(wgmma=False))  # a shape not decided before
    gen = torch.Generator().manual_seed(0)
    data, scale, w_min = quant.quantize(torch.randn(64, 128, generator=gen), 4, 64)
    PackedInt4(data, scale, w_min, 64, choice.NONE).linear(torch.randn(3, 128, dtype=torch.bfloat16), None)
    assert seen == []


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_models.converted("opt", tmp_path_factory, bits=4, group_size=32)[1]


def test_the_layers_carry_the_node_s_choice(shards):
    mine = KernelChoice(wgmma=False)
    lw = InProcess(shards, packed_resident=True, fused_max_rows=4, kernels=mine).weights
    packed = [v for v in lw.get(0, rows=4).values() if isinstance(v, PackedInt4)]
    merged = lw.get(0, rows=4).get(MERGED_QKV)
    if merged is not None:
        packed.append(merged[0])
    assert packed and all(p.kernels is mine for p in packed)
    default = InProcess(shards, packed_resident=True, fused_max_rows=4).weights
    assert all(v.kernels is choice.DEFAULT for v in default.get(0, rows=4).values() if isinstance(v, PackedInt4))

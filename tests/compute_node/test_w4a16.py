"""compute_node.kernels.w4a16.int4_linear against strata.model.quant.dequantize + F.linear.

The Triton kernel itself runs under Triton's CPU interpreter in a subprocess (so
TRITON_INTERPRET=1 does not leak into this process), or on CUDA when there is a GPU;
both skip cleanly when Triton is not importable. The fallback and the argument checks
need neither."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from compute_node.kernels.w4a16 import int4_linear
from strata.model import quant

ROOT = pathlib.Path(__file__).resolve().parents[2]
try:  # CI installs only pyproject's dependencies: no triton there
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - ImportError, or a broken install
    HAVE_TRITON = False

# (M, N, K, group_size, dtype, bias, config overrides)
CASES = [
    (1, 128, 128, 64, "bfloat16", False, None),
    (5, 192, 256, 64, "bfloat16", True, None),
    (16, 128, 256, 64, "float16", True, None),
    (33, 192, 256, 64, "float16", False, None),
    (33, 192, 256, 64, "bfloat16", True, {"SPLIT_K": 2}),
    (5, 128, 256, 64, "float16", True, {"ALGEBRAIC": True}),
    (16, 192, 256, 64, "bfloat16", False, {"ALGEBRAIC": True, "SWAP": True, "SPLIT_K": 4}),
    (33, 128, 128, 64, "bfloat16", True, {"SWAP": True, "BLOCK_K": 128, "BLOCK_M": 32}),
    (5, 128, 256, 128, "float16", True, {"BLOCK_K": 64, "SPLIT_K": 2}),
    (5, 192, 256, 32, "bfloat16", True, {"BLOCK_K": 128, "ALGEBRAIC": True, "BLOCK_N": 64}),
    (33, 192, 256, 64, "bfloat16", True, {"JOIN": True, "SPLIT_K": 2}),
    (5, 256, 256, 64, "float16", False, {"JOIN": True, "SWAP": True, "BLOCK_N": 256}),
    (16, 192, 256, 64, "bfloat16", True, {"JOIN": True, "ALGEBRAIC": True, "SWAP": True}),
    (33, 128, 256, 128, "float16", True, {"JOIN": True, "ALGEBRAIC": True, "BLOCK_K": 128}),
    (33, 192, 512, 64, "bfloat16", True, {"WIDE": True, "BLOCK_K": 128, "ASM": True}),
    (16, 128, 512, 64, "float16", False, {"WIDE": True, "BLOCK_K": 256, "SPLIT_K": 2, "ASM": True}),
    (5, 256, 512, 64, "bfloat16", True, {"WIDE": True, "BLOCK_K": 256, "SWAP": True, "BLOCK_N": 256}),
    (33, 128, 256, 128, "bfloat16", False, {"WIDE": True, "BLOCK_K": 64, "ASM": True}),
]
TOL = {"float16": 3e-3, "bfloat16": 2e-2}  # max |y - ref| / max |ref|; output rounding dominates


def reference(x, data, scale, w_min, group_size, bias):
    w = quant.dequantize(data, scale, w_min, 4, group_size, out_dtype=torch.float32)
    y = F.linear(x.float(), w)
    return y if bias is None else y + bias.float()


def cuda_problem(m, n, k, dt, has_bias):
    """A seeded W4A16 problem on CUDA, groups of 64: (x [m, k], data, scale, w_min, bias)."""
    gen = torch.Generator().manual_seed(m + n + k)
    dtype = getattr(torch, dt)
    data, scale, w_min = (t.cuda() for t in quant.quantize(torch.randn(n, k, generator=gen) * 0.05, 4, 64))
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype).cuda() if has_bias else None
    return x, data, scale, w_min, bias


def assert_matches_reference(y, x, data, scale, w_min, bias, dt):
    """y is x @ W^T + bias in x's dtype and shape [m, n], within TOL[dt] of `reference`."""
    ref = reference(x, data, scale, w_min, 64, bias)
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert err < TOL[dt], err


def run_cases(device: str) -> list[dict]:
    """Run CASES with int4_linear on `device`; one result dict per case."""
    results = []
    gen = torch.Generator().manual_seed(0)
    for m, n, k, g, dt, has_bias, cfg in CASES:
        dtype = getattr(torch, dt)
        w = torch.randn(n, k, generator=gen) * 0.05
        data, scale, w_min = (t.to(device) for t in quant.quantize(w, 4, g))
        x = torch.randn(m, k, generator=gen).to(dtype).to(device)
        bias = (torch.randn(n, generator=gen) * 0.1).to(dtype).to(device) if has_bias else None
        y = int4_linear(x, data, scale, w_min, g, bias, config=cfg)
        ref = reference(x, data, scale, w_min, g, bias)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        results.append({"case": [m, n, k, g, dt, has_bias, cfg], "err": err, "dtype": str(y.dtype),
                        "shape": list(y.shape), "ok": y.dtype == dtype and list(y.shape) == [m, n] and err < TOL[dt]})
    # leading dims are flattened, a strided x works
    x = torch.randn(2, 3, 2 * 128, generator=gen).to(torch.bfloat16).to(device)[..., ::2]
    data, scale, w_min = (t.to(device) for t in quant.quantize(torch.randn(64, 128, generator=gen) * 0.05, 4, 64))
    y = int4_linear(x, data, scale, w_min, 64)
    ref = reference(x, data, scale, w_min, 64, None)
    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
    results.append({"case": "3-D strided x", "err": err, "shape": list(y.shape),
                    "ok": list(y.shape) == [2, 3, 64] and err < TOL["bfloat16"]})
    return results


def _check(results: list[dict]) -> None:
    bad = [r for r in results if not r["ok"]]
    assert not bad, "\n".join(json.dumps(r) for r in bad)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel is tested instead")
def test_kernel_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests" / "compute_node"), os.environ.get("PYTHONPATH", "")]))
    code = ("import json, test_w4a16 as t\n"
            "from compute_node.kernels import w4a16\n"
            "if w4a16.triton is None:\n"
            "    print('NO_TRITON')\n"
            "else:\n"
            "    print('RESULTS', json.dumps(t.run_cases('cpu')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    if "NO_TRITON" in proc.stdout.split():
        pytest.skip("triton is not importable in the subprocess")
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    _check(json.loads(line[len("RESULTS "):]))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_kernel_cuda():
    _check(run_cases("cuda"))


def test_fallback_cpu_matches_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(1)
    data, scale, w_min = quant.quantize(torch.randn(64, 128, generator=gen), 4, 64)
    x = torch.randn(2, 3, 128, generator=gen).to(torch.bfloat16)
    bias = torch.randn(64, generator=gen).to(torch.bfloat16)
    y = int4_linear(x, data, scale, w_min, 64, bias)
    w = quant.dequantize(data, scale, w_min, 4, 64, out_dtype=torch.bfloat16)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, w, bias))


@pytest.mark.parametrize("change, message", [
    ({"data": torch.zeros(64, 64, dtype=torch.int8)}, "data must be 2-D uint8"),
    ({"x": torch.zeros(4, 96)}, "last dim 96 != K 128"),
    ({"scale": torch.zeros(64, 3, dtype=torch.float16)}, "scale must have shape"),
    ({"w_min": torch.zeros(32, 2, dtype=torch.float16)}, "w_min must have shape"),
    ({"bias": torch.zeros(63)}, "bias must have shape"),
    ({"group_size": 48}, "not a multiple of group_size"),
    ({"group_size": 0}, "group_size must be a positive int"),
    ({"x": torch.zeros(4, 128, dtype=torch.int32)}, "x must be floating point"),
])
def test_argument_errors(change, message):
    args = {"x": torch.zeros(4, 128, dtype=torch.float16), "data": torch.zeros(64, 64, dtype=torch.uint8),
            "scale": torch.ones(64, 2, dtype=torch.float16), "w_min": torch.zeros(64, 2, dtype=torch.float16),
            "group_size": 64, "bias": None}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        int4_linear(**args)

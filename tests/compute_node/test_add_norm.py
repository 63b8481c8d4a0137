"""The fused norm kernel (compute_node/kernels/add_norm.py) against the torch ops the
model runs without it (model.torch_norm and the residual add): on a CUDA device with
Triton; elsewhere, that the model's norms are those torch ops and equal transformers'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compute_node import model
from compute_node.kernels import add_norm

ON_CUDA = torch.cuda.is_available() and add_norm.triton is not None


def ulps(dtype) -> float:
    return {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-20}[dtype]


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device with Triton")
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 7168), (65, 16384), (2, 1, 100)])
def test_the_kernel_equals_the_torch_ops(shape, dtype, rms):
    g = torch.Generator(device="cuda").manual_seed(0)
    h, a = (torch.randn(shape, generator=g, device="cuda").to(dtype) * 3 for _ in range(2))
    w = torch.randn(shape[-1], generator=g, device="cuda").to(dtype)
    b = None if rms else torch.randn(shape[-1], generator=g, device="cuda").to(dtype)
    s, y = add_norm.add_norm(h, a, w, b, 1e-5, rms)
    assert torch.equal(s, h + a)  # the sum is torch's, bit for bit
    want = model.torch_norm(h + a, w, b, 1e-5, rms)
    scale = want.float().abs().max().item()
    torch.testing.assert_close(y.float(), want.float(), rtol=0, atol=2 * ulps(dtype) * scale)
    alone = add_norm.norm(h, w, b, 1e-5, rms)
    torch.testing.assert_close(alone.float(), model.torch_norm(h, w, b, 1e-5, rms).float(), rtol=0,
                               atol=2 * ulps(dtype) * scale)


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device with Triton")
def test_strided_rows_and_no_affine():
    x = torch.randn(8, 2, 512, device="cuda", dtype=torch.bfloat16)[:, 0]  # rows 1024 elements apart
    y = add_norm.norm(x, None, None, 1e-5, rms=False)
    torch.testing.assert_close(y.float(), F.layer_norm(x, (512,)).float(), rtol=0, atol=0.05)
    with pytest.raises(ValueError, match="RMSNorm needs its weight"):
        add_norm.norm(x, None, None, 1e-5, rms=True)
    with pytest.raises(ValueError, match="differ"):
        add_norm.add_norm(x, x.float(), None, None, 1e-5, rms=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_off_cuda_the_model_runs_the_torch_ops_and_they_are_transformers_norms(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (torch.randn(4, 3, 64) * 3).to(dtype)
    w = {"n.weight": torch.randn(64).to(dtype), "n.bias": torch.randn(64).to(dtype)}
    assert not add_norm.available(x)
    layer_norm = torch.nn.LayerNorm(64, eps=1e-5).to(dtype)
    rms_norm = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        layer_norm.weight.copy_(w["n.weight"])
        layer_norm.bias.copy_(w["n.bias"])
        rms_norm.weight.copy_(w["n.weight"])
        assert torch.equal(model._layer_norm(x, w, "n", 1e-5), layer_norm(x))
        assert torch.equal(model._rms_norm(x, w, "n", 1e-6), rms_norm(x))

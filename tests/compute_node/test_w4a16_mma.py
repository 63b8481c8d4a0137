"""The register-fed CUDA W4A16 kernel (compute_node/kernels/w4a16_mma.cu).

On a CUDA GPU with nvcc: the kernel against strata.model.quant.dequantize + F.linear, over
dtypes, row counts, both block widths, split-K and bias, directly and through
int4_linear. Without a GPU: the launch shapes. The build: test_cuda_build.py."""

from __future__ import annotations

import pytest
import torch

from compute_node.kernels import cuda_build, w4a16_mma
from compute_node.kernels.w4a16 import int4_linear, pick_config
from strata.model import quant
from test_w4a16 import TOL, assert_matches_reference, cuda_problem, reference

HAVE_NVCC = cuda_build.nvcc() is not None
ON_GPU = torch.cuda.is_available() and HAVE_NVCC

# (M, N, K, dtype, bias, warps, stages, split): 0 = the launch_shape default
CASES = [
    (64, 256, 512, "bfloat16", False, 0, 0, 0),
    (64, 512, 2048, "bfloat16", True, 8, 4, 1),
    (64, 384, 1024, "float16", True, 4, 3, 2),
    (49, 256, 4096, "bfloat16", True, 8, 3, 3),
    (33, 128, 1536, "float16", False, 4, 4, 0),
    (64, 1024, 3072, "bfloat16", True, 4, 3, 6),
    (1, 256, 512, "bfloat16", True, 8, 0, 1),
    (64, 256, 8192, "float16", True, 8, 4, 1),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and nvcc")
@pytest.mark.parametrize("m, n, k, dt, has_bias, warps, stages, split", CASES)
def test_kernel_matches_reference(m, n, k, dt, has_bias, warps, stages, split):
    x, data, scale, w_min, bias = cuda_problem(m, n, k, dt, has_bias)
    assert w4a16_mma.supports(x, data, scale, w_min, 64, bias)
    y = w4a16_mma.linear(x, data, scale, w_min, bias, num_sms=132, warps=warps, split=split,
                         stages=stages)
    assert_matches_reference(y, x, data, scale, w_min, bias, dt)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and nvcc")
def test_int4_linear_takes_the_kernel_at_64_rows_and_agrees_with_triton():
    gen = torch.Generator().manual_seed(3)
    data, scale, w_min = (t.cuda() for t in quant.quantize(torch.randn(512, 1024, generator=gen) * 0.05, 4, 64))
    x = torch.randn(2, 32, 1024, generator=gen).to(torch.bfloat16).cuda()  # 64 rows once flattened
    assert pick_config(64, 512, 1024, 64)["MMA"]
    y = int4_linear(x, data, scale, w_min, 64)
    y_triton = int4_linear(x, data, scale, w_min, 64, config={"MMA": False})
    ref = reference(x.reshape(64, 1024), data, scale, w_min, 64, None).reshape(2, 32, 512)
    for out in (y, y_triton):
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < TOL["bfloat16"]


def test_unsupported_problems_are_declined():
    x = torch.zeros(64, 512, dtype=torch.bfloat16)
    data, scale, w_min = quant.quantize(torch.randn(256, 512), 4, 64)
    assert not w4a16_mma.supports(x, data, scale, w_min, 64, None)  # CPU tensors
    if torch.cuda.is_available():
        dev = [t.cuda() for t in (x, data, scale, w_min)]
        assert not w4a16_mma.supports(dev[0][:, :448], *dev[1:], 64, None)  # K not a multiple of 512
        assert not w4a16_mma.supports(torch.cat([dev[0], dev[0][:1]]), *dev[1:], 64, None)  # 65 rows


@pytest.mark.parametrize("n, k", [(7168, 7168), (21504, 7168), (28672, 7168), (7168, 28672), (384, 512),
                                  (128, 1536), (12288, 49152)])
@pytest.mark.parametrize("warps, split, stages", [(0, 0, 0), (4, 0, 3), (4, 3, 4), (8, 5, 3)])
def test_launch_shape_covers_k_with_no_empty_split(n, k, warps, split, stages):
    if warps == 8 and n % 256:
        warps = 4
    w, st, per_split, splits = w4a16_mma.launch_shape(n, k, 132, warps, split, stages)
    chunks = k // w4a16_mma.CHUNK_K
    assert (w, st) in w4a16_mma._BLOCKS_PER_SM and n % (32 * w) == 0
    assert per_split * (splits - 1) < chunks <= per_split * splits  # every chunk once, the last split non-empty
    if split:
        assert splits <= split

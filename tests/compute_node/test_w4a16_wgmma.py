"""The wgmma W4A16 kernel (compute_node/kernels/w4a16_wgmma.cu, sm_90a).

On an sm_90 GPU with nvcc: the kernel against strata.model.quant.dequantize + F.linear over
dtypes, row counts, its block shapes, ring depths, split-K and bias, directly and through
int4_linear. Everywhere: the launch shapes and split rule. The build and the launcher
lookup: test_cuda_build.py."""

from __future__ import annotations

import pytest
import torch

from compute_node.kernels import cuda_build, w4a16, w4a16_mma, w4a16_wgmma
from compute_node.kernels.choice import KernelChoice
from compute_node.kernels.w4a16 import int4_linear
from strata.model import quant
from test_w4a16 import TOL, assert_matches_reference, cuda_problem, reference

HAVE_NVCC = cuda_build.nvcc() is not None
ON_SM90 = torch.cuda.is_available() and HAVE_NVCC and torch.cuda.get_device_capability() == (9, 0)

# (M, N, K, dtype, bias, warpgroups, tiles, stages, split): 0 = the launch_shape default
CASES = [
    (64, 256, 512, "bfloat16", False, 0, 0, 0, 0),
    (64, 512, 2048, "bfloat16", True, 2, 2, 6, 1),
    (64, 384, 1024, "float16", True, 2, 1, 8, 2),
    (49, 256, 4096, "bfloat16", True, 1, 2, 6, 3),
    (33, 128, 1536, "float16", False, 0, 0, 0, 0),
    (64, 1024, 3072, "bfloat16", True, 2, 2, 6, 6),
    (1, 256, 512, "bfloat16", True, 2, 1, 6, 1),
    (64, 256, 8192, "float16", True, 2, 1, 8, 1),
    (17, 768, 7168, "bfloat16", False, 0, 0, 0, 0),
    # 65-128 rows: 128 rows of X a block (wgmma's n = 128)
    (128, 256, 512, "bfloat16", False, 0, 0, 0, 0),
    (100, 512, 2048, "float16", True, 2, 1, 6, 1),
    (65, 512, 1024, "bfloat16", True, 4, 1, 4, 2),
    (128, 384, 1536, "bfloat16", True, 1, 2, 4, 0),
    (97, 1024, 3072, "bfloat16", False, 2, 1, 4, 3),
    (128, 7168, 7168, "bfloat16", True, 0, 0, 0, 0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU and nvcc")
@pytest.mark.parametrize("m, n, k, dt, has_bias, wg, tm, stages, split", CASES)
def test_kernel_matches_reference(m, n, k, dt, has_bias, wg, tm, stages, split):
    x, data, scale, w_min, bias = cuda_problem(m, n, k, dt, has_bias)
    assert w4a16_wgmma.supports(x, data, scale, w_min, 64, bias)
    y = w4a16_wgmma.linear(x, data, scale, w_min, bias, num_sms=132, wg=wg, tm=tm, stages=stages, split=split)
    assert_matches_reference(y, x, data, scale, w_min, bias, dt)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU and nvcc")
def test_int4_linear_takes_wgmma_on_sm90_and_agrees_with_the_others(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    data, scale, w_min = (t.cuda() for t in quant.quantize(torch.randn(512, 1024, generator=gen) * 0.05, 4, 64))
    x = torch.randn(2, 32, 1024, generator=gen).to(torch.bfloat16).cuda()  # 64 rows once flattened
    calls = []
    real = w4a16_wgmma.linear
    monkeypatch.setattr(w4a16_wgmma, "linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = [int4_linear(x, data, scale, w_min, 64)]
    assert calls == [1]
    outs += [int4_linear(x, data, scale, w_min, 64, config={"MMA_KERNEL": "mma"}),
             int4_linear(x, data, scale, w_min, 64, config={"MMA": False}),
             int4_linear(x, data, scale, w_min, 64, kernels=KernelChoice(wgmma=False)),  # mma.sync
             int4_linear(x, data, scale, w_min, 64, kernels=KernelChoice(wgmma=False, mma=False))]  # Triton
    assert calls == [1]
    ref = reference(x.reshape(64, 1024), data, scale, w_min, 64, None).reshape(2, 32, 512)
    for out in outs:
        assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < TOL["bfloat16"]
    assert KernelChoice().on_device(x.device) == KernelChoice()  # both built on sm_90


def test_unsupported_problems_are_declined():
    x = torch.zeros(64, 512, dtype=torch.bfloat16)
    data, scale, w_min = quant.quantize(torch.randn(256, 512), 4, 64)
    assert not w4a16_wgmma.supports(x, data, scale, w_min, 64, None)  # CPU tensors
    with pytest.raises(ValueError, match="MMA_KERNEL"):
        w4a16._cuda_linear(x, data, scale, w_min, 64, None, 132, dict(w4a16.pick_config(64, 256, 512, 64),
                                                                        MMA_KERNEL="tensor"))


@pytest.mark.parametrize("n, k", [(7168, 7168), (21504, 7168), (28672, 7168), (7168, 28672), (384, 512),
                                  (128, 1536), (12288, 49152)])
@pytest.mark.parametrize("m, wg, tm, stages, split", [(64, 0, 0, 0, 0), (64, 1, 2, 6, 0), (64, 2, 1, 8, 3),
                                                      (64, 2, 2, 6, 5), (128, 0, 0, 0, 0), (100, 4, 1, 4, 0),
                                                      (128, 2, 1, 6, 3)])
def test_launch_shape_covers_k_with_no_empty_split(n, k, m, wg, tm, stages, split):
    if n % (64 * max(wg, 1) * max(tm, 1)):
        wg = tm = stages = 0
    g, t, st, per_split, splits = w4a16_wgmma.launch_shape(n, k, 132, wg, tm, stages, split, m)
    chunks = k // w4a16_mma.CHUNK_K
    assert (g, t, st) in w4a16_wgmma.SHAPES[w4a16_wgmma.tokens_for(m)] and n % (64 * g * t) == 0
    assert per_split * (splits - 1) < chunks <= per_split * splits  # every chunk once, the last split non-empty
    if split:
        assert splits <= split
    else:
        assert per_split >= min(w4a16_wgmma.MIN_CHUNKS_PER_SPLIT, chunks)


def test_split_rule_weighs_idle_slots_against_partials():
    # OPT-30B's out projection on 132 one-block SMs: 28 column blocks of 256 over 14
    # chunks. One split leaves 104 SMs idle for 14 chunks; 4 splits of 4 chunks take one
    # wave (112 blocks); 5 of 3 would take two.
    assert w4a16_wgmma.split_for(28, 14, 132, 256) == (4, 4)
    # fc1: 112 blocks fill 85% of a wave unsplit; splitting would add partials about as
    # large as the weights.
    assert w4a16_wgmma.split_for(112, 14, 132, 256) == (14, 1)
    assert w4a16_wgmma.split_for(1, 1, 132, 256) == (1, 1)



def test_rows_past_the_kernels_tile_split_evenly():
    from strata.policy.placement import FUSED_KERNEL_ROWS

    assert FUSED_KERNEL_ROWS == w4a16_wgmma.MAX_ROWS == 128  # the cost model reads the layer once a chunk of these
    assert w4a16_mma.MAX_ROWS == 64 and w4a16_wgmma.tokens_for(64) == 64 and w4a16_wgmma.tokens_for(65) == 128
    assert w4a16.row_chunks(128, 64) == [(0, 64), (64, 128)]
    assert w4a16.row_chunks(100, 64) == [(0, 50), (50, 100)]
    assert w4a16.row_chunks(64, 64) == [(0, 64)]
    spans = w4a16.row_chunks(257, 64)
    assert len(spans) == 5 and spans[0][0] == 0 and spans[-1][1] == 257
    assert all(z - a <= 64 and b == z for (a, z), (b, _) in zip(spans, spans[1:] + [(spans[-1][1], 0)]))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU and nvcc")
@pytest.mark.parametrize("m", [65, 128, 200, 300])
def test_int4_linear_runs_rows_past_64_on_the_cuda_kernel_in_chunks(monkeypatch, m):
    gen = torch.Generator().manual_seed(7)
    data, scale, w_min = (t.cuda() for t in quant.quantize(torch.randn(512, 1024, generator=gen) * 0.05, 4, 64))
    x = torch.randn(m, 1024, generator=gen).to(torch.bfloat16).cuda()
    bias = torch.randn(512, generator=gen).to(torch.bfloat16).cuda()
    calls = []
    real = w4a16_wgmma.linear
    monkeypatch.setattr(w4a16_wgmma, "linear", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    out = int4_linear(x, data, scale, w_min, 64, bias)
    # up to 128 rows a call on the wgmma kernel, larger batches in even chunks of at most 128
    assert sorted(calls) == sorted(z - a for a, z in w4a16.row_chunks(m, 128))
    ref = reference(x, data, scale, w_min, 64, bias)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < TOL["bfloat16"]
    triton = int4_linear(x, data, scale, w_min, 64, bias, kernels=KernelChoice(wgmma=False, mma=False))
    assert ((out.float() - triton.float()).abs().max() / ref.abs().max()).item() < TOL["bfloat16"]
    mma = int4_linear(x, data, scale, w_min, 64, bias, kernels=KernelChoice(wgmma=False))  # 64-row chunks
    assert ((out.float() - mma.float()).abs().max() / ref.abs().max()).item() < TOL["bfloat16"]

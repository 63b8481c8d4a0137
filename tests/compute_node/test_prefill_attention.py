"""Causal prefill attention (model.attend_causal) at the widths where cuDNN's kernel runs
first (CUDNN_MIN_TOKENS), on the packed layout the slots hand it (strata.transport.packed:
[m, heads, n, head_dim] views of the projections' [tokens, heads x head_dim] rows), with
and without grouped heads, against the math reference. On a CUDA device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from compute_node import model
from strata.transport import packed

ON_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (16, 4)])
@pytest.mark.parametrize("m,n", [(16, 256), (3, 100)])  # at and below CUDNN_MIN_TOKENS
def test_packed_causal_attention_matches_the_math_kernel(heads, kv_heads, m, n):
    d, dtype = 128, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(1)
    rows = [torch.randn(1, m * n, h * d, generator=g, device="cuda").to(dtype) for h in (heads, kv_heads, kv_heads)]
    q, k, v = (x.view(1, m * n, -1, d).transpose(1, 2) for x in rows)  # as model._heads
    qs, ks, vs = (packed.stacked(x, 0, m, n) for x in (q, k, v))
    got = model.attend_causal(qs, ks, vs, d**-0.5)
    with sdpa_kernel([SDPBackend.MATH]):
        want = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True, scale=d**-0.5,
                                              enable_gqa=kv_heads != heads)
    assert got.shape == (m, heads, n, d)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2)

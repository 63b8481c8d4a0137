"""The fused decode attention (compute_node/kernels/decode_attention.py): its torch
reference against plain softmax attention over the dequantized cache, and the Triton
kernel against the reference on a GPU (or, where Triton is installed, under its CPU
interpreter: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from compute_node.kernels import decode_attention as da
from strata.model.kv_quant import KVFormat

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_TRITON = da.triton is not None and (CUDA or INTERPRET)


def _cache(rows, kv_heads, columns, d, bits, dtype, device, gen):
    """K or V as a cache store holds it, and its dense float32 [rows, kv_heads, columns, d]."""
    x = torch.randn(rows, kv_heads, columns, d, generator=gen).to(dtype)
    if bits == 16:
        return da.CachePlanes(x.to(device)), x.float()
    fmt = KVFormat(bits, d, 64 if d % 64 == 0 else d)
    codes, scale, w_min = fmt.quantize(x.permute(2, 0, 1, 3))  # token-major, as kv_cache keeps it
    planes = da.CachePlanes(codes.to(device), fmt, scale.to(device), w_min.to(device))
    return planes, fmt.dequantize(codes, scale, w_min, torch.float32).permute(1, 2, 0, 3)


def _naive(q, keys, values, limit, scale, slopes=None):
    """Attention row by row over each row's own columns, float32."""
    rows, heads, _, d = q.shape
    group = heads // keys.shape[1]
    out = torch.empty(rows, heads, 1, d)
    for r in range(rows):
        n = int(limit[r]) + 1
        k = keys[r, :, :n].repeat_interleave(group, 0)
        v = values[r, :, :n].repeat_interleave(group, 0)
        s = (q[r].float() @ k.transpose(-1, -2)) * scale
        if slopes is not None:
            s = s + slopes.float()[:, None, None] * torch.arange(n).float()
        out[r] = torch.softmax(s, -1) @ v
    return out


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_reference_is_softmax_attention_over_each_rows_own_columns(bits, heads, kv_heads):
    gen = torch.Generator().manual_seed(bits + heads)
    rows, columns, d = 5, 40, 64
    k, kd = _cache(rows, kv_heads, columns, d, bits, torch.float32, "cpu", gen)
    v, vd = _cache(rows, kv_heads, columns, d, bits, torch.float32, "cpu", gen)
    q = torch.randn(rows, heads, 1, d, generator=gen)
    limit = torch.tensor([0, 7, 39, 20, 33])
    slopes = torch.linspace(0.1, 0.5, heads) if heads == 4 else None
    out = da.reference(q, k, v, limit, columns, 0.125, slopes)
    torch.testing.assert_close(out, _naive(q, kd, vd, limit, 0.125, slopes), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not RUN_TRITON, reason="needs a CUDA GPU with Triton (or TRITON_INTERPRET=1 with Triton)")
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (32, 2)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])  # one group a vector, two
def test_triton_kernel_matches_the_reference(bits, heads, kv_heads, splits, dtype, d):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter misreads bfloat16")
    device = torch.device("cuda" if CUDA else "cpu")
    gen = torch.Generator().manual_seed(7 * bits + heads + splits)
    rows, columns = 6, 300
    k, _ = _cache(rows, kv_heads, columns, d, bits, dtype, device, gen)
    v, _ = _cache(rows, kv_heads, columns, d, bits, dtype, device, gen)
    q = torch.randn(rows, heads, 1, d, generator=gen).to(dtype).to(device)
    limit = torch.tensor([0, 63, 64, 299, 150, 5], device=device)
    slopes = torch.linspace(0.01, 0.1, heads, device=device) if bits == 8 else None
    out = da._triton(q, k, v, limit, columns, d ** -0.5, slopes, splits=splits)
    ref = da.reference(q, k, v, limit, columns, d ** -0.5, slopes)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not RUN_TRITON, reason="needs a CUDA GPU with Triton (or TRITON_INTERPRET=1 with Triton)")
@pytest.mark.parametrize("bits", [8, 4])
def test_the_quantize_kernel_writes_kv_quants_codes_where_the_rows_and_columns_say(bits):
    """compute_node/kernels/kv_quantize.py against KVFormat.quantize: the same scale and
    min, codes within one step (float32 division may round differently on a GPU) in
    at most 0.1% of places, and nothing written outside the given rows and columns."""
    from compute_node.kernels import kv_quantize

    device = torch.device("cuda" if CUDA else "cpu")
    fmt = KVFormat(bits, 128, 64)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 2, 20, 128, generator=gen).to(device)
    rows, col0 = [4, 0, 2], [0, 5, 1]
    planes = [torch.zeros(32, 6, 2, w, dtype=t, device=device)
              for w, t in ((fmt.code_width, torch.uint8), (fmt.groups, torch.float16), (fmt.groups, torch.float16))]
    kv_quantize.quantize_into(x, fmt, *planes, torch.tensor(rows, device=device), torch.tensor(col0, device=device))
    want = fmt.quantize(x.cpu())  # [3, 2, 20, ...]
    written = torch.zeros(32, 6, dtype=torch.bool)
    for i, (r, c) in enumerate(zip(rows, col0)):
        got = [p[c : c + 20, r].cpu() for p in planes]  # [20, 2, ...]
        ref = [w[i].transpose(0, 1) for w in want]
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
        codes = [kv_quantize_unpack(g, bits) for g in (got[0], ref[0])]
        diff = (codes[0].int() - codes[1].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3
        written[c : c + 20, r] = True
    assert all(not p.cpu()[~written].any() for p in planes)


def kv_quantize_unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    from strata.model import quant

    return quant.unpack_int4(codes) if bits == 4 else codes

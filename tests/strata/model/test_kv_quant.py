"""strata/model/kv_quant.py: the quantized KV cache format (what one cached vector is stored as)."""

import pytest
import torch

from strata.model import kv_quant
from strata.model.kv_quant import KVFormat
from strata.runtime.errors import ErrorKind, StrataError


def kind_of(call) -> ErrorKind:
    with pytest.raises(StrataError) as e:
        call()
    return e.value.kind


def test_only_4_8_and_16_bits_are_kv_cache_widths():
    for bits in (4, 8, 16):
        kv_quant.check_bits(bits)
    for bits in (0, 2, 3, 32):
        assert kind_of(lambda: kv_quant.check_bits(bits)) == ErrorKind.INVALID_ARGUMENT


@pytest.mark.parametrize("head_dim,group", [(64, 64), (128, 64), (256, 64), (80, 80), (96, 96)])
def test_default_group_is_64_where_it_divides_head_dim_else_the_whole_vector(head_dim, group):
    assert kv_quant.default_group(head_dim) == group


@pytest.mark.parametrize("bits,head_dim,group", [(16, 64, 64), (4, 64, 48), (8, 64, 0), (8, 0, 8), (4, 7, 7),
                                                 (2, 64, 64)])
def test_formats_that_cannot_store_a_vector_are_refused(bits, head_dim, group):
    assert kind_of(lambda: KVFormat(bits, head_dim, group)) == ErrorKind.INVALID_ARGUMENT


@pytest.mark.parametrize("bits,head_dim,group,code_width,vector_bytes", [
    (8, 128, 64, 128, 128 + 2 * 4), (4, 128, 64, 64, 64 + 2 * 4), (4, 80, 80, 40, 40 + 4), (8, 64, 32, 64, 64 + 8)])
def test_stored_sizes_match_what_quantize_returns(bits, head_dim, group, code_width, vector_bytes):
    fmt = KVFormat(bits, head_dim, group)
    assert (fmt.code_width, fmt.groups, fmt.vector_bytes) == (code_width, head_dim // group, vector_bytes)
    codes, scale, w_min = fmt.quantize(torch.randn(3, head_dim))
    assert codes.dtype == torch.uint8 and scale.dtype == w_min.dtype == torch.float16
    stored = codes[0].numel() + scale[0].numel() * 2 + w_min[0].numel() * 2
    assert stored == fmt.vector_bytes


def test_leading_dims_are_kept():
    fmt = KVFormat(4, 64, 32)
    x = torch.randn(2, 3, 5, 64)
    codes, scale, w_min = fmt.quantize(x)
    assert codes.shape == (2, 3, 5, 32) and scale.shape == w_min.shape == (2, 3, 5, 2)
    assert fmt.dequantize(codes, scale, w_min, torch.float32).shape == x.shape


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 128])
def test_round_trip_error_is_within_half_a_step_of_each_group(bits, group):
    """Per element, |x - x'| <= step / 2 (step = the group's range / (2**bits - 1)), plus
    the float16 rounding of the stored scale and min."""
    fmt = KVFormat(bits, 128, group)
    g = torch.Generator().manual_seed(bits * 1000 + group)
    x = torch.randn(4, 8, 128, generator=g) * torch.logspace(-2, 1, 8).view(1, 8, 1) + 0.5
    back = fmt.dequantize(*fmt.quantize(x), torch.float32)
    groups = x.unflatten(-1, (128 // group, group))
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    fp16 = 2.0**-11
    bound = step / 2 + fp16 * ((hi - lo) + lo.abs()) + 1e-7
    err = (back.unflatten(-1, (128 // group, group)) - groups).abs()
    assert (err <= bound).all(), float((err / bound).max())
    assert err.mean() < (step / 2).mean()  # and it is a rounding, not a truncation


def test_int8_is_more_precise_than_int4():
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    err = {b: (KVFormat(b, 128, 64).dequantize(*KVFormat(b, 128, 64).quantize(x), torch.float32) - x).abs().max()
           for b in (4, 8)}
    assert err[8] * 8 < err[4]


def test_a_constant_vector_comes_back_exactly():
    fmt = KVFormat(4, 64, 64)
    x = torch.full((2, 64), 0.375)
    assert torch.equal(fmt.dequantize(*fmt.quantize(x), torch.float32), x)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_into_a_reused_buffer_gives_the_same_numbers(bits):
    fmt = KVFormat(bits, 128, 64)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    codes, scale, w_min = fmt.quantize(x)
    expected = fmt.dequantize(codes, scale, w_min, torch.float32)
    out = torch.full((3, 5, 128), float("nan"))
    nibbles = torch.empty_like(codes) if bits == 4 else None
    assert fmt.dequantize_into(codes, scale, w_min, out, nibbles) is out
    assert torch.equal(out, expected)
    out.fill_(float("nan"))
    assert torch.equal(fmt.dequantize_into(codes, scale, w_min, out), expected)  # without a nibble buffer
    assert torch.equal(fmt.dequantize(codes, scale, w_min, torch.bfloat16), expected.to(torch.bfloat16))

"""strata.model.quant: group-wise asymmetric min-max quantization, checked against DeepSpeed."""

import pytest
import torch

from strata.model import quant
from strata.runtime.errors import ErrorKind, StrataError


def _weight(out_features=96, in_features=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.05


def _codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    return quant.unpack_int4(data) if bits == 4 else data


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 64), (4, 32), (8, 128)])
def test_quantize_agrees_with_deepspeed_quantizer(bits, group_size):
    utils = pytest.importorskip("deepspeed.inference.quantization.utils")
    w = _weight()
    theirs = utils.Quantizer({"num_bits": bits, "group_size": group_size, "group_dim": 1, "symmetric": False})
    ds_data, ds_scale, ds_min = theirs.quantize(w.clone())

    data, scale, w_min = quant.quantize(w, bits, group_size)

    assert data.dtype == torch.uint8 and data.shape == ds_data.shape
    ours, ref = _codes(data, bits).int(), _codes(ds_data, bits).int()
    differ = ours != ref
    assert (ours - ref).abs().max() <= 1  # only ties at .5 (x/s vs x*(1/s)) may differ
    assert differ.float().mean() < 1e-3
    groups = w.shape[1] // group_size
    assert torch.equal(w_min, ds_min.reshape(w.shape[0], groups).to(torch.float16))
    torch.testing.assert_close(scale.float(), 1.0 / ds_scale.reshape(w.shape[0], groups), rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_error_is_at_most_half_a_step(bits):
    w = _weight(seed=1)
    data, scale, w_min = quant.quantize(w, bits, 64)
    back = quant.dequantize(data, scale, w_min, bits, 64, out_dtype=torch.float32)
    assert back.shape == w.shape and back.dtype == torch.float32
    step = scale.float().repeat_interleave(64, dim=1)
    # scale and min are stored as float16: allow their rounding (relative 2**-11) on top.
    fp16_slack = (w_min.float().abs().repeat_interleave(64, dim=1) + (2**bits - 1) * step) * 2**-11
    assert ((back - w).abs() <= step / 2 + fp16_slack).all()


def test_round_trip_of_float16_input_returns_float16():
    w = _weight(seed=2).half()
    back = quant.dequantize(*quant.quantize(w, 8, 64), 8, 64)
    assert back.dtype == torch.float16
    assert (back.float() - w.float()).abs().max() < 1e-3


def test_int4_packs_even_index_in_high_nibble():
    # One group [min .. max] in 15 equal steps: codes are exactly 0, 1, ..., 15.
    w = torch.arange(16, dtype=torch.float32).reshape(1, 16)
    data, scale, w_min = quant.quantize(w, 4, 16)
    assert data.shape == (1, 8)
    assert data[0].tolist() == [(2 * k) << 4 | (2 * k + 1) for k in range(8)]
    assert scale.item() == 1.0 and w_min.item() == 0.0


def test_int8_data_is_one_code_per_byte():
    w = torch.arange(256, dtype=torch.float32).reshape(2, 128)
    data, _, _ = quant.quantize(w, 8, 128)
    assert data.shape == (2, 128) and data.dtype == torch.uint8
    assert data[0, 0] == 0 and data[0, -1] == 255


def test_unpack_inverts_pack():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(codes)), codes)


def test_constant_group_dequantizes_to_its_value():
    w = torch.full((2, 64), 0.125)
    data, scale, w_min = quant.quantize(w, 4, 32)
    assert (scale > 0).all()
    assert torch.equal(quant.dequantize(data, scale, w_min, 4, 32), w.half())


def test_scale_and_min_are_float16_per_group():
    data, scale, w_min = quant.quantize(_weight(8, 192), 4, 64)
    assert data.shape == (8, 96)
    assert scale.shape == w_min.shape == (8, 3)
    assert scale.dtype == w_min.dtype == torch.float16


@pytest.mark.parametrize("bits", [2, 3, 16, 0])
def test_quantize_rejects_unsupported_bits(bits):
    with pytest.raises(StrataError) as e:
        quant.quantize(_weight(), bits, 64)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


def test_quantize_rejects_in_features_not_a_multiple_of_group_size():
    with pytest.raises(StrataError) as e:
        quant.quantize(_weight(4, 100), 4, 64)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    assert "group_size" in e.value.message


def test_quantize_rejects_non_2d_weight():
    with pytest.raises(StrataError) as e:
        quant.quantize(torch.zeros(64), 8, 64)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


def test_dequantize_rejects_parts_that_disagree():
    data, scale, w_min = quant.quantize(_weight(), 4, 64)
    with pytest.raises(StrataError) as e:
        quant.dequantize(data, scale, w_min, 4, 32)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


def test_quantizable_needs_2d_and_divisible_in_features():
    assert quant.quantizable((128, 256), 64)
    assert quant.quantizable(torch.Size([3, 64]), 64)
    assert not quant.quantizable((128, 100), 64)
    assert not quant.quantizable((256,), 64)
    assert not quant.quantizable((2, 3, 64), 64)
    assert not quant.quantizable((4, 9), 3)  # INT4 packs pairs


@pytest.mark.parametrize("bits", [4, 8])
def test_random_packed_has_plausible_parts(bits):
    g = torch.Generator().manual_seed(0)
    data, scale, w_min = quant.random_packed((64, 256), bits, 64, generator=g)
    assert data.dtype == torch.uint8
    assert data.shape == ((64, 128) if bits == 4 else (64, 256))
    assert scale.shape == w_min.shape == (64, 4)
    assert scale.dtype == w_min.dtype == torch.float16
    assert (scale > 0).all()
    w = quant.dequantize(data, scale, w_min, bits, 64, out_dtype=torch.float32)
    assert w.abs().max() < 0.05 and w.std() > 0.005


def test_random_packed_is_reproducible_with_a_generator():
    a = quant.random_packed((8, 64), 4, 64, generator=torch.Generator().manual_seed(3))
    b = quant.random_packed((8, 64), 4, 64, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantize_on_cuda_matches_cpu():
    parts = quant.quantize(_weight(), 4, 64)
    cpu = quant.dequantize(*parts, 4, 64)
    gpu = quant.dequantize(*(p.cuda() for p in parts), 4, 64)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)

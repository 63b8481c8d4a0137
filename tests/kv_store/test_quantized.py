"""Attention over an INT8 / INT4 group-wise cache against the same attention over the
float cache: small, bounded error; chunks, padding, ALiBi and grouped heads included."""

import pytest
import torch

from kv_store.group_cache import GroupCache, GroupSpec
from kv_store.quantized import CHUNK, QuantizedGroupCache


def spec(bits, **kw):
    base = dict(num_layers=2, batch=3, num_heads=4, head_dim=32, max_tokens=CHUNK + 80, dtype=torch.float32,
                scale=32**-0.5, pad=(0, 5, 2), num_kv_heads=2, kv_bits=bits)
    base.update(kw)
    return GroupSpec(**base)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
@pytest.mark.parametrize("alibi", [False, True])
def test_quantized_attention_is_close_to_float_attention(bits, tol, alibi):
    torch.manual_seed(0)
    exact, quant = GroupCache(spec(16, alibi=alibi)), QuantizedGroupCache(spec(bits, alibi=alibi))
    prompt = torch.randn(3, 2, CHUNK + 40, 32)
    for c in (exact, quant):
        c.append(1, prompt, prompt * 0.5)
    for _ in range(3):
        q, k, v = torch.randn(3, 4, 1, 32), torch.randn(3, 2, 1, 32), torch.randn(3, 2, 1, 32)
        want, got = exact.attend(1, q, k, v), quant.attend(1, q, k, v)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < tol, rel
    assert quant.nbytes < exact.nbytes / (3 if bits == 8 else 5)


def test_bad_kv_bits_are_refused():
    from strata.runtime.errors import ErrorKind, StrataError

    with pytest.raises(StrataError) as e:
        GroupCache(spec(5))
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


@pytest.mark.parametrize("bits", [8, 4])
def test_chunks_dequantize_exactly_into_one_reused_float32_buffer(bits):
    """Never the whole cache in float32: every chunk lands in the same CHUNK-token
    buffer, with the same numbers as strata.model.quant's dequantization."""
    torch.manual_seed(1)
    cache = QuantizedGroupCache(spec(bits, kv_group_size=16))
    x = torch.randn(3, 2, CHUNK + 30, 32)
    cache.append(0, x, -x)
    first = cache._load(1, 0, 0, CHUNK)
    sl = (1, 0, slice(None), slice(None), slice(0, CHUNK))
    want = cache.fmt.dequantize(cache.codes[sl], cache.scale[sl], cache.min[sl], torch.float32)
    assert torch.equal(first, want)
    assert (first + x[:, :, :CHUNK]).abs().max() < (0.05 if bits == 8 else 0.5)  # values were -x
    second = cache._load(0, 0, CHUNK, CHUNK + 30)
    assert second.shape == (3, 2, 30, 32) and second.data_ptr() == first.data_ptr()
    assert cache._chunk_buffers[0].shape == (3, 2, CHUNK, 32)


@pytest.mark.parametrize("bits,group", [(8, 24), (4, 64), (16, 32)])
def test_groups_that_do_not_divide_head_dim_or_16_bits_are_refused(bits, group):
    from strata.runtime.errors import ErrorKind, StrataError

    with pytest.raises(StrataError) as e:
        QuantizedGroupCache(spec(bits, kv_group_size=group))
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT

import math

import pytest
import torch

from kv_store.group_cache import GroupCache, GroupSpec, build_mask
from strata.model.alibi import alibi_slopes
from strata.runtime.errors import ErrorKind, StrataError


def make_spec(**kw) -> GroupSpec:
    base = dict(num_layers=2, batch=3, num_heads=4, head_dim=8, max_tokens=16, dtype=torch.float32, scale=8**-0.5)
    base.update(kw)
    return GroupSpec(**base)


def reference(q, keys, values, scale, pad, slopes=None):
    """softmax(scale * q.K^T + alibi + mask) . V, explicitly, in float64."""
    q, keys, values = q.double(), keys.double(), values.double()
    scores = scale * torch.einsum("bhqd,bhkd->bhqk", q, keys)
    j = torch.arange(keys.shape[2], dtype=torch.float64)
    for b, p in enumerate(pad):
        if slopes is not None:
            scores[b] += slopes.double().view(-1, 1, 1) * (j - p)
        scores[b, :, :, :p] = float("-inf")
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights, values)


def run_decode(spec: GroupSpec, prompt: int, steps: int, seed: int = 0):
    """Prefill `prompt` tokens on layer 1, decode `steps`; yields (out, expected)."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.batch, spec.num_heads, prompt, spec.head_dim)
    keys = torch.randn(shape, generator=g).to(spec.dtype)
    values = torch.randn(shape, generator=g).to(spec.dtype)
    for b, p in enumerate(spec.pad):
        keys[b, :, :p] = 1e4  # garbage under the padding must not matter
    cache = GroupCache(spec)
    assert cache.append(1, keys, values) == prompt
    pad = spec.pad or (0,) * spec.batch
    slopes = alibi_slopes(spec.num_heads) if spec.alibi else None
    results = []
    for step in range(steps):
        one = (spec.batch, spec.num_heads, 1, spec.head_dim)
        q, k, v = (torch.randn(one, generator=g).to(spec.dtype) for _ in "qkv")
        out = cache.attend(1, q, k, v)
        assert out.shape == (spec.batch, spec.num_heads, 1, spec.head_dim) and out.dtype == spec.dtype
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        assert cache.lengths == [0, prompt + step + 1]
        results.append((out, reference(q, keys, values, spec.scale, pad, slopes)))
    return results


def test_attend_equals_reference_without_padding():
    for out, expected in run_decode(make_spec(), prompt=5, steps=3):
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_attend_masks_left_padding():
    for out, expected in run_decode(make_spec(pad=(0, 3, 5)), prompt=6, steps=3):
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [4, 6])
def test_attend_with_alibi_and_padding_equals_reference(heads):
    spec = make_spec(num_heads=heads, alibi=True, pad=(2, 0, 4))
    for out, expected in run_decode(spec, prompt=7, steps=4):
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_attend_with_scale_one_uses_prescaled_query():
    for out, expected in run_decode(make_spec(scale=1.0, pad=(1, 0, 0)), prompt=4, steps=2):
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attend_in_half_precision_is_close_to_reference(dtype):
    spec = make_spec(dtype=dtype, alibi=True, pad=(0, 2, 1))
    tol = 2e-2 if dtype is torch.bfloat16 else 2e-3
    for out, expected in run_decode(spec, prompt=9, steps=3):
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def hf_slopes_and_bias(heads: int, attention_mask: torch.Tensor) -> torch.Tensor:
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    alibi = bloom.build_alibi_tensor(attention_mask, heads, torch.float32)
    return alibi.view(attention_mask.shape[0], heads, -1)


@pytest.mark.parametrize("heads", [4, 6])
def test_alibi_slopes_equal_transformers(heads):
    hf = hf_slopes_and_bias(heads, torch.ones(1, 2, dtype=torch.long))
    assert torch.equal(alibi_slopes(heads), hf[0, :, 1])


@pytest.mark.parametrize("heads", [4, 6])
def test_alibi_bias_equals_transformers_with_left_padding(heads):
    pad, tokens = (0, 3), 10
    attention_mask = torch.ones(2, tokens, dtype=torch.long)
    attention_mask[1, :3] = 0
    hf = hf_slopes_and_bias(heads, attention_mask)
    mask = build_mask(make_spec(batch=2, num_heads=heads, alibi=True, pad=pad, max_tokens=tokens))
    assert mask.shape == (2, heads, 1, tokens)
    assert torch.isinf(mask[1, :, 0, :3]).all() and torch.isfinite(mask[0]).all()
    torch.testing.assert_close(mask[1, :, 0, 3:], hf[1, :, 3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(mask[0, :, 0], hf[0], rtol=0, atol=1e-6)


def test_no_padding_and_no_bias_needs_no_mask():
    assert build_mask(make_spec()) is None
    assert build_mask(make_spec(pad=(0, 0, 0))) is None


def test_append_beyond_max_tokens_is_resource_exhausted():
    spec = make_spec(max_tokens=4)
    cache = GroupCache(spec)
    x = torch.zeros(3, 4, 4, 8)
    cache.append(0, x, x)
    one = torch.zeros(3, 4, 1, 8)
    with pytest.raises(StrataError) as e:
        cache.attend(0, one, one, one)
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "max_tokens 4" in e.value.message
    assert cache.lengths[0] == 4
    with pytest.raises(StrataError) as e:
        cache.append(1, torch.zeros(3, 4, 5, 8), torch.zeros(3, 4, 5, 8))
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED and cache.lengths[1] == 0


@pytest.mark.parametrize(
    "q_shape,kv_shape,dtype,layer",
    [
        ((3, 4, 1, 8), (3, 4, 1, 7), torch.float32, 0),  # head_dim
        ((3, 4, 2, 8), (3, 4, 1, 8), torch.float32, 0),  # two query tokens
        ((3, 4, 1, 8), (2, 4, 1, 8), torch.float32, 0),  # batch
        ((3, 4, 1, 8), (3, 4, 1, 8), torch.float16, 0),  # dtype
        ((3, 4, 1, 8), (3, 4, 1, 8), torch.float32, 2),  # layer
    ],
)
def test_bad_shapes_dtypes_and_layers_are_invalid(q_shape, kv_shape, dtype, layer):
    cache = GroupCache(make_spec())
    with pytest.raises(StrataError) as e:
        q, kv = torch.zeros(q_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)
        cache.attend(layer, q, kv, kv)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    assert cache.lengths == [0, 0]


@pytest.mark.parametrize(
    "change",
    [dict(pad=(1, 2)), dict(pad=(0, 0, 16)), dict(dtype=torch.int64), dict(batch=0), dict(scale=math.nan)],
)
def test_bad_specs_are_invalid(change):
    with pytest.raises(StrataError) as e:
        GroupCache(make_spec(**change))
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT


@pytest.mark.parametrize("alibi", [False, True])
def test_slot_steps_at_one_position_equal_those_at_mixed_positions(alibi):
    """attend_at takes a shortcut where every row writes the same column (one block copy,
    no mask without ALiBi): its output equals the general per-row path's."""
    import torch

    from kv_store.group_cache import GroupCache, GroupSpec

    spec = GroupSpec(num_layers=1, batch=3, num_heads=4, head_dim=16, max_tokens=12, dtype=torch.float32,
                     scale=0.25, alibi=alibi)
    torch.manual_seed(0)
    prompt = torch.randn(1, 4, 3 * 5, 16)
    q, k, v = (torch.randn(3, 4, 1, 16) for _ in range(3))
    same, mixed = GroupCache(spec), GroupCache(spec)
    for c in (same, mixed):
        c.append_rows(0, [0, 1, 2], [5, 5, 5], prompt, prompt)
    out_same = same.attend_at(0, q, k, v, [5, 5, 5])
    mixed_rows = mixed.attend_at(0, q, k, v, [5, 5, 0], [2])  # the general path: row 2 idle
    torch.testing.assert_close(out_same[:2], mixed_rows[:2])
    torch.testing.assert_close(same.keys[0][:2, :, :6], mixed.keys[0][:2, :, :6])
    bias = None
    if alibi:
        from strata.model.alibi import alibi_slopes
        bias = alibi_slopes(4).view(1, 4, 1, 1) * torch.arange(6).float().view(1, 1, 1, 6)
    ref = torch.nn.functional.scaled_dot_product_attention(q, same.keys[0][:, :, :6], same.values[0][:, :, :6],
                                                           attn_mask=bias, scale=0.25)
    torch.testing.assert_close(out_same, ref)


@pytest.mark.parametrize("bits", [16, 4])
def test_packed_prompts_land_in_their_rows_in_runs(bits):
    """append_rows stores runs of consecutive rows with one length in one store each:
    every row still gets exactly its own slice of the packed prompts, at columns from 0,
    and rows outside the call are untouched."""
    import torch

    from kv_store.group_cache import GroupCache, GroupSpec
    from kv_store.quantized import QuantizedGroupCache
    from strata.model.kv_quant import KVFormat

    rows, lengths = [3, 4, 0, 1, 5, 6], [4, 4, 4, 2, 2, 3]
    from strata.transport.packed import runs

    assert runs(lengths, rows) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]  # rows 3-4 of 4 tokens: one block
    spec = GroupSpec(num_layers=2, batch=8, num_heads=2, head_dim=64, max_tokens=6, dtype=torch.bfloat16,
                     scale=0.125, kv_bits=bits)
    cache = GroupCache(spec) if bits == 16 else QuantizedGroupCache(spec)
    torch.manual_seed(0)
    k, v = (torch.randn(1, 2, sum(lengths), 64).bfloat16() for _ in range(2))
    cache.append_rows(1, rows, lengths, k, v)
    a = 0
    for r, n in zip(rows, lengths):
        for which, x in ((0, k), (1, v)):
            want = x[0, :, a : a + n]
            if bits == 16:
                got = (cache.keys if which == 0 else cache.values)[1][r, :, :n]
                assert torch.equal(got, want)
            else:
                codes, _, _ = KVFormat(4, 64, 64).quantize(want.float())
                assert torch.equal(cache.codes[which, 1, r, :, :n], codes)
        a += n
    untouched = cache.keys[1][2] if bits == 16 else cache.codes[0, 1, 2]
    assert torch.count_nonzero(untouched) == 0

"""The KV store's own decode attention kernel (kv_store/native.py) against float32
attention on the same bfloat16 cache: plain heads, grouped-query heads, padding and
ALiBi masks, strided cache slices, row ranges split over threads; and the fallback
when no compiler is there."""

import pytest
import torch
import torch.nn.functional as F

from kv_store import native
from kv_store.group_cache import GroupCache, GroupSpec


@pytest.fixture(scope="module")
def kernel():
    k = native.NativeDecodeAttention.create(threads=3)
    if k is None:
        pytest.skip("no C compiler on this machine")
    yield k
    k.close()


def reference(q, k, v, mask, scale):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=gqa)


@pytest.mark.parametrize("heads,kv_heads,mask_heads", [(4, 4, 0), (8, 2, 0), (6, 6, 1), (6, 6, 6), (8, 4, 8)])
@pytest.mark.parametrize("d", [64, 48])  # 48: not a multiple of 32, the widening path on any CPU
def test_matches_float32_attention(kernel, heads, kv_heads, mask_heads, d):
    torch.manual_seed(heads * 10 + kv_heads + mask_heads)
    b, t, t_max = 5, 77, 90
    cache_k = torch.randn(b, kv_heads, t_max, d).to(torch.bfloat16)
    cache_v = torch.randn(b, kv_heads, t_max, d).to(torch.bfloat16)
    k, v = cache_k[:, :, :t], cache_v[:, :, :t]  # strided, as the cache hands them out
    q = torch.randn(b, heads, 1, d).to(torch.bfloat16)
    mask = None
    if mask_heads:
        mask = torch.randn(b, mask_heads, 1, t_max) * 0.5
        mask[1, ..., :9] = float("-inf")  # left padding of sequence 1
        mask = mask[..., :t]
    got = kernel(q, k, v, mask, d**-0.5)
    want = reference(q, k, v, mask, d**-0.5)
    assert got.shape == (b, heads, 1, d) and got.dtype == torch.bfloat16
    # bfloat16 output: within a couple of its ulps of the float32 result
    assert torch.allclose(got.float(), want, atol=1e-2, rtol=1e-2)
    assert not torch.equal(got, torch.zeros_like(got))


def test_a_padded_key_gets_no_weight(kernel):
    b, h, d, t = 2, 3, 32, 20
    k = torch.randn(b, h, t, d).to(torch.bfloat16)
    v = torch.randn(b, h, t, d).to(torch.bfloat16)
    q = torch.randn(b, h, 1, d).to(torch.bfloat16)
    mask = torch.zeros(b, 1, 1, t)
    mask[:, :, :, :10] = float("-inf")
    v_changed = v.clone()
    v_changed[:, :, :10] = 1000.0  # values under the mask must not leak into the output
    assert torch.equal(kernel(q, k, v, mask, 0.2), kernel(q, k, v_changed, mask, 0.2))


def test_group_cache_uses_it_and_agrees_with_sdpa(kernel):
    spec = GroupSpec(num_layers=2, batch=3, num_heads=4, head_dim=32, max_tokens=40, dtype=torch.bfloat16,
                     scale=32**-0.5, pad=(0, 3, 1))
    with_kernel, plain = GroupCache(spec, native=kernel), GroupCache(spec)
    torch.manual_seed(1)
    k, v = (torch.randn(3, 4, 12, 32).to(torch.bfloat16) for _ in range(2))
    calls = []
    original = kernel.__class__.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    kernel.__class__.__call__ = counted
    try:
        for cache in (with_kernel, plain):
            cache.append(1, k, v)
        q, k1, v1 = (torch.randn(3, 4, 1, 32).to(torch.bfloat16) for _ in range(3))
        got, want = with_kernel.attend(1, q, k1, v1), plain.attend(1, q, k1, v1)
    finally:
        kernel.__class__.__call__ = original
    assert len(calls) == 1
    assert torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_the_kernel_stores_each_step_s_vectors_as_the_python_path_does(kernel):
    """Slot steps through the kernel (which stores the new key and value itself, row by
    row on its threads) against the same steps without it: the same cache contents bit
    for bit, idle rows untouched, close outputs; the result lands in the given output."""
    spec = GroupSpec(num_layers=1, batch=4, num_heads=8, num_kv_heads=2, head_dim=64, max_tokens=40,
                     dtype=torch.bfloat16, scale=64**-0.5)
    with_kernel, plain = GroupCache(spec, native=kernel), GroupCache(spec)
    torch.manual_seed(3)
    k, v = (torch.randn(4, 2, 10, 64).to(torch.bfloat16) for _ in range(2))
    for cache in (with_kernel, plain):
        cache.append(0, k, v)
    steps = [([10] * 4, []), ([11, 11, 0, 11], [2]), ([12, 12, 0, 5], [2])]  # uniform; an idle row; mixed
    for i, (positions, idle) in enumerate(steps):
        q = torch.randn(4, 8, 1, 64).to(torch.bfloat16)
        kv_new = torch.randn(2, 4, 2, 1, 64).to(torch.bfloat16)
        out = torch.full_like(q, float("nan"))
        assert with_kernel._kernel_stores(0, q, kv_new[0], kv_new[1])
        got = with_kernel.attend_at(0, q, kv_new[0], kv_new[1], positions, idle, out=out)
        want = plain.attend_at(0, q, kv_new[0], kv_new[1], positions, idle)
        assert got is out, f"step {i}: the result was not written into the given output"
        assert torch.equal(with_kernel.keys[0], plain.keys[0]) and torch.equal(with_kernel.values[0], plain.values[0])
        active = [r for r in range(4) if r not in idle]
        assert torch.allclose(got[active].float(), want[active].float(), atol=1e-2, rtol=1e-2), f"step {i}"
    assert not with_kernel.keys[0][2, :, 11:].any()  # idle after the first step: no vectors past column 10


def test_new_vectors_of_another_layout_are_stored_by_the_caller(kernel):
    """k and v with different strides are not the kernel's to store: the step stores
    them first and the result is the same."""
    spec = GroupSpec(num_layers=1, batch=2, num_heads=4, head_dim=32, max_tokens=16, dtype=torch.bfloat16,
                     scale=32**-0.5)
    with_kernel, plain = GroupCache(spec, native=kernel), GroupCache(spec)
    torch.manual_seed(4)
    q = torch.randn(2, 4, 1, 32).to(torch.bfloat16)
    k_new = torch.randn(2, 4, 1, 32).to(torch.bfloat16)
    v_new = torch.randn(4, 2, 1, 32).to(torch.bfloat16).transpose(0, 1)  # same shape, other strides
    assert not native.NewVectors.fits(k_new, v_new)
    got, want = with_kernel.attend(0, q, k_new, v_new), plain.attend(0, q, k_new, v_new)
    assert torch.equal(with_kernel.values[0], plain.values[0]) and with_kernel.lengths == [1]
    assert torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_no_compiler_means_no_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.build(tmp_path) is None
    assert not list(tmp_path.glob("*.so"))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dim,group", [(64, 32), (128, 64)])  # any shape; the one with its own code paths
def test_quantized_cache_matches_its_pytorch_path(kernel, bits, heads, kv_heads, dim, group):
    """INT8 / INT4 codes read in place agree with the chunked PyTorch path over the same
    codes (and so with the dequantized cache), with a padding mask, over an odd number
    of tokens (the INT4 path on bfloat16 dot products takes values two at a time)."""
    from kv_store.quantized import QuantizedGroupCache

    spec = GroupSpec(num_layers=2, batch=3, num_heads=heads, head_dim=dim, max_tokens=80, dtype=torch.bfloat16,
                     scale=dim**-0.5, pad=(0, 5, 2), num_kv_heads=kv_heads, kv_bits=bits, kv_group_size=group)
    fast, slow = QuantizedGroupCache(spec, native=kernel), QuantizedGroupCache(spec)
    torch.manual_seed(bits + heads + dim)
    k, v = (torch.randn(3, kv_heads, 70, dim).to(torch.bfloat16) for _ in range(2))
    for cache in (fast, slow):
        cache.append(0, k, v)
    q, k1, v1 = torch.randn(3, heads, 1, dim).to(torch.bfloat16), *(
        torch.randn(3, kv_heads, 1, dim).to(torch.bfloat16) for _ in range(2))
    got, want = fast.attend(0, q, k1, v1), slow.attend(0, q, k1, v1)
    assert fast.lengths[0] % 2 == 1
    assert got.shape == want.shape == (3, heads, 1, dim)
    assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert (got.float() - want.float()).abs().max() < 0.02


@pytest.mark.parametrize("bits", [8, 4])
def test_native_quantize_writes_the_codes_pytorch_would(kernel, bits):
    """The prompt's keys/values quantized by the kernel into a strided cache slice equal
    strata/model/kv_quant.py's codes, scales and mins (and leave the rest of the cache alone)."""
    from strata.model.kv_quant import KVFormat

    fmt = KVFormat(bits, 64, 32)
    torch.manual_seed(bits)
    x = (torch.randn(3, 4, 7, 64) * 3).to(torch.bfloat16)
    x[0, 0, 0, :32] = 1.5  # a constant group: the scale clamps to float16's smallest normal
    codes = torch.full((3, 4, 10, fmt.code_width), 7, dtype=torch.uint8)
    scale = torch.zeros(3, 4, 10, fmt.groups, dtype=torch.float16)
    w_min = torch.zeros(3, 4, 10, fmt.groups, dtype=torch.float16)
    assert kernel.quantize(x, codes[:, :, 2:9], scale[:, :, 2:9], w_min[:, :, 2:9], bits, 32)
    want = fmt.quantize(x)
    assert torch.equal(codes[:, :, 2:9], want[0])
    assert torch.equal(scale[:, :, 2:9], want[1]) and torch.equal(w_min[:, :, 2:9], want[2])
    assert (codes[:, :, :2] == 7).all() and (codes[:, :, 9:] == 7).all()


def test_rows_claimed_in_chunks_cover_every_row():
    """101 rows on 2 threads: claims of 3 rows and a short last one; every row's output
    is computed once (the output starts as uninitialized memory)."""
    k2 = native.NativeDecodeAttention.create(threads=2)
    if k2 is None:
        pytest.skip("no C compiler on this machine")
    try:
        torch.manual_seed(7)
        b, d, t = 101, 32, 9
        q = torch.randn(b, 1, 1, d).to(torch.bfloat16)
        k, v = (torch.randn(b, 1, t, d).to(torch.bfloat16) for _ in range(2))
        assert max(1, b // (2 * native.CLAIMS_PER_THREAD)) == 3
        got = k2(q, k, v, None, d**-0.5)
        assert torch.allclose(got.float(), reference(q, k, v, None, d**-0.5), atol=1e-2, rtol=1e-2)
    finally:
        k2.close()


def test_the_pool_gives_every_thread_count_the_same_result_call_after_call():
    """The library's own pool (decode_attention_pool.c): 1, 4 and 7 threads (more than
    this machine's cores, so workers sleep and wake) give bit-identical outputs over many
    calls in a row, quantized appends between them, from two Python threads at once
    (calls take turns); closing twice is harmless, and a call after it is an error."""
    import concurrent.futures

    from strata.model.kv_quant import KVFormat

    torch.manual_seed(3)
    b, h, t, d = 5, 4, 37, 64
    q = torch.randn(b, h, 1, d).to(torch.bfloat16)
    k, v = (torch.randn(b, h, t, d).to(torch.bfloat16) for _ in range(2))
    fmt = KVFormat(4, d, 32)
    outs = {}
    for threads in (1, 4, 7):
        kern = native.NativeDecodeAttention.create(threads=threads)
        if kern is None:
            pytest.skip("no C compiler on this machine")
        try:
            codes = torch.empty(b, h, t, fmt.code_width, dtype=torch.uint8)
            scale, w_min = (torch.empty(b, h, t, d // 32, dtype=torch.float16) for _ in range(2))

            def call(i):
                assert kern.quantize(k, codes, scale, w_min, 4, 32)
                parts = (codes, scale, w_min)
                return kern(q, k, v, None, d**-0.5), kern.quantized(q, parts, parts, None, d**-0.5, 4, 32)

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                results = list(pool.map(call, range(40)))
            for plain, quant in results[1:]:
                assert torch.equal(plain, results[0][0]) and torch.equal(quant, results[0][1])
            outs[threads] = results[0]
        finally:
            kern.close()
            kern.close()
        with pytest.raises(RuntimeError, match="closed"):  # an error, not a call on freed threads
            kern(q, k, v, None, d**-0.5)
    for threads in (4, 7):
        assert torch.equal(outs[threads][0], outs[1][0]) and torch.equal(outs[threads][1], outs[1][1])
    assert torch.allclose(outs[1][0].float(), reference(q, k, v, None, d**-0.5), atol=1e-2, rtol=1e-2)


def _quantized_reference(q, parts, mask, scale, fmt):
    """float64 attention over the dequantized cache: what the codes mean exactly."""
    k, v = (fmt.dequantize(*p, torch.float64) for p in parts)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    return torch.softmax(s, dim=-1) @ v


def _strided_parts(fmt, x, pad_tokens, widen):
    """x quantized into a cache slice: codes and scales with rows of `widen` times their
    width (strides as a wider layout would give), `pad_tokens` more tokens in the cache."""
    codes, scale, w_min = fmt.quantize(x)
    b, h, t, _ = x.shape
    out = []
    for part in (codes, scale, w_min):
        full = torch.zeros(b, h, t + pad_tokens, part.shape[-1] * widen, dtype=part.dtype)
        full[:, :, :t, : part.shape[-1]] = part
        out.append(full[:, :, :t, : part.shape[-1]])
    return tuple(out)


@pytest.mark.parametrize("bits,dim,group", [(4, 128, 64), (4, 128, 32), (4, 128, 128), (4, 256, 64), (4, 64, 32),
                                            (8, 128, 64), (8, 64, 16), (8, 128, 32), (8, 256, 128)])
@pytest.mark.parametrize("heads,kv_heads,tokens", [(4, 4, 70), (8, 2, 17), (6, 3, 1), (2, 2, 16), (4, 1, 33)])
def test_quantized_kernel_matches_the_dequantized_cache(kernel, bits, dim, group, heads, kv_heads, tokens):
    """Every format the kernels take, against float64 attention over the dequantized
    cache: grouped heads, token counts around the 16-key blocks, a per-head mask with
    -inf (left padding, one masked key inside), strided codes and scales. Within the
    output's bfloat16 rounding and INT4's bfloat16 value weights."""
    from strata.model.kv_quant import KVFormat

    fmt = KVFormat(bits, dim, group)
    torch.manual_seed(bits * 1000 + dim + group + heads * 10 + tokens)
    b = 3
    x_k, x_v = (torch.randn(b, kv_heads, tokens, dim) * 2 for _ in range(2))
    widen = 1 if tokens % 2 else 2  # half the cases with scale rows wider than their groups
    k_parts = _strided_parts(fmt, x_k, 5, widen)
    v_parts = _strided_parts(fmt, x_v, 5, widen)
    q = (torch.randn(b, heads, 1, dim) * 3).to(torch.bfloat16)
    mask = torch.randn(b, heads, 1, tokens) * 0.5
    mask[1, :, :, : tokens // 3] = float("-inf")
    if tokens > 2:
        mask[2, 0, 0, tokens // 2] = float("-inf")
    got = kernel.quantized(q, k_parts, v_parts, mask, dim**-0.5, bits, group)
    want = _quantized_reference(q, (k_parts, v_parts), mask, dim**-0.5, fmt)
    assert got.shape == (b, heads, 1, dim) and got.dtype == torch.bfloat16
    err = (got.double() - want).abs().max().item()
    assert err <= 1.5e-2 * want.abs().max().item(), err


def test_quantized_int8_kernel_over_many_tokens(kernel):
    """More tokens than the INT8 value path sums in int32 at once (16384), a peaked
    softmax: the same as float64 over the dequantized cache."""
    from strata.model.kv_quant import KVFormat

    fmt = KVFormat(8, 64, 32)
    torch.manual_seed(3)
    t = 16384 + 37
    x_k, x_v = torch.randn(1, 1, t, 64), torch.randn(1, 1, t, 64)
    x_k[0, 0, 5000] = x_k[0, 0, 5000] * 4  # a key the query picks out
    k_parts, v_parts = fmt.quantize(x_k), fmt.quantize(x_v)
    q = x_k[:, :, 5000:5001].to(torch.bfloat16)
    got = kernel.quantized(q, k_parts, v_parts, None, 64**-0.5, 8, 32)
    want = _quantized_reference(q, (k_parts, v_parts), None, 64**-0.5, fmt)
    assert (got.double() - want).abs().max().item() <= 1e-2 * want.abs().max().item()


def test_quantized_kernel_keeps_tiny_and_zero_queries_finite(kernel):
    """A zero query (uniform attention) and one of 1e-30 (below the fixed-point query's
    range): finite, the mean of the values."""
    from strata.model.kv_quant import KVFormat

    for bits in (4, 8):
        fmt = KVFormat(bits, 128, 64)
        x = torch.randn(2, 2, 21, 128)
        parts = fmt.quantize(x), fmt.quantize(-x)
        q = torch.zeros(2, 2, 1, 128)
        q[1] = 1e-30
        got = kernel.quantized(q.to(torch.bfloat16), parts[0], parts[1], None, 128**-0.5, bits, 64)
        want = _quantized_reference(q.to(torch.bfloat16), parts, None, 128**-0.5, fmt)
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max().item() <= 1e-2 * want.abs().max().item()


def test_prefetch_macros_come_from_the_caller_and_are_their_own_build(tmp_path, monkeypatch):
    """The run plan's kv_kernel_defines reach the compiler as -D flags, each set its own
    library in the cache; unknown macros or values out of range are refused; the
    environment is not read for them."""
    monkeypatch.setenv("STRATA_KV_CFLAGS", "-DPF_TOKENS=8")  # the old switch: no effect
    asked = []

    def no_compiler(out, command, timeout):
        asked.append((out, command("tmp")))
        raise OSError("no compiler in this test")

    monkeypatch.setattr(native, "compile_once", no_compiler)
    assert native.build(tmp_path) is None
    assert native.build(tmp_path, {"PF_TOKENS": 0, "PF_HINT": 2}) is None
    assert native.build(tmp_path, (("PF_HINT", 2), ("PF_TOKENS", 0))) is None
    (plain, plain_cmd), (pf, pf_cmd), (pairs, _) = asked
    assert not any(f.startswith("-D") for f in plain_cmd)
    assert [f for f in pf_cmd if f.startswith("-D")] == ["-DPF_HINT=2", "-DPF_TOKENS=0"]
    assert plain != pf and pf == pairs
    from strata.runtime.errors import StrataError

    with pytest.raises(StrataError, match="kv_kernel_defines has 'PF_FAR'"):
        native.flags({"PF_FAR": 1})
    with pytest.raises(StrataError, match="PF_HINT must be a whole number from 0 to 3"):
        native.flags({"PF_HINT": 4})


def test_a_kernel_built_without_prefetch_gives_the_same_attention(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path))
    k = native.NativeDecodeAttention.create(threads=2, defines={"PF_TOKENS": 0, "PF_NEXT_ROW": 0})
    if k is None:
        pytest.skip("no C compiler on this machine")
    try:
        assert len(list((tmp_path / "native").glob("*.so"))) == 1
        gen = torch.Generator().manual_seed(2)
        q = torch.randn(3, 4, 1, 64, generator=gen).to(torch.bfloat16)
        keys, values = (torch.randn(3, 4, 70, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
        got = k(q, keys, values, None, 0.125)
        want = reference(q, keys, values, None, 0.125)
        assert torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2)
    finally:
        k.close()

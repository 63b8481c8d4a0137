"""LocalKV at 8 and 4 bits: the engine's logits stay close to the 16-bit cache (INT8
closer than INT4), decode attention equals the KV store's quantized attention over the
same codes, and the cache takes a quarter of the bytes at INT4 (plus scales)."""

import pytest
import torch

import tiny_models
from compute_node.engine import Engine, local_kv_factory
from compute_node.kv_cache import DEQUANT_CHUNK, LocalKV, RemoteKV, _Shape
from compute_node.layer_weights import LayerWeights
from compute_node.sampling import Sampling
from compute_node.weights import HostWeights
from kv_store.attention import GroupSpec
from kv_store.quantized import QuantizedGroupCache
from strata.errors import ErrorKind, StrataError

PROMPTS = [[5, 17, 33, 100, 7, 9] * 4, [44, 3, 250] * 5, list(range(12, 40))]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["opt", "llama"])  # llama: grouped-query attention
def shards(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory)[1]


def generate(shards, kv_bits: int, steps: int = 8):
    """Greedy tokens and every step's logits with a LocalKV at `kv_bits`."""
    host = HostWeights.from_directory(shards)
    lw = LayerWeights(host, CPU, torch.float32, set(range(host.manifest.num_layers)))
    engine = Engine(lw, local_kv_factory(torch.float32, CPU, kv_bits))
    seen, logits = [], engine.family.logits

    def record(*args):
        out = logits(*args)
        seen.append(out.detach().clone())
        return out

    engine.family.logits = record
    tokens = [list(s) for s in engine.generate(PROMPTS, steps, Sampling(greedy=True))]
    return tokens, torch.cat(seen)


def test_int8_logits_are_close_to_the_16_bit_cache_and_int4_further(shards):
    ref_tokens, ref = generate(shards, 16)
    tokens8, got8 = generate(shards, 8)
    _, got4 = generate(shards, 4)
    err8, err4 = (got8 - ref).abs(), (got4 - ref).abs()
    assert 0 < err8.max().item() < 0.1  # logits have std ~0.9; 0: nothing was quantized
    assert err4.mean().item() > 2 * err8.mean().item()
    assert tokens8 == ref_tokens


def shape(batch=3, heads=4, kv_heads=2, head_dim=64, max_tokens=DEQUANT_CHUNK + 40, alibi=False, pad=(0, 5, 2)):
    return _Shape(2, heads, head_dim, max_tokens, torch.tensor(pad[:batch]), head_dim**-0.5, alibi, kv_heads)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("alibi", [False, True])
def test_decode_attention_equals_the_kv_store_over_the_same_codes(bits, alibi):
    """Same format, same group: LocalKV (whole layer rebuilt, in chunks of tokens)
    and the KV store (chunked float32 attention) agree; prefill uses the fresh k/v."""
    torch.manual_seed(0)
    s = shape(alibi=alibi)
    local, plain = LocalKV(s, torch.float32, CPU, bits, group_size=32), LocalKV(s, torch.float32, CPU)
    store = QuantizedGroupCache(GroupSpec(
        num_layers=2, batch=3, num_heads=4, head_dim=64, max_tokens=s.max_tokens, dtype=torch.float32,
        scale=s.scale, alibi=alibi, pad=(0, 5, 2), num_kv_heads=2, kv_bits=bits, kv_group_size=32))  # fmt: skip
    t = DEQUANT_CHUNK + 10  # the rebuild crosses a chunk boundary
    q, k, v = torch.randn(3, 4, t, 64), torch.randn(3, 2, t, 64), torch.randn(3, 2, t, 64)
    assert torch.equal(local.prefill(1, q, k, v), plain.prefill(1, q, k, v))
    store.append(1, k, v)
    for _ in range(3):
        q, k, v = torch.randn(3, 4, 1, 64), torch.randn(3, 2, 1, 64), torch.randn(3, 2, 1, 64)
        want, got = store.attend(1, q, k, v), local.decode_start(1, q, k, v)
        exact = plain.decode_start(1, q, k, v)
        torch.testing.assert_close(local.decode_finish(got), want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, exact, atol=1e-4)  # it attended over quantized keys and values


def test_int4_cache_holds_a_quarter_of_the_bf16_bytes_plus_scales():
    s = shape(head_dim=128, max_tokens=100)
    bf16 = LocalKV(s, torch.bfloat16, CPU).nbytes
    int8, int4 = (LocalKV(s, torch.bfloat16, CPU, bits).nbytes for bits in (8, 4))
    assert bf16 == 2 * 2 * 3 * 2 * 100 * 128 * 2  # layers, K and V, batch, kv heads, tokens, head_dim, bytes
    # per vector of 128: 64 bytes of INT4 codes + fp16 scale and min for 2 groups of 64
    assert int4 == bf16 * (64 + 2 * 4) // 256
    assert int8 == bf16 * (128 + 2 * 4) // 256
    assert 0.25 < int4 / bf16 < 0.3


def test_bad_kv_bits_or_group_are_invalid_arguments():
    with pytest.raises(StrataError) as e:
        local_kv_factory(torch.float32, CPU, kv_bits=3)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    for bits, group in ((3, 0), (8, 24), (4, 128)):  # 24 and 128 do not divide head_dim 64
        with pytest.raises(StrataError) as e:
            LocalKV(shape(), torch.float32, CPU, bits, group_size=group)
        assert e.value.kind is ErrorKind.INVALID_ARGUMENT


@pytest.mark.parametrize("bits,group", [(16, 0), (8, 64), (4, 64)])
def test_the_kv_store_is_asked_for_the_device_cache_groups(bits, group):
    """A cache in the KV store is quantized in the groups a device cache uses (64
    elements where head_dim allows), not the store's default of one group per head."""
    asked = []

    class Client:
        def allocate(self, request):
            asked.append(request)

    RemoteKV(shape(head_dim=128), torch.bfloat16, CPU, Client(), None, bits)
    assert asked[0].kv_bits == bits and asked[0].kv_group_size == group

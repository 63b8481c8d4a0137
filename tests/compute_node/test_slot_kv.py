"""Sequence-slot KV caches (compute_node/slot_kv.py) at 8 and 4 bits on the device: the
logits stay close to the 16-bit cache (INT8 closer than INT4), decode attention equals
the KV store's quantized attention over the same codes, and the cache takes a quarter
of the bytes at INT4 (plus scales). A cache in the KV store is asked for in the device
cache's groups."""

import pytest
import torch

import tiny_models
from compute_node.kv_cache import DEQUANT_CHUNK
from compute_node.slot_kv import Joining, LocalSlots, RemoteSlots, SlotShape
from in_process import InProcess
from kv_store.group_cache import GroupSpec
from kv_store.quantized import QuantizedGroupCache
from strata.runtime.errors import ErrorKind, StrataError

PROMPTS = [[5, 17, 33, 100, 7, 9] * 4, [44, 3, 250] * 5, list(range(12, 40))]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["opt", "llama"])  # llama: grouped-query attention
def shards(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory)[1]


def generate(shards, kv_bits: int, steps: int = 8):
    """Greedy tokens and every pass's logits with LocalSlots at `kv_bits`."""
    node = InProcess(shards, kv_bits=kv_bits)
    seen, logits = [], node.family.logits

    def record(*args):
        out = logits(*args)
        seen.append(out.detach().clone())
        return out

    node.family.logits = record
    tokens = node.generate(PROMPTS, steps)
    return tokens, torch.cat(seen)


def test_int8_logits_are_close_to_the_16_bit_cache_and_int4_further(shards):
    ref_tokens, ref = generate(shards, 16)
    tokens8, got8 = generate(shards, 8)
    _, got4 = generate(shards, 4)
    err8, err4 = (got8 - ref).abs(), (got4 - ref).abs()
    assert 0 < err8.max().item() < 0.1  # logits have std ~0.9; 0: nothing was quantized
    assert err4.mean().item() > 2 * err8.mean().item()
    assert tokens8 == ref_tokens


def shape(slots=3, heads=4, kv_heads=2, head_dim=64, capacity=DEQUANT_CHUNK + 40, alibi=False):
    return SlotShape(2, heads, kv_heads, head_dim, slots, capacity, head_dim**-0.5, alibi)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("alibi", [False, True])
def test_decode_attention_equals_the_kv_store_over_the_same_codes(bits, alibi):
    """Same format, same group: LocalSlots (rows rebuilt, in chunks of tokens) and the
    KV store (chunked float32 attention) agree, each row at its own length; prefill
    attends over the fresh k/v."""
    torch.manual_seed(0)
    s = shape(alibi=alibi)
    local, plain = LocalSlots(s, torch.float32, CPU, bits), LocalSlots(s, torch.float32, CPU)
    store = QuantizedGroupCache(GroupSpec(
        num_layers=2, batch=3, num_heads=4, head_dim=64, max_tokens=s.capacity, dtype=torch.float32,
        scale=s.scale, alibi=alibi, num_kv_heads=2, kv_bits=bits))  # fmt: skip
    rows, lengths = [2, 0, 1], [DEQUANT_CHUNK + 10, 5, 5]  # the longest row's rebuild crosses a chunk boundary
    t = sum(lengths)
    q, k, v = torch.randn(1, 4, t, 64), torch.randn(1, 2, t, 64), torch.randn(1, 2, t, 64)
    joining = Joining(list(rows), list(lengths))
    assert torch.equal(local.prefill(1, joining, q, k, v), plain.prefill(1, joining, q, k, v))
    store.append_rows(1, rows, lengths, k, v)
    positions = [5, 5, DEQUANT_CHUNK + 10]  # rows 0, 1, 2: each its own length
    for step in range(3):
        at = [p + step for p in positions]
        q, k, v = torch.randn(3, 4, 1, 64), torch.randn(3, 2, 1, 64), torch.randn(3, 2, 1, 64)
        want = store.attend_at(1, q, k, v, at)
        got = local.decode_finish(local.decode_start(1, local.view(at, []), q, k, v))
        exact = plain.decode_start(1, plain.view(at, []), q, k, v)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, exact, atol=1e-4)  # it attended over quantized keys and values


def test_int4_cache_holds_a_quarter_of_the_bf16_bytes_plus_scales():
    s = shape(head_dim=128, capacity=99)
    bf16 = LocalSlots(s, torch.bfloat16, CPU).nbytes
    int8, int4 = (LocalSlots(s, torch.bfloat16, CPU, bits).nbytes for bits in (8, 4))
    # layers, K and V, slots, kv heads, columns (capacity + the scratch column), head_dim, bytes
    assert bf16 == 2 * 2 * 3 * 2 * 100 * 128 * 2
    # per vector of 128: 64 bytes of INT4 codes + fp16 scale and min for 2 groups of 64
    assert int4 == bf16 * (64 + 2 * 4) // 256
    assert int8 == bf16 * (128 + 2 * 4) // 256
    assert 0.25 < int4 / bf16 < 0.3


def test_bad_kv_bits_are_invalid_arguments():
    for make in (lambda: LocalSlots(shape(), torch.float32, CPU, kv_bits=3),
                 lambda: RemoteSlots(shape(), torch.float32, CPU, None, None, kv_bits=3)):
        with pytest.raises(StrataError) as e:
            make()
        assert e.value.kind is ErrorKind.INVALID_ARGUMENT


@pytest.mark.parametrize("bits,group", [(16, 0), (8, 64), (4, 64)])
def test_the_kv_store_is_asked_for_the_device_cache_groups(bits, group):
    """A cache in the KV store is quantized in the groups a device cache uses (64
    elements where head_dim allows), not the store's default of one group per head."""
    asked = []

    class Client:
        def allocate(self, request):
            asked.append(request)

    RemoteSlots(shape(head_dim=128), torch.bfloat16, CPU, Client(), None, bits)
    assert asked[0].kv_bits == bits and asked[0].kv_group_size == group

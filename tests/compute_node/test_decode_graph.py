"""Decode as a replayed CUDA graph (compute_node/decode_graph.py). The graph records the
step with fixed shapes (LocalKV.fixed_shapes: the token's position in a device tensor,
attention over every slot with the unwritten ones masked). On the CPU that same
fixed-shape step runs eagerly and must give the plain engine's tokens: padding,
learned positions, ALiBi and rotary positions, two micro-batches. On CUDA the replayed
graph must give the tokens of the eager engine."""

import pytest
import torch

import tiny_models
from compute_node import engine as engine_mod
from compute_node.decode_graph import DecodeGraphs
from compute_node.engine import Engine, local_kv_factory
from compute_node.kv_cache import LocalKV, _Shape
from compute_node.layer_weights import LayerWeights
from compute_node.sampling import Sampling
from compute_node.weights import HostWeights
from strata.errors import StrataError

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module", params=["opt", "bloom", "llama"])
def shards(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory)[1]


def make_engine(shards, device, dtype, graphs, micro_batches=1, kv_bits=16):
    host = HostWeights.from_directory(shards)
    lw = LayerWeights(host, device, dtype, set(range(host.manifest.num_layers)))
    return Engine(lw, local_kv_factory(dtype, device, kv_bits), micro_batches=micro_batches, decode_graphs=graphs)


def greedy(engine, n=7):
    steps = list(engine.generate(PROMPTS, n, Sampling(greedy=True)))
    return [[s[i] for s in steps] for i in range(len(PROMPTS))]


def test_fixed_shape_decode_gives_the_plain_tokens(shards, monkeypatch):
    made = []
    checked = DecodeGraphs.for_request

    def eager_fixed(device, streamed, mbs, forward):  # the recorded step, run without capture
        g = checked(torch.device("cuda"), streamed, mbs, forward)
        g.graphs = [False] * len(mbs)
        made.append(g)
        return g

    cpu = torch.device("cpu")
    plain = greedy(make_engine(shards, cpu, torch.float32, graphs=False, micro_batches=2))
    monkeypatch.setattr(engine_mod.DecodeGraphs, "for_request", staticmethod(eager_fixed))
    fixed = make_engine(shards, cpu, torch.float32, graphs=True, micro_batches=2)
    assert greedy(fixed) == plain
    assert len(made) == 1 and all(mb.kv is None or mb.kv.layers is None for mb in made[0].mbs)  # freed at the end


def small_shape(pad, max_tokens=5):
    """One layer, two heads of 4, scale 0.5."""
    return _Shape(num_layers=1, num_heads=2, head_dim=4, max_tokens=max_tokens, pad=torch.tensor(pad), scale=0.5,
                  alibi=False)


def test_fixed_shapes_mask_the_unwritten_slots_and_stop_at_capacity():
    kv = LocalKV(small_shape([0, 1]), torch.float32, torch.device("cpu"))
    k = torch.randn(2, 2, 3, 4)
    kv.prefill(0, k, k, k)
    kv.layers.k[0][:, :, 3:] = float("nan")  # old memory in the slots not yet written
    kv.fixed_shapes()
    for n in (3, 4):
        kv.advance()
        q = torch.randn(2, 2, 1, 4)
        got = kv.decode_start(0, q, q, q)
        keys = kv.layers.k[0][:, :, : n + 1]
        assert not torch.isnan(got).any()
        s = (q @ keys.transpose(-1, -2)) * 0.5
        s[1, :, :, 0] = float("-inf")  # sequence 1's padding
        want = torch.softmax(s, -1) @ kv.layers.v[0][:, :, : n + 1]
        torch.testing.assert_close(got, want)
    with pytest.raises(StrataError, match="holds 5 tokens"):
        kv.advance()


def test_no_graph_for_a_quantized_cache(shards):
    cpu = torch.device("cpu")
    e = make_engine(shards, cpu, torch.float32, graphs=True, kv_bits=8)
    mbs = engine_mod.split(PROMPTS, 1, e.pad_id)
    for mb in mbs:
        mb.kv = e.kv_factory(e._shape(mb, 20))
    assert DecodeGraphs.for_request(torch.device("cuda"), False, mbs, e.forward) is None
    with pytest.raises(StrataError, match="unquantized"):
        mbs[0].kv.fixed_shapes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_replayed_graph_gives_the_eager_tokens(shards):
    cuda = torch.device("cuda")
    eager = greedy(make_engine(shards, cuda, torch.float16, graphs=False, micro_batches=2), n=9)
    e = make_engine(shards, cuda, torch.float16, graphs=True, micro_batches=2)
    captured = []
    original = DecodeGraphs._first

    def spy(self, *a):
        out = original(self, *a)
        captured.append(self.graphs[a[0]])
        return out

    DecodeGraphs._first = spy
    try:
        assert greedy(e, n=9) == eager
    finally:
        DecodeGraphs._first = original
    assert len(captured) == 2 and all(isinstance(g, torch.cuda.CUDAGraph) for g in captured)


OTHER = [[9, 8, 7, 6, 5, 4], [300, 301], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]  # PROMPTS' lengths but one: same shapes


class EagerGraph:
    """On the CPU, in place of a captured step: replay runs the recorded step again on
    the micro-batch and inputs it was recorded with, writing the same output tensor."""

    def __init__(self, run):
        self.replay = run


def record_eagerly(self, j, mb):
    s_ids, s_pos = self.inputs[j]
    out = self.step(mb, s_ids, s_pos)
    static = out.clone()
    self.graphs[j], self.outputs[j] = EagerGraph(lambda: static.copy_(self.step(mb, s_ids, s_pos))), static
    return out


def fixed_on_cpu(monkeypatch):
    """DecodeGraphs on the CPU, each step 'captured' by record_eagerly."""
    checked = DecodeGraphs.for_request
    monkeypatch.setattr(engine_mod.DecodeGraphs, "for_request",
                        staticmethod(lambda d, streamed, mbs, step: checked(torch.device("cuda"), streamed, mbs, step)))
    monkeypatch.setattr(DecodeGraphs, "_first", record_eagerly)


def tokens_of(engine, prompts, n=7, greedy_=True):
    steps = list(engine.generate(prompts, n, Sampling(greedy=greedy_, temperature=0.8, seed=3)))
    return [[s[i] for s in steps] for i in range(len(prompts))]


def test_renewed_cache_keeps_its_tensors_and_masks_the_new_padding():
    def ready(kv, k):  # prefilled with k, switched to fixed shapes, room for one token
        kv.prefill(0, k, k, k)
        kv.fixed_shapes()
        kv.advance()
        return kv

    kv = ready(LocalKV(small_shape([0, 1]), torch.float32, torch.device("cpu")), torch.randn(2, 2, 3, 4))
    kv.decode_start(0, *[torch.randn(2, 2, 1, 4)] * 3)
    held = [t.data_ptr() for t in (kv.layers.k[0], kv.layers.v[0], kv.pad, *kv._fixed)]
    k2 = torch.randn(2, 2, 3, 4)
    renewed = ready(kv.renew(small_shape([2, 0])), k2)
    assert [t.data_ptr() for t in (kv.layers.k[0], kv.layers.v[0], kv.pad, *kv._fixed)] == held
    q = torch.randn(2, 2, 1, 4)
    fresh = ready(LocalKV(small_shape([2, 0]), torch.float32, torch.device("cpu")), k2)
    torch.testing.assert_close(renewed.decode_start(0, q, q, q), fresh.decode_start(0, q, q, q))
    with pytest.raises(ValueError, match="keeps its batch"):
        kv.renew(small_shape([0, 0], max_tokens=6))


@pytest.mark.parametrize("greedy_", [True, False])
def test_next_request_of_the_same_shapes_replays_the_kept_graphs(shards, monkeypatch, greedy_):
    cpu = torch.device("cpu")
    plain = make_engine(shards, cpu, torch.float32, graphs=False, micro_batches=2)
    fixed_on_cpu(monkeypatch)
    e = make_engine(shards, cpu, torch.float32, graphs=True, micro_batches=2)
    assert tokens_of(e, PROMPTS, greedy_=greedy_) == tokens_of(plain, PROMPTS, greedy_=greedy_)
    assert e.last_stats["graphs_reused"] == 0
    kept_kvs = list(e.kept._kvs)
    assert len(kept_kvs) == 2 and all(kv.layers is not None for kv in kept_kvs)
    recorded = []
    monkeypatch.setattr(DecodeGraphs, "_first", lambda self, j, mb: recorded.append(j))  # must not run again
    assert tokens_of(e, OTHER, greedy_=greedy_) == tokens_of(plain, OTHER, greedy_=greedy_)
    assert e.last_stats["graphs_reused"] == 1 and recorded == []
    assert e.kept._kvs == kept_kvs  # the same caches, kept again


def test_a_request_of_other_shapes_frees_the_kept_caches_first(shards, monkeypatch):
    cpu = torch.device("cpu")
    plain = make_engine(shards, cpu, torch.float32, graphs=False, micro_batches=2)
    fixed_on_cpu(monkeypatch)
    e = make_engine(shards, cpu, torch.float32, graphs=True, micro_batches=2)
    tokens_of(e, PROMPTS)
    old = list(e.kept._kvs)
    made = []
    factory = e.kv_factory
    e.kv_factory = lambda shape: made.append([kv.layers for kv in old]) or factory(shape)
    assert tokens_of(e, PROMPTS, n=9) == tokens_of(plain, PROMPTS, n=9)  # max_tokens differs
    assert made and all(layers is None for layers in made[0])  # freed before the new caches were made
    assert e.last_stats["graphs_reused"] == 0 and e.kept._kvs and e.kept._kvs != old


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_kept_graphs_replay_for_the_next_request_on_cuda(shards):
    cuda = torch.device("cuda")
    eager = make_engine(shards, cuda, torch.float16, graphs=False, micro_batches=2)
    e = make_engine(shards, cuda, torch.float16, graphs=True, micro_batches=2)
    assert greedy(e, n=9) == greedy(eager, n=9)
    first = e.kept._graphs.graphs
    assert tokens_of(e, OTHER, n=9) == tokens_of(eager, OTHER, n=9)
    assert e.last_stats["graphs_reused"] == 1 and e.kept._graphs.graphs == first

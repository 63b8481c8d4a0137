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


def test_fixed_shapes_mask_the_unwritten_slots_and_stop_at_capacity():
    shape = _Shape(num_layers=1, num_heads=2, head_dim=4, max_tokens=5, pad=torch.tensor([0, 1]), scale=0.5,
                   alibi=False)
    kv = LocalKV(shape, torch.float32, torch.device("cpu"))
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

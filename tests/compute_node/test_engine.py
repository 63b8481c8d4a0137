"""The engine's math and schedule against Hugging Face on the same weights, in one
process (the services are exercised in tests/deploy). 16-bit shards hold exactly the
checkpoint's float16 numbers; both sides compute in float32."""

import itertools

import pytest
import torch

import tiny_models
from compute_node.engine import Engine, local_kv_factory
from compute_node.layer_weights import LayerWeights
from compute_node.sampling import Sampling
from compute_node.weights import HostWeights

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 2 + 1, 250], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module", params=["opt", "bloom", "llama", "mistral", "qwen2"])
def model(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory)


def hf_greedy(hf_model, prompt, n):
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_engine(shards, resident=None, micro_batches=1):
    host = HostWeights.from_directory(shards)
    n = host.manifest.num_layers
    lw = LayerWeights(host, torch.device("cpu"), torch.float32, set(range(n)) if resident is None else resident)
    return Engine(lw, local_kv_factory(torch.float32, torch.device("cpu")), micro_batches=micro_batches)


def run(engine, prompts, n):
    steps = list(engine.generate(prompts, n, Sampling(greedy=True)))
    return [[s[i] for s in steps] for i in range(len(prompts))]


def test_padded_batch_greedy_matches_transformers(model):
    hf, shards = model
    ref = tiny_models.load_reference(hf)
    got = run(make_engine(shards), PROMPTS, 8)
    assert got == [hf_greedy(ref, p, 8) for p in PROMPTS]


def test_unpadded_batch_greedy_matches_transformers(model):
    """Equal-length prompts: no padding, so prefill attention runs causal without a mask
    (and OPT's fc1 + relu as one fused GEMM where the weight is dense)."""
    hf, shards = model
    ref = tiny_models.load_reference(hf)
    prompts = [PROMPTS[2], PROMPTS[2][::-1]]
    engine = make_engine(shards)
    assert run(engine, prompts, 8) == [hf_greedy(ref, p, 8) for p in prompts]


def test_streamed_layers_and_micro_batches_give_the_same_tokens(model):
    _, shards = model
    plain = run(make_engine(shards), PROMPTS, 6)
    engine = make_engine(shards, resident={0}, micro_batches=2)
    assert run(engine, PROMPTS, 6) == plain
    # every pass streams layers 1..L-1 in order, the ring running `depth` layers
    # ahead (into the next pass); layer 0 stays resident
    n = engine.dims.num_layers
    loads = engine.w.loads
    assert loads == (list(range(1, n)) * 7)[: len(loads)]
    assert 6 * (n - 1) <= len(loads) <= 6 * (n - 1) + engine.w.depth


def test_sampling_with_seed_is_reproducible_and_differs_from_greedy(model):
    _, shards = model
    engine = make_engine(shards)
    s = Sampling(greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = [x for x in engine.generate(PROMPTS, 8, s)]
    b = [x for x in engine.generate(PROMPTS, 8, s)]
    assert a == b
    c = [x for x in engine.generate(PROMPTS, 8, Sampling(greedy=False, temperature=1.5, seed=8))]
    assert a != c


class _Recorded:
    """A LocalKV that logs each decode start and finish as (event, layer, micro-batch)."""

    def __init__(self, kv, log, index):
        self.kv, self.log, self.index = kv, log, index

    def prefill(self, layer, q, k, v):
        return self.kv.prefill(layer, q, k, v)

    def decode_start(self, layer, q, k, v):
        self.log.append(("start", layer, self.index))
        return layer, self.kv.decode_start(layer, q, k, v)

    def decode_finish(self, handle):
        layer, inner = handle
        self.log.append(("finish", layer, self.index))
        return self.kv.decode_finish(inner)

    def free(self):
        self.kv.free()


def test_decode_is_a_wavefront_the_next_attention_starts_before_the_last_one_finishes(model):
    """With 2 micro-batches, micro-batch 0 starts layer i before micro-batch 1's layer
    i-1 attention is awaited: the KV store always has a call queued. Same tokens."""
    _, shards = model
    plain = run(make_engine(shards), PROMPTS, 3)
    engine = make_engine(shards, micro_batches=2)
    if engine.w.host.manifest.config["model_type"] != "opt":
        pytest.skip("the schedule does not depend on the family")
    log: list = []
    inner, index = engine.kv_factory, itertools.count()
    engine.kv_factory = lambda shape: _Recorded(inner(shape), log, next(index))
    assert run(engine, PROMPTS, 3) == plain
    events = log
    n = engine.dims.num_layers
    step = events[: 4 * n]  # the first decode step: a start and a finish per layer and micro-batch
    expected = [("start", 0, 0), ("start", 0, 1)]
    for i in range(1, n):
        expected += [("finish", i - 1, 0), ("start", i, 0), ("finish", i - 1, 1), ("start", i, 1)]
    expected += [("finish", n - 1, 0), ("finish", n - 1, 1)]
    assert step == expected

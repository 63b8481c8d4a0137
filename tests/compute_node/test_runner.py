"""One pass over the layers (compute_node/runner.py) against Hugging Face on the same
weights, in one process, driven by the scheduler (the services are exercised in
tests/deploy and test_scheduler.py). 16-bit shards hold exactly the checkpoint's
float16 numbers; both sides compute in float32."""

import pytest

import tiny_models
from compute_node.sampling import Sampling
from in_process import InProcess

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 2 + 1, 250], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module", params=["opt", "bloom", "llama", "mistral", "qwen2"])
def model(request, tmp_path_factory):
    hf, shards = tiny_models.converted(request.param, tmp_path_factory)
    return hf, shards, tiny_models.greedy_reference(hf, PROMPTS, 8)


def test_prompts_of_different_lengths_give_transformers_greedy_tokens(model):
    """Each sequence keeps its own length in its slot (no padding to the longest)."""
    _, shards, want = model
    assert InProcess(shards).generate(PROMPTS, 8) == want


def test_prompts_of_one_length_prefilled_as_one_batch_give_transformers_tokens(model):
    """Equal-length prompts attend as one batch in the packed prefill (and OPT's fc1 +
    relu run as one fused GEMM where the weight is dense)."""
    hf, shards, _ = model
    prompts = [PROMPTS[2], PROMPTS[2][::-1]]
    assert InProcess(shards, groups=(2,)).generate(prompts, 8) == tiny_models.greedy_reference(hf, prompts, 8)


def test_streamed_layers_and_groups_give_the_same_tokens(model):
    _, shards, want = model
    node = InProcess(shards, groups=(2, 1), resident={0})
    assert node.generate(PROMPTS, 6) == [w[:6] for w in want]
    # every pass (a prefill, then five decode steps) streams layers 1..L-1 in order, the
    # ring running `depth` layers ahead (into the next pass); layer 0 stays resident
    n, loads = node.dims.num_layers, node.weights.loads
    assert loads == (list(range(1, n)) * 7)[: len(loads)]
    assert 6 * (n - 1) <= len(loads) <= 6 * (n - 1) + node.weights.depth


def test_sampling_with_seed_is_reproducible_and_differs_with_another_seed(model):
    _, shards, want = model
    node = InProcess(shards)
    s = Sampling(greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a, b = node.generate(PROMPTS, 8, s), node.generate(PROMPTS, 8, s)
    assert a == b and a != want
    assert node.generate(PROMPTS, 8, Sampling(greedy=False, temperature=1.5, seed=8)) != a


class _Recorded:
    """A group's slots that log each decode start and finish as (event, layer, group);
    `overlaps`: whether they stand for a cache whose attention runs elsewhere (the KV
    store) between start and finish."""

    def __init__(self, kv, log, index, overlaps=True):
        self.kv, self.log, self.index, self.overlaps = kv, log, index, overlaps

    def __getattr__(self, name):
        return getattr(self.kv, name)

    def decode_start(self, layer, view, q, k, v):
        self.log.append(("start", layer, self.index))
        return layer, self.kv.decode_start(layer, view, q, k, v)

    def decode_finish(self, handle):
        layer, inner = handle
        self.log.append(("finish", layer, self.index))
        return self.kv.decode_finish(inner)


def test_decode_is_a_wavefront_the_next_attention_starts_before_the_last_one_finishes(model):
    """With 2 groups, group 0 starts layer i before group 1's layer i-1 attention is
    awaited: the KV store always has a call queued. Same tokens."""
    _, shards, want = model
    node = InProcess(shards, groups=(2, 1))
    if node.weights.host.manifest.config["model_type"] != "opt":
        pytest.skip("the schedule does not depend on the family")
    log: list = []
    node.runner.groups[:] = [_Recorded(kv, log, g) for g, kv in enumerate(node.kvs)]
    assert node.generate(PROMPTS, 3) == [w[:3] for w in want]
    n = node.dims.num_layers
    step = log[: 4 * n]  # the first decode step: a start and a finish per layer and group
    expected = [("start", 0, 0), ("start", 0, 1)]
    for i in range(1, n):
        expected += [("finish", i - 1, 0), ("start", i, 0), ("finish", i - 1, 1), ("start", i, 1)]
    expected += [("finish", n - 1, 0), ("finish", n - 1, 1)]
    assert step == expected and len(log) == 2 * len(step)  # two decode steps


def test_a_cache_on_the_device_finishes_each_layer_before_the_next_is_loaded(model):
    """Groups whose attention runs where they are (the GPU cache) finish layer i before
    layer i+1's weights are asked for, so one dense copy of a layer is alive at a time.
    Same tokens."""
    _, shards, want = model
    node = InProcess(shards, groups=(2, 1))
    if node.weights.host.manifest.config["model_type"] != "opt":
        pytest.skip("the schedule does not depend on the family")
    log: list = []
    node.runner.groups[:] = [_Recorded(kv, log, g, overlaps=False) for g, kv in enumerate(node.kvs)]
    get_pair = node.weights.get_pair
    node.weights.get_pair = lambda i, *a: (log.append(("get", i, None)), get_pair(i, *a))[1]
    assert node.generate(PROMPTS, 3) == [w[:3] for w in want]
    n = node.dims.num_layers
    first = log.index(("start", 0, 0)) - 1  # the first decode pass's get of layer 0
    step = log[first: first + 5 * n]
    expected = []
    for i in range(n):
        expected += [("get", i, None), ("start", i, 0), ("finish", i, 0), ("start", i, 1), ("finish", i, 1)]
    assert step == expected

"""Greedy decode with the tokens fed back on the device and each step launched before the
previous one's tokens are read (compute_node/decode_loop.py). On the CPU the loop runs
synchronously, so its order shows in the calls: when step t is yielded, step t+1 has
been launched, and never a step past max_new_tokens. The tokens are those of
transformers and of the per-step host path (sampling with top_k=1 takes it)."""

import dataclasses

import pytest
import torch

import tiny_models
from compute_node import engine as engine_mod
from compute_node.decode_graph import DecodeGraphs
from compute_node.decode_loop import GreedyDecode
from compute_node.engine import Engine, local_kv_factory
from compute_node.layer_weights import LayerWeights
from compute_node.sampling import Sampling
from compute_node.weights import HostWeights

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
GREEDY = Sampling(greedy=True)


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory)


def make_engine(shards, micro_batches=1):
    host = HostWeights.from_directory(shards)
    lw = LayerWeights(host, torch.device("cpu"), torch.float32, set(range(host.manifest.num_layers)))
    return Engine(lw, local_kv_factory(torch.float32, torch.device("cpu")), micro_batches=micro_batches)


def columns(steps, n):
    return [[s[i] for s in steps] for i in range(n)]


def count_decode_steps(engine, log):
    """Wraps engine.forward: `log` gets one entry per decode step launched."""
    forward = engine.forward

    def counted(mbs, inputs, prefill):
        if not prefill:
            log.append(len(mbs))
        return forward(mbs, inputs, prefill)

    engine.forward = counted


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_greedy_feedback_gives_the_tokens_of_transformers_and_of_the_host_path(model, micro_batches):
    hf, shards = model
    want = tiny_models.greedy_reference(hf, PROMPTS, 7)
    engine = make_engine(shards, micro_batches)
    assert columns(list(engine.generate(PROMPTS, 7, GREEDY)), 3) == want
    host_path = Sampling(greedy=False, top_k=1)  # argmax drawn on the host, inputs rebuilt there every step
    assert columns(list(engine.generate(PROMPTS, 7, host_path)), 3) == want


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_each_step_is_launched_before_the_previous_one_is_read_and_none_past_the_end(model, micro_batches,
                                                                                    monkeypatch):
    _, shards = model
    engine = make_engine(shards, micro_batches)
    log: list = []
    count_decode_steps(engine, log)  # "launch" entries: the step's micro-batches
    ready = GreedyDecode._ready
    monkeypatch.setattr(GreedyDecode, "_ready", staticmethod(lambda *a: log.append("read") or ready(*a)))
    n = 5
    for _ in engine.generate(PROMPTS, n, GREEDY):
        log.append("yield")
    launch = micro_batches
    # step 1 launched before step 0 (the prefill's) is yielded; step t+1 before step t is read
    assert log == [launch, "yield"] + [launch, "read", "yield"] * (n - 2) + ["read", "yield"]
    log.clear()
    assert len(list(engine.generate(PROMPTS, 1, GREEDY))) == 1
    assert log == []


def _finishing_prompts(engine, n):
    """Prompts that reach one token, taken as EOS, at three different steps: a prompt
    and the same prompt extended by one and by two of its greedy tokens. (prompts, eos,
    the step each one finishes at)."""
    g = columns(list(engine.generate([PROMPTS[0]], n, GREEDY)), 1)[0]
    k = next(k for k in range(2, n) if g[k] not in g[:k])
    return [PROMPTS[0], PROMPTS[0] + g[:1], PROMPTS[0] + g[:2]], g[k], [k, k - 1, k - 2]


def _stopped(full, eos):
    """The steps `generate(..., stop_at_eos=True)` yields, from the tokens of the run without stop."""
    finished, steps = [False] * len(full), []
    for s in range(len(full[0])):
        steps.append([-1 if finished[i] else seq[s] for i, seq in enumerate(full)])
        finished = [f or seq[s] == eos for f, seq in zip(finished, full)]
        if all(finished):
            break
    return steps


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_stop_at_eos_with_sequences_finishing_at_different_steps(model, micro_batches):
    _, shards = model
    engine = make_engine(shards, micro_batches)
    prompts, eos, ends = _finishing_prompts(engine, 10)
    n = ends[0] + 3
    full = columns(list(engine.generate(prompts, n, GREEDY)), 3)
    assert [seq.index(eos) for seq in full] == ends  # the batch's sequences finish where planned
    engine.dims = dataclasses.replace(engine.dims, eos_token_id=eos)
    launched: list = []
    count_decode_steps(engine, launched)
    got = list(engine.generate(prompts, n, GREEDY, stop_at_eos=True))
    assert got == _stopped(full, eos) and len(got) == ends[0] + 1
    assert len(launched) == len(got)  # the one step launched ahead when the last finished, dropped
    launched.clear()
    short = list(engine.generate(prompts, ends[0], GREEDY, stop_at_eos=True))  # sequence 0 never finishes
    assert short == _stopped([seq[: ends[0]] for seq in full], eos) and len(launched) == ends[0] - 1


def test_fixed_shape_steps_feed_back_through_the_decode_graphs(model, monkeypatch):
    """The decode graphs' path (on the CPU their recorded step runs eagerly): the inputs
    are handed over once, each step writes the next one's; one cache advance a step."""
    _, shards = model
    plain = list(make_engine(shards, 2).generate(PROMPTS, 7, GREEDY))
    made, checked = [], DecodeGraphs.for_request

    def eager_fixed(device, streamed, mbs, step):
        g = checked(torch.device("cuda"), streamed, mbs, step)
        g.graphs = [False] * len(mbs)
        for mb in mbs:
            advance = mb.kv.advance
            mb.kv.advance = lambda advance=advance: (made.append("advance"), advance())
        return g

    monkeypatch.setattr(engine_mod.DecodeGraphs, "for_request", staticmethod(eager_fixed))
    assert list(make_engine(shards, 2).generate(PROMPTS, 7, GREEDY)) == plain
    assert len(made) == 2 * 6  # two micro-batches, six decode steps


def test_a_consumer_that_stops_early_frees_the_cache_after_the_step_launched_ahead(model):
    _, shards = model
    engine = make_engine(shards, 2)
    caches, launched = [], []
    inner = engine.kv_factory
    engine.kv_factory = lambda shape: caches.append(inner(shape)) or caches[-1]
    count_decode_steps(engine, launched)
    steps = engine.generate(PROMPTS, 8, GREEDY)
    next(steps), next(steps)
    steps.close()
    assert len(launched) == 2 and len(caches) == 2 and all(kv.layers is None for kv in caches)
    assert set(engine.last_stats) >= {"prefill_s", "decode_s"}

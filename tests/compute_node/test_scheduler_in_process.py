"""The scheduler over a real Runner in one process (the services: test_scheduler.py):
greedy tokens and the sampling path's argmax are transformers' tokens, sequences of a
request end at EOS at different steps with no pass after the last, and a cancelled
request frees its slots without disturbing a request running beside it; with a prefill
budget a request's prompts go in over several passes that decode the first ones."""

import pytest

import tiny_models
from compute_node.sampling import Sampling
from in_process import InProcess, collect, columns, finishing_prompts, request
from strata.runtime.errors import ErrorKind, StrataError

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory)


@pytest.mark.parametrize("groups", [(3,), (2, 1)])
def test_greedy_and_the_sampling_paths_argmax_give_transformers_tokens(model, groups):
    hf, shards = model
    want = tiny_models.greedy_reference(hf, PROMPTS, 7)
    node = InProcess(shards, groups=groups)
    assert node.generate(PROMPTS, 7) == want
    assert node.generate(PROMPTS, 7, Sampling(greedy=False, top_k=1)) == want  # drawn by choose(), one candidate


def _stopped(full, eos):
    """The steps a request with stop_at_eos streams, from the tokens of the run without."""
    finished, steps = [False] * len(full), []
    for s in range(max(len(seq) for seq in full)):
        steps.append([-1 if finished[i] else seq[s] for i, seq in enumerate(full)])
        finished = [f or seq[s] == eos for f, seq in zip(finished, full)]
        if all(finished):
            break
    return steps


def _counting_passes(node):
    passes = []
    step = node.runner.step
    node.runner.step = lambda joins, steps: passes.append(1) or step(joins, steps)
    return passes


@pytest.mark.parametrize("groups", [(3,), (2, 1)])
def test_stop_at_eos_with_sequences_finishing_at_different_steps(model, groups):
    _, shards = model
    node = InProcess(shards, groups=groups)
    # the first prompt finishes first: its row idles while the rows after it decode
    prompts, eos, ends = finishing_prompts(node, PROMPTS[0], 10, [2, 0, 1])
    last = max(ends)
    full = node.generate(prompts, last + 3)
    assert [seq.index(eos) for seq in full] == ends  # the sequences finish where planned
    node.eos = eos
    passes = _counting_passes(node)
    got = node.steps(prompts, last + 3, stop_at_eos=True)
    assert got == _stopped(full, eos) and len(got) == last + 1 and len(passes) == len(got)
    short = node.steps(prompts, last, stop_at_eos=True)  # the last one ends by max tokens instead
    assert short == _stopped([seq[:last] for seq in full], eos)


def test_a_cancelled_request_frees_its_slots_and_disturbs_no_other(model):
    _, shards = model
    node = InProcess(shards, groups=(2, 2))
    if node.weights.host.manifest.config["model_type"] != "opt":
        pytest.skip("cancellation does not depend on the family")
    other = PROMPTS[:2]
    alone = node.generate(other, 6)
    with node.scheduler() as s:
        cut = s.submit(request([[5, 6, 7], [8, 9]], 30))
        cut.outbox.get(timeout=60)  # running
        beside = s.submit(request(other, 6))
        got = columns(collect(beside))
        s.cancel(cut)
        with pytest.raises(StrataError) as e:
            collect(cut)
        assert e.value.kind is ErrorKind.CANCELLED
        assert s.pool.free == 4 and not s.running
    assert got == alone


@pytest.mark.parametrize("groups", [(3,), (2, 1)])
def test_a_prefill_budget_spreads_a_requests_prompts_over_passes_that_decode(model, groups):
    hf, shards = model
    want = tiny_models.greedy_reference(hf, PROMPTS, 7)
    node = InProcess(shards, groups=groups, prefill_budget=8)  # prompts of 6, 3 and 10 tokens
    passes = []
    step = node.runner.step

    def recording(joins, steps):
        passes.append(([len(j.ids) for j in joins], sorted(n for s in steps for n in range(len(s.ids))
                                                           if n not in s.idle)))
        return step(joins, steps)

    node.runner.step = recording
    got = node.steps(PROMPTS, 7)
    # 6 fits the budget, 6 + 3 does not: a pass each; 10 is over it and goes alone
    assert [p[0] for p in passes[:3]] == [[6], [3], [10]] and all(not p[0] for p in passes[3:])
    assert [len(p[1]) for p in passes[:4]] == [0, 1, 2, 3]  # each pass decodes those prefilled before it
    # the first step has the first prompt's token alone; each sequence has its 7 tokens
    assert got[0] == [want[0][0], -1, -1] and columns(got) == want
    assert len(passes) == len(got) == 7 + 2

"""check_generate: a request is refused iff one of its fields is out of range, with
INVALID_ARGUMENT naming a bad field (a property test over every field), and the
limits the compute node derives from its config and model."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compute_node.validation import CHARS_PER_TOKEN, RequestLimits, check_generate
from strata.runtime.config import ComputeNodeConfig
from strata.runtime.errors import ErrorKind, StrataError
from strata.transport.wire import generate_pb2

LIMITS = RequestLimits(max_prompts=4, max_prompt_tokens=6, max_prompt_chars=12, max_sequence_tokens=16,
                       sequence_limit="the model's 16 positions", vocab=50, max_stops=2, max_stop_chars=5)

texts = st.text(max_size=16)
ids = st.lists(st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(-2, 60), max_size=9)
prompts = st.lists(st.one_of(st.none(), texts, ids), max_size=5)
floats32 = st.floats(width=32) | st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.0, -1.0, math.nan, math.inf])


def request(ps, new, temperature, top_p, top_k, seed, stops) -> generate_pb2.GenerateRequest:
    msgs = []
    for p in ps:
        if p is None:
            msgs.append(generate_pb2.Prompt())
        elif isinstance(p, str):
            msgs.append(generate_pb2.Prompt(text=p))
        else:
            msgs.append(generate_pb2.Prompt(ids=generate_pb2.TokenIds(ids=p)))
    return generate_pb2.GenerateRequest(
        prompts=msgs, max_new_tokens=new, stop=stops,
        sampling=generate_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))


def bad_fields(req: generate_pb2.GenerateRequest, lim: RequestLimits) -> set[str]:
    """Words naming each field of `req` that is out of range (an independent statement
    of the rules)."""
    bad = set()
    if not req.prompts or len(req.prompts) > lim.max_prompts:
        bad.add("prompts")
    new = req.max_new_tokens
    if new < 1 or new >= lim.max_sequence_tokens:
        bad.add("max_new_tokens")
    t, p = req.sampling.temperature, req.sampling.top_p
    if math.isnan(t) or t < 0 or math.isinf(t):
        bad.add("sampling.temperature")
    if math.isnan(p) or not 0 <= p <= 1:
        bad.add("sampling.top_p")
    if len(req.stop) > lim.max_stops or any(not s or len(s) > lim.max_stop_chars for s in req.stop):
        bad.add("stop")
    for i, prompt in enumerate(req.prompts):
        kind = prompt.WhichOneof("input")
        if kind == "text":
            if not prompt.text or len(prompt.text) > lim.max_prompt_chars:
                bad.add(f"prompt {i}")
        elif kind is None or not prompt.ids.ids:
            bad.add(f"prompt {i}")
        else:
            x = list(prompt.ids.ids)
            if len(x) > lim.max_prompt_tokens or any(not 0 <= v < lim.vocab for v in x) or \
                    len(x) + new > lim.max_sequence_tokens:
                bad.add(f"prompt {i}")
    return bad


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts, st.integers(0, (1 << 32) - 1) | st.integers(0, 20), floats32, floats32,
       st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 64) - 1), st.lists(st.text(max_size=7), max_size=3))
def test_a_request_is_refused_iff_a_field_is_bad_and_the_message_names_one(ps, new, temperature, top_p, top_k,
                                                                           seed, stops):
    req = request(ps, new, temperature, top_p, top_k, seed, stops)
    bad = bad_fields(req, LIMITS)
    if not bad:
        check_generate(req, LIMITS)
        return
    with pytest.raises(StrataError) as info:
        check_generate(req, LIMITS)
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT
    message = str(info.value)
    named = {"prompts": ("prompts",), "max_new_tokens": ("max_new_tokens",), "stop": ("stop",),
             "sampling.temperature": ("sampling.temperature",), "sampling.top_p": ("sampling.top_p",)}
    assert any(word in message for field in bad for word in named.get(field, (field,))), (bad, message)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", math.nan, "sampling.temperature"),
    ("temperature", -0.5, "sampling.temperature"),
    ("temperature", math.inf, "sampling.temperature"),
    ("top_p", 1.5, "sampling.top_p"),
    ("top_p", -0.1, "sampling.top_p"),
    ("top_p", math.nan, "sampling.top_p"),
])
def test_sampling_fields_out_of_range_are_named_even_without_limits(field, value, words):
    req = request([[1, 2]], 3, 1.0, 1.0, 0, 0, [])
    setattr(req.sampling, field, value)
    with pytest.raises(StrataError, match=words) as info:
        check_generate(req)
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT


def test_a_text_prompt_to_a_model_without_tokenizer_is_refused_before_other_fields():
    """What deploy/client.has_tokenizer relies on: the text check comes first."""
    req = request(["hello"], 0, 1.0, 1.0, 0, 0, [])
    with pytest.raises(StrataError) as info:
        check_generate(req, RequestLimits(has_tokenizer=False))
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION and "tokenizer" in str(info.value)
    with pytest.raises(StrataError) as info:
        check_generate(req, RequestLimits())
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT and "max_new_tokens" in str(info.value)


def test_limits_from_the_config_and_the_model():
    config = ComputeNodeConfig(listen="", session="", weight_store="", kv_store="")
    lim = RequestLimits.for_model(config, positions=2048, vocab=50272, capacity=512)
    assert (lim.max_sequence_tokens, lim.max_prompt_tokens) == (512, 511)
    assert lim.max_prompt_chars == CHARS_PER_TOKEN * 511
    assert "512 tokens a sequence may hold" in lim.sequence_limit
    lim = RequestLimits.for_model(ComputeNodeConfig(listen="", session="", weight_store="", kv_store="",
                                                    max_prompt_tokens=100, max_prompt_chars=300), 2048, 50272)
    assert (lim.max_sequence_tokens, lim.max_prompt_tokens, lim.max_prompt_chars) == (2048, 100, 300)
    assert lim.sequence_limit == "the model's 2048 positions"

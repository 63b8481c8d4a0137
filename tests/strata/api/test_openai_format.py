"""OpenAI bodies -> Generate calls and back (strata/api/openai_format.py), alone."""

import pytest

from strata.api import openai_format as oai
from strata.api.client import Result, Stats


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0), ("top_p", 1.5), ("seed", -1),
    ("max_tokens", 0), ("max_tokens", True), ("stop", ""), ("stop", [1]), ("logprobs", 3), ("echo", True),
    ("prompt", []), ("prompt", [-1]), ("prompt", 7), ("model", None),
])
def test_a_bad_field_is_a_400_naming_it(field, value):
    body = {"model": "m", "prompt": "hi", field: value}
    with pytest.raises(oai.APIError) as e:
        oai.completion_job(body)
    assert e.value.status == 400 and e.value.param == field
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_completion_fields_become_the_generate_call():
    job = oai.completion_job({"model": "m", "prompt": ["a", [1, 2]], "max_tokens": 5, "temperature": 0,
                              "stop": "\n", "seed": 3, "ignore_eos": True})
    assert job.prompts == ["a", [1, 2]] and job.max_new_tokens == 5 and job.greedy
    assert job.sampling() == dict(greedy=True, temperature=1.0, top_k=0, top_p=1.0, seed=3, stop=("\n",),
                                  stop_at_eos=False)
    assert oai.completion_job({"model": "m", "prompt": "x"}).max_new_tokens == oai.DEFAULT_COMPLETION_MAX_TOKENS


def test_chat_needs_a_template_and_renders_text_parts():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 7}
    with pytest.raises(oai.APIError, match="chat template"):
        oai.chat_job(body, None)
    job = oai.chat_job(body, lambda messages: [len(messages[0]["content"])])
    assert job.prompts == [[2]] and job.max_new_tokens == 7 and job.kind == "chat"


def test_responses_carry_usage_and_finish_reasons():
    job = oai.chat_job({"model": "m", "messages": [{"role": "user", "content": "x"}]}, lambda m: [1, 2, 3])
    result = Result(texts=["ok"], tokens=[[9, 2]], finish_reasons=["stop"], prompt_tokens=[3], stats=Stats())
    body = oai.response_body(job, result)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert oai.from_call_error("RESOURCE_EXHAUSTED", "the wait queue is full; retry later").status == 429
    assert oai.from_call_error("RESOURCE_EXHAUSTED", "prompt 0: 900 tokens exceed the slot").status == 400
    assert oai.from_call_error("UNAUTHENTICATED", "no key").status == 401


def test_chat_without_max_tokens_ends_within_the_models_positions():
    class Render:
        context = 10  # the model's positions

        def __call__(self, messages):
            return [1] * 7

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert oai.chat_job(body, Render()).max_new_tokens == 3
    assert oai.chat_job({**body, "max_tokens": 5}, Render()).max_new_tokens == 5  # asked for: the server judges

"""`strata serve --http --api-key`: the real `openai` package against the four
processes (a tiny OPT whose tokenizer_config.json has a chat template), and /metrics
read with prometheus_client's parser."""

import json
import pathlib
import urllib.request

import openai
import pytest

import tiny_models

from serving import Server

pytestmark = pytest.mark.slow
KEY = "sesame"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def with_chat_template(hf_dir: pathlib.Path) -> None:
    """As many hub checkpoints: the template inside tokenizer_config.json."""
    path = hf_dir / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tools.convert import convert

    hf = tmp_path_factory.mktemp("chat") / "hf"
    tiny_models.make_opt(hf)
    with_chat_template(hf)
    shards = hf.parent / "tiny-chat"
    convert(hf, shards, bits=16)
    server = Server(shards, "--http", "127.0.0.1:0", "--api-key", KEY)
    line = server.proc.stdout.readline().strip()
    assert line.startswith("HTTP API on http://"), line
    base = line.split(" on ", 1)[1]
    yield server, base, hf
    assert server.stop() == 0
    assert server.alive_children() == []


@pytest.fixture(scope="module")
def client(served):
    _, base, _ = served
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_completion_streamed_equals_the_whole_response_and_carries_usage(client):
    kw = dict(model="tiny-chat", prompt="hello world", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_token_id_prompts_give_one_choice_each(client):
    out = client.completions.create(model="tiny-chat", prompt=[[5, 17, 33], [44, 3, 250]], max_tokens=4,
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.prompt_tokens == 6


def test_chat_renders_the_checkpoints_template_as_transformers_does(client, served):
    from transformers import AutoTokenizer

    _, _, hf = served
    messages = [{"role": "user", "content": "the quick brown fox"}]
    out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
    ids = AutoTokenizer.from_pretrained(hf).apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert out.choices[0].message.role == "assistant"
    # the same prompt as token ids through /v1/completions gives the same text
    same = client.completions.create(model="tiny-chat", prompt=list(ids["input_ids"] if hasattr(ids, "keys") else ids),
                                     max_tokens=6, temperature=0)
    assert out.choices[0].message.content == same.choices[0].text

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def test_bad_requests_are_400_in_openais_error_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=4, n=2)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=4, temperature=-1)


def test_metrics_parse_and_request_counters_move(served, client):
    from prometheus_client.parser import text_string_to_metric_families

    _, base, _ = served

    def scrape() -> dict:
        text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    key = ("strata_http_requests_total", (("route", "/v1/completions"), ("status", "200")))
    before = scrape()
    usage = client.completions.create(model="tiny-chat", prompt="hello", max_tokens=3, temperature=0).usage
    after = scrape()
    assert after[key] == before.get(key, 0) + 1
    assert after[("strata_compute_node_up", ())] == 1
    # the compute node's scheduler values (Generator.Stats), as counters, gauges and histograms
    for name in ("strata_queue_depth", "strata_running_sequences", "strata_batch_slots",
                 "strata_batch_occupancy_ratio", "strata_h2d_gigabytes_per_second"):
        assert (name, ()) in after, name
    assert any(name == "strata_kv_capacity_bytes" and dict(labels).get("home") for name, labels in after)

    def moved(name, labels=()):
        return after[(name, labels)] - before[(name, labels)]

    assert moved("strata_requests_total", (("outcome", "ok"),)) == 1
    assert moved("strata_generated_tokens_total") == usage.completion_tokens
    assert moved("strata_prompt_tokens_total") == usage.prompt_tokens
    assert moved("strata_time_to_first_token_seconds_count") == 1
    assert moved("strata_inter_token_latency_seconds_count") == usage.completion_tokens - 1


def test_the_servers_api_key_is_needed(served):
    _, base, _ = served
    stranger = openai.OpenAI(base_url=base + "/v1", api_key="guess", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.completions.create(model="tiny-chat", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"


def test_health_and_ready(served):
    _, base, _ = served
    for path in ("/health", "/ready"):
        with urllib.request.urlopen(base + path, timeout=30) as r:
            assert r.status == 200

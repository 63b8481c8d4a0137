"""The gateway app in process, before any call reaches a compute node: the API key,
chat on a model without a template, unknown routes, and the Stats -> Prometheus
mapping, all in OpenAI's error shape."""

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import GatewayConfig, create_app
from gateway.metrics import families

NOWHERE = "127.0.0.1:9"  # nothing listens: any call that got through would fail


@pytest.fixture
def app_with_key():
    with TestClient(create_app(GatewayConfig(endpoint=NOWHERE, model_name="m", api_key="sesame"))) as c:
        yield c


def test_a_key_is_needed_where_one_is_configured(app_with_key):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sesame"}):
        r = app_with_key.get("/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    r = app_with_key.get("/v1/models", headers={"authorization": "Bearer sesame"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"
    assert app_with_key.get("/health").status_code == 200  # probes need no key


def test_chat_on_a_model_without_a_template_is_a_clear_400():
    with TestClient(create_app(GatewayConfig(endpoint=NOWHERE, model_name="m"))) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        assert "chat template" in r.json()["error"]["message"]
        assert c.get("/v1/nothing").status_code == 404
        assert c.post("/v1/completions", content=b"{not json").json()["error"]["code"] == "invalid_json"


def test_an_unreachable_compute_node_is_503_and_not_ready():
    from gateway.app import GatewayConfig as Config

    with TestClient(create_app(Config(endpoint=NOWHERE, model_name="m", timeout_s=2))) as c:
        assert c.get("/ready").status_code == 503
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        metrics = c.get("/metrics").text
        assert "strata_compute_node_up 0.0" in metrics


def test_stats_become_counters_gauges_and_histograms():
    values = {"requests_total:ok": 3, "requests_total:error": 1, "queue_depth": 2, "generated_tokens_total": 40,
              "kv_bytes_used:gpu": 100, "kv_bytes_capacity:kv_store": 1000, "h2d_bytes_total": 4e9,
              "h2d_seconds_total": 2.0, "ttft_seconds_bucket:0.1": 1, "ttft_seconds_bucket:1.0": 3,
              "ttft_seconds_bucket:+Inf": 4, "ttft_seconds_sum": 5.5, "ttft_seconds_count": 4, "new_thing_total": 7}
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self):
            return families(values)

    registry = CollectorRegistry()
    registry.register(Fixed())
    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert parsed["strata_requests"].type == "counter"
    assert {s.labels["outcome"]: s.value for s in parsed["strata_requests"].samples if s.name.endswith("_total")} == \
        {"ok": 3, "error": 1}
    assert parsed["strata_queue_depth"].type == "gauge"
    assert parsed["strata_kv_used_bytes"].samples[0].labels == {"home": "gpu"}
    assert parsed["strata_h2d_gigabytes_per_second"].samples[0].value == 2.0
    ttft = parsed["strata_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert {s.name: s.value for s in ttft.samples if not s.name.endswith("_bucket")} == \
        {"strata_time_to_first_token_seconds_count": 4, "strata_time_to_first_token_seconds_sum": 5.5}
    assert parsed["strata_new_thing"].type == "counter"

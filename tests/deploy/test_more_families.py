"""The families not in test_serve_generate (Mistral; GPT-NeoX, added as one module)
through `strata serve` as three processes, both KV modes: greedy tokens equal
transformers'."""

import signal

import pytest

import tiny_models
from serving import Server
from test_serve_generate import PROMPTS, generate_ids

NEW = 6


@pytest.fixture(scope="module", params=["mistral", "gpt_neox"])
def converted(request, tmp_path_factory):
    hf, out = tiny_models.converted(request.param, tmp_path_factory)
    return out, tiny_models.greedy_reference(hf, PROMPTS, NEW)


@pytest.mark.parametrize("kv_flags", [[], ["--kv-offload"]], ids=["kv-local", "kv-offload"])
def test_served_greedy_tokens_equal_transformers(converted, kv_flags):
    shards, expected = converted
    server = Server(shards, *kv_flags)
    try:
        out = generate_ids(server.address, PROMPTS, NEW)
        assert out.returncode == 0, out.stderr
        got = [[int(t) for t in line.split()] for line in out.stdout.strip().splitlines()]
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert got == expected

"""Weights on disk through `strata serve`: layers read from their shard files into
staging slots every pass (all of them, or those beyond a host budget), as three OS
processes; greedy tokens equal Hugging Face's, and equal the host-tier run's for
INT4 shards."""

import signal

import pytest

import tiny_models
from serving import Server, shm_entries
from strata.model.manifest import Manifest, align
from test_serve_generate import PROMPTS, generate_ids
from tools.convert import convert

NEW = 6


@pytest.fixture(scope="module", params=["opt", "llama"])
def checkpoint(request, tmp_path_factory):
    hf, s16 = tiny_models.converted(request.param, tmp_path_factory)
    s4 = hf.parent / "s4"
    convert(hf, s4, bits=4, group_size=32)
    return s16, s4, tiny_models.greedy_reference(hf, PROMPTS, NEW)


def served_tokens(shards, *flags):
    before = shm_entries()
    server = Server(shards, *flags)
    try:
        runs = [generate_ids(server.address, PROMPTS, NEW) for _ in range(2)]  # the second restarts the ring
        for out in runs:
            assert out.returncode == 0, out.stderr
        got = [[[int(t) for t in line.split()] for line in out.stdout.strip().splitlines()] for out in runs]
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0 and server.alive_children() == []
    assert shm_entries() - before == set()
    assert got[0] == got[1]
    return got[0]


def budget_for_layers(shards, n: int) -> str:
    """A --host-budget-gb that holds embeddings, head, staging slots and `n` layers."""
    m = Manifest.load(shards)
    layer = max(align(m.layer(i).size) for i in range(m.num_layers))
    fixed = sum(align(s.size) for name, s in m.shards.items() if not name.startswith("layer."))
    return repr((fixed + (3 + n) * layer) / 2**30)


@pytest.mark.parametrize("flags", [
    ["--disk-offload", "--gpu-weight-share", "0"],
    ["--disk-offload"],
    ["--disk-offload", "--gpu-weight-share", "0.5", "--micro-batches", "2"],
], ids=["every-layer-from-disk-every-pass", "all-resident-read-once", "half-resident-half-from-disk"])
def test_layers_on_disk_give_the_tokens_of_transformers(checkpoint, flags):
    s16, _, expected = checkpoint
    assert served_tokens(s16, *flags) == expected


def test_a_host_budget_smaller_than_the_shards_runs_with_kv_offload(checkpoint):
    s16, _, expected = checkpoint
    flags = ["--gpu-weight-share", "0", "--host-budget-gb", budget_for_layers(s16, 1), "--kv-offload"]
    assert served_tokens(s16, *flags) == expected


def test_int4_layers_from_disk_equal_the_host_tier_run(checkpoint):
    _, s4, _ = checkpoint
    host = served_tokens(s4, "--gpu-weight-share", "0")
    assert served_tokens(s4, "--gpu-weight-share", "0", "--disk-offload") == host

"""Decode-only passes as fixed-shape steps per bucket of rows (compute_node/slot_graphs.py),
captured by the device: on mock-cuda (what CI runs) each bucket is warmed up on a side
stream, captured and replayed, every replay checked to be its capture (same ops,
shapes, input memory), and must give the plain steps' logits and tokens: learned
positions, ALiBi and rotary positions, two groups, idle rows, smaller buckets, and
slots holding an earlier request's keys. On CUDA the replayed graphs must give the
tokens of the eager runner."""

import pytest
import torch

import tiny_models
from compute_node.device.mock import MockGraph
from compute_node.runner import GroupStep, Join
from in_process import InProcess

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
OTHER = [[9, 8, 7, 6], [300, 301, 302, 303, 304, 305, 306, 307], [1, 2]]


@pytest.fixture(scope="module", params=["opt", "bloom", "llama"])
def shards(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory)[1]


def test_fixed_shape_steps_give_the_plain_tokens_request_after_request(shards):
    """Two groups (buckets of 2 and 1 rows); the second request's slots hold the first
    one's keys past its own lengths, masked."""
    plain = InProcess(shards, groups=(2, 2))
    fixed = InProcess(shards, groups=(2, 2), device="mock-cuda", graphs=True)
    assert fixed.runner.uses_graphs and not plain.runner.uses_graphs
    for prompts in (PROMPTS, OTHER):
        assert fixed.generate(prompts, 7) == plain.generate(prompts, 7)
    assert [sorted(g.views) for g in fixed.runner.graphs] == [[2], [1]]
    graphs = [graph for g in fixed.runner.graphs for graph in g.graphs.values()]
    assert all(isinstance(graph, MockGraph) for graph in graphs)  # captured, none fell back to eager
    assert all(graph.replays >= 5 for graph in graphs)  # and replayed in both requests


# a group of 4 slots: (rows that step, idle rows among them); later rows have finished
STEPS = [(4, []), (4, [0]), (3, [0, 1]), (2, [0]), (2, []), (1, [])]


def test_idle_rows_and_smaller_buckets_give_the_plain_logits(shards):
    """Runner passes driven directly: four prompts join a group of 4 slots, then decode
    steps of 4, 3 (in the bucket of 4), 2 and 1 rows, some rows idle (their sequence
    gone, or joining): the running rows' logits are those of the plain steps."""
    nodes = [InProcess(shards, groups=(4,)), InProcess(shards, groups=(4,), device="mock-cuda", graphs=True)]
    prompts = PROMPTS + [[7, 300, 41, 8]]
    joins = [Join(0, r, p) for r, p in enumerate(prompts)]
    logits = [n.runner.step(joins, [])[0] for n in nodes]
    torch.testing.assert_close(logits[1], logits[0])
    last = logits[0].argmax(-1).tolist()
    lengths = [len(p) for p in prompts]
    for rows, idle in STEPS:
        running = [r for r in range(rows) if r not in idle]
        ids = [0 if r in idle else last[r] for r in range(rows)]
        positions = [0 if r in idle else lengths[r] for r in range(rows)]
        out = [n.runner.step([], [GroupStep(0, ids, positions, idle)])[1][0] for n in nodes]
        torch.testing.assert_close(out[1][running], out[0][running], rtol=1e-4, atol=1e-4)
        for r in running:
            last[r] = out[0][r].argmax().item()
            lengths[r] += 1
    assert sorted(nodes[1].runner.graphs[0].views) == [1, 2, 4]


def test_fixed_shapes_only_over_resident_layers_and_a_cache_read_in_place(shards):
    assert not InProcess(shards, device="mock-cuda", graphs=True, resident={0}).runner.uses_graphs
    # a quantized cache: the fused decode attention reads it in place, where the device has it
    assert InProcess(shards, device="mock-cuda", graphs=True, kv_bits=8).runner.uses_graphs
    assert not InProcess(shards, graphs=True, kv_bits=8).runner.uses_graphs


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_a_quantized_cache_in_fixed_steps_gives_the_dequantizing_paths_tokens(shards, kv_bits):
    """mock-cuda: the fused decode attention (its torch reference) over the codes in
    place, in captured steps, against the CPU device's path that rebuilds each layer's
    cache in the compute dtype and attends with a mask: the same tokens, two requests."""
    rebuilt = InProcess(shards, groups=(2, 2), kv_bits=kv_bits)
    fused = InProcess(shards, groups=(2, 2), kv_bits=kv_bits, device="mock-cuda", graphs=True)
    assert fused.kvs[0].fused and not rebuilt.kvs[0].fused
    for prompts in (PROMPTS, OTHER):
        assert fused.generate(prompts, 7) == rebuilt.generate(prompts, 7)
    assert all(graph.replays >= 5 for g in fused.runner.graphs for graph in g.graphs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_replayed_graphs_give_the_eager_tokens_and_serve_the_next_request(shards):
    cuda = torch.device("cuda")
    eager = InProcess(shards, groups=(2, 2), device=cuda, dtype=torch.float16)
    e = InProcess(shards, groups=(2, 2), device=cuda, dtype=torch.float16, graphs=True)
    assert e.generate(PROMPTS, 9) == eager.generate(PROMPTS, 9)

    def graphs():
        return [{b: entry and entry.graph for b, entry in g.graphs.items()} for g in e.runner.graphs]

    captured = graphs()
    assert all(isinstance(graph, torch.cuda.CUDAGraph) for c in captured for graph in c.values())
    assert e.generate(OTHER, 9) == eager.generate(OTHER, 9)
    assert graphs() == captured  # the same buckets' graphs, not captured again

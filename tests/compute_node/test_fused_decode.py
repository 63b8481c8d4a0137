"""Resident INT4 layers at decode stay packed and run the fused W4A16 linear
(compute_node/kernels/w4a16.py; off CUDA its reference path): the dispatch must give
exactly the tokens and logits of dequantize-then-linear, in prefill (many rows: dense)
and decode (few rows: packed), and switch on the row count."""

import pytest
import torch

import tiny_models
from compute_node.kernels import MERGED_QKV, PackedInt4
from compute_node.layer_weights import dense
from compute_node.weights import HostWeights
from in_process import InProcess

PROMPTS = [[5, 17, 33, 100, 7, 9], [44, 3, 250], [12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module", params=["opt", "llama"])
def shards(request, tmp_path_factory):
    return tiny_models.converted(request.param, tmp_path_factory, bits=4, group_size=32)[1]


def node(shards, fused_max_rows: int, groups: tuple[int, ...] = (3,)) -> InProcess:
    return InProcess(shards, groups=groups, packed_resident=True, fused_max_rows=fused_max_rows)


def test_packed_only_for_few_rows(shards):
    lw = node(shards, fused_max_rows=4).weights
    packed = [k for k, v in lw.get(0, rows=4).items() if isinstance(v, PackedInt4)]
    assert packed and all(k.endswith(".weight") for k in packed)
    assert not any(isinstance(v, PackedInt4) for v in lw.get(0, rows=5).values())
    assert not any(isinstance(v, PackedInt4) for v in lw.get(0).values())


def test_q_k_v_run_as_one_merged_matrix_and_the_dense_path_is_unchanged(shards):
    """At decode q, k, v are one packed [Nq + Nk + Nv, K] matrix; the layer's separate
    entries are views into it, so prefill's dequantized weights are what they were."""
    host = HostWeights.from_directory(shards)
    lw = node(shards, fused_max_rows=4).weights
    names = {k for k in lw.get(0) if k.split(".")[-2] in ("q_proj", "k_proj", "v_proj") and k.endswith("weight")}
    assert len(names) == 3
    small = lw.get(0, rows=4)
    matrix, bias = small[MERGED_QKV]
    assert not names & small.keys()
    original = dense({n: host.shard("layer.0")[n] for n in names}, torch.float32)
    assert matrix.data.shape[0] == sum(w.shape[0] for w in original.values())
    for name, w in lw.get(0).items():
        if name in names:
            assert torch.equal(w, original[name])
    has_bias = any(k.endswith("q_proj.bias") for k in lw.get(0))
    assert (bias is not None) == has_bias


@pytest.mark.parametrize("groups", [(3,), (2, 1)])
def test_fused_decode_gives_the_tokens_of_dequantize_then_linear(shards, groups):
    plain = node(shards, 0, groups).generate(PROMPTS, 6)
    e = node(shards, 4, groups)  # the packed prefill (17 rows) dense, decode (1-3 rows) packed
    calls = []
    original = PackedInt4.linear

    def counted(self, x, bias):
        calls.append(x.shape[:-1].numel())
        return original(self, x, bias)

    PackedInt4.linear = counted
    try:
        got = e.generate(PROMPTS, 6)
    finally:
        PackedInt4.linear = original
    assert got == plain
    # only decode steps (one token per sequence of a group) took the packed path
    assert calls and max(calls) <= max(groups)


def test_dummy_layers_made_on_the_device_free_the_qkv_bytes_they_merge():
    """A dummy layer made on the device is a buffer per part, as a layer read from files
    is: once q, k, v are merged for the fused kernel, their own bytes are no longer held
    (one shard buffer under every part kept them alive: ~21 GiB at OPT-175B)."""
    from compute_node.layer_weights import _separate_qkv, merge_qkv
    from compute_node.weights import dummy_shard_on_device
    from tools.dummy.manifest import dummy_manifest

    manifest = dummy_manifest("facebook/opt-125m", 4, 64)
    layer = dummy_shard_on_device(manifest, "layer.0", torch.device("cpu"))
    storages = {t.untyped_storage().data_ptr() for st in layer.values() for t in st.parts.values()}
    assert len(storages) == sum(len(st.parts) for st in layer.values())
    names = _separate_qkv(manifest.config)
    before = {n: layer[f"{n}.weight"].parts["data"].untyped_storage() for n in names}
    merged = merge_qkv(layer, names)
    assert merged is not None
    for n in names:  # each is now a view of the merged matrix, not of its first buffer
        data = layer[f"{n}.weight"].parts["data"]
        assert data.untyped_storage().data_ptr() == merged.data.untyped_storage().data_ptr()
        assert data.untyped_storage().data_ptr() != before[n].data_ptr()

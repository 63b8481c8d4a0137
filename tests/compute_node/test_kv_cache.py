"""The compute node's KV cache helpers (compute_node/kv_cache.py): the row copy the
prompt's K/V are written with."""

import pytest
import torch

from compute_node.kv_cache import copy_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [128, 6])
def test_copy_rows_equals_a_plain_copy_for_strided_and_odd_rows(dtype, head_dim):
    src = torch.randn(2, 5, 3, head_dim).to(dtype).transpose(1, 2)  # [B, heads, T, d] view of [B, T, heads, d]
    dst = torch.zeros(2, 3, 9, head_dim, dtype=dtype)
    copy_rows(dst[:, :, 2:7], src)
    assert torch.equal(dst[:, :, 2:7], src)
    assert not dst[:, :, :2].any() and not dst[:, :, 7:].any()


def test_consecutive_runs_cover_the_rows_in_order():
    from compute_node.kv_cache import consecutive_runs

    assert consecutive_runs([0, 1, 2, 3]) == [(0, 4, 0)]
    assert consecutive_runs([5, 6, 2, 3, 4, 9]) == [(0, 2, 5), (2, 5, 2), (5, 6, 9)]
    assert consecutive_runs([3]) == [(0, 1, 3)]
    assert consecutive_runs([4, 3]) == [(0, 1, 4), (1, 2, 3)]


# one run, two runs, and 10 runs (more than MAX_RUN_COPIES: the indexed write)
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5], [6, 7, 1, 2], [5, 3, 1, 7, 0, 2, 6, 4, 8, 9, 11]])
def test_a_prompt_batch_lands_in_its_rows_by_slices_or_one_indexed_write(rows):
    """Runs of consecutive rows are copied as slices, many scattered rows in one indexed
    write: either way each prompt's keys and values land in its row, the rest untouched."""
    import types

    from compute_node.kv_cache import _PlainLayers

    shape = types.SimpleNamespace(pad=torch.zeros(12), num_kv_heads=2, max_tokens=9, head_dim=8, num_layers=1)
    layers = _PlainLayers(shape, torch.bfloat16, torch.device("cpu"))
    layers.k[0].zero_()
    layers.v[0].zero_()
    k = torch.randn(len(rows), 5, 2, 8).to(torch.bfloat16).transpose(1, 2)  # [B, heads, T, d] as the model makes it
    v = torch.randn(len(rows), 5, 2, 8).to(torch.bfloat16).transpose(1, 2)
    layers.write_rows(0, rows, k, v)
    for i, r in enumerate(rows):
        assert torch.equal(layers.k[0][r, :, :5], k[i]) and torch.equal(layers.v[0][r, :, :5], v[i])
    others = [r for r in range(12) if r not in rows]
    assert not layers.k[0][others].any() and not layers.k[0][:, :, 5:].any()

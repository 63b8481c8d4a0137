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

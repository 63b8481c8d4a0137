"""The packed-prompts layout shared by the compute node's prefill and the KV store's append."""

import torch

from strata.transport.packed import runs, stacked


def test_runs_split_at_a_new_length_and_with_rows_at_a_gap():
    assert runs([4, 4, 4, 2, 2, 3]) == [(0, 3), (3, 5), (5, 6)]
    assert runs([4, 4, 4, 2, 2, 3], rows=[3, 4, 0, 1, 5, 6]) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert runs([]) == []


def test_stacked_is_each_sequence_s_tokens_as_a_view():
    x = torch.arange(2 * 10 * 3).view(1, 2, 10, 3)  # heads 2, tokens 10, head_dim 3
    s = stacked(x, 4, 3, 2)  # sequences of 2 tokens from token 4
    assert s.shape == (3, 2, 2, 3) and s.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view
    for i in range(3):
        assert torch.equal(s[i], x[0, :, 4 + 2 * i : 6 + 2 * i])

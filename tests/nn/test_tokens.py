from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.nn import gather_tokens, scatter_tokens


def test_gather_tokens_matches_indexing_loop(device):
    x = torch.randn(3, 10, 4, device=device)
    index = torch.stack([torch.randperm(10)[:6] for _ in range(3)]).to(device)
    expected = torch.stack([x[b, index[b]] for b in range(3)])
    assert torch.equal(gather_tokens(x, index), expected)


def test_gather_tokens_works_on_values_without_feature_axis():
    x = torch.arange(8).view(2, 4)
    assert gather_tokens(x, torch.tensor([[3, 1], [0, 0]])).tolist() == [[3, 1], [4, 4]]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.data())
def test_scatter_is_a_right_inverse_of_gather(B, L, data):
    K = data.draw(st.integers(0, L))
    index = torch.stack([torch.randperm(L)[:K] for _ in range(B)])
    y = torch.randn(B, K, 3)
    full = scatter_tokens(y, index, L, fill=-7.0)
    assert torch.equal(gather_tokens(full, index), y)
    untouched = torch.ones(B, L, dtype=torch.bool).scatter(1, index, False)
    assert (full[untouched] == -7.0).all()


def test_mae_round_trip_with_a_learnable_mask_token_gets_gradients():
    mask_token = torch.zeros(1, 1, 4, requires_grad=True)
    x = torch.randn(2, 6, 4, requires_grad=True)
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    full = scatter_tokens(gather_tokens(x, keep), keep, 6, fill=mask_token)
    full.sum().backward()
    # three dropped tokens per sample, two samples -> every mask-token entry gets 6
    assert torch.equal(mask_token.grad, torch.full((1, 1, 4), 6.0))
    kept = torch.zeros(2, 6, 1).scatter(1, keep[..., None], 1.0).expand(-1, -1, 4)
    assert torch.equal(x.grad, kept)


def test_fill_is_cast_to_the_token_dtype():
    y = torch.randn(1, 2, 3, dtype=torch.bfloat16)
    out = scatter_tokens(y, torch.tensor([[0, 1]]), 3, fill=torch.ones(3))
    assert out.dtype == torch.bfloat16


def test_index_errors():
    x = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="int64"):
        gather_tokens(x, torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="batch size"):
        gather_tokens(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        gather_tokens(x, torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="one position per token"):
        scatter_tokens(x, torch.zeros(2, 4, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="at least"):
        scatter_tokens(x, torch.zeros(2, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="broadcast"):
        scatter_tokens(x, torch.tensor([[0, 1, 2, 3, 4]] * 2), 6, fill=torch.zeros(4))

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrissl.losses import consistency_loss


def test_l2_is_the_per_case_norm_averaged_over_the_batch(gen):
    f1 = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
    f2 = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
    want = np.mean([np.sqrt(((f1[b] - f2[b]).numpy() ** 2).sum()) for b in range(3)])
    assert consistency_loss(f1, f2).item() == pytest.approx(want, rel=1e-12)
    want_mse = ((f1 - f2).numpy() ** 2).mean()
    assert consistency_loss(f1, f2, metric="mse").item() == pytest.approx(want_mse, rel=1e-12)


def test_gradient_is_finite_where_the_copies_agree(gen):
    f1 = torch.randn(2, 5, generator=gen, requires_grad=True)
    consistency_loss(f1, f1.detach()).backward()
    assert torch.equal(f1.grad, torch.zeros_like(f1))


def test_gradcheck(gen):
    f1 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(consistency_loss, (f1, f2))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="z_a and z_b must have the same shape"):
        consistency_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="metric"):
        consistency_loss(torch.zeros(2, 3), torch.zeros(2, 3), metric="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z_b contains NaN"):
        consistency_loss(torch.zeros(2, 3), torch.full((2, 3), float("nan")))

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mrissl
from mrissl.losses import InfoNCELoss, info_nce


def nce_reference(a, b, tau, negatives=None, symmetric=True):
    """BrainMVP eqs. 4 and 5 written out with loops over samples i and candidates j."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    extra = (
        [] if negatives is None else list(negatives / np.linalg.norm(negatives, axis=1)[:, None])
    )

    def direction(q, k):
        total = 0.0
        for i in range(len(q)):
            cands = [*k, *extra]
            denom = sum(math.exp(q[i] @ c / tau) for c in cands)
            total += -math.log(math.exp(q[i] @ k[i] / tau) / denom)
        return total / len(q)

    l_ab = direction(a, b)
    return 0.5 * (l_ab + direction(b, a)) if symmetric else l_ab


def clip_loss(image, text, logit_scale):
    """The CLIP loss as its paper's pseudo-code writes it."""
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_brainmvp_eq_4_and_5(symmetric, gen):
    a = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    got = info_nce(a, b, temperature=0.3, symmetric=symmetric)
    want = nce_reference(a.numpy(), b.numpy(), 0.3, symmetric=symmetric)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_extra_negatives_join_both_directions(gen):
    a, b = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    queue = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    got = info_nce(a, b, temperature=0.5, negatives=queue)
    want = nce_reference(a.numpy(), b.numpy(), 0.5, negatives=queue.numpy())
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_equals_the_clip_loss(gen):
    for B, E in [(8, 16), (64, 128), (256, 32)]:
        a = torch.randn(B, E, generator=gen)
        b = torch.randn(B, E, generator=gen)
        ours = info_nce(a, b, temperature=1 / 14.3)
        torch.testing.assert_close(ours, clip_loss(a, b, 14.3), rtol=1e-5, atol=1e-6)


def test_gradients_pass_gradcheck(gen):
    a = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y, q, t: info_nce(x, y, temperature=t, negatives=q), (a, b, queue, tau)
    )


def test_learnable_temperature_is_a_clamped_log_parameter(gen):
    loss_fn = InfoNCELoss(temperature=0.07, learnable_temperature=True)
    assert [n for n, _ in loss_fn.named_parameters()] == ["log_temperature"]
    a, b = torch.randn(2, 8, 16, generator=gen)
    loss_fn(a, b).backward()
    assert loss_fn.log_temperature is not None
    assert loss_fn.log_temperature.grad is not None
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-4))
    assert loss_fn.temperature.item() == pytest.approx(0.01)
    state = loss_fn.state_dict()
    assert set(state) == {"log_temperature"}


def test_fixed_temperature_module_has_no_parameters(gen):
    loss_fn = InfoNCELoss(0.2)
    assert list(loss_fn.parameters()) == []
    a, b = torch.randn(2, 8, 16, generator=gen)
    assert torch.equal(loss_fn(a, b), info_nce(a, b, temperature=0.2))


def test_runs_on_device(device, gen):
    a, b = torch.randn(2, 16, 32, generator=gen)
    got = info_nce(a.to(device), b.to(device), temperature=torch.tensor(0.1))
    assert got.item() == pytest.approx(info_nce(a, b).item(), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.floats(0.05, 2.0))
def test_loss_is_bounded_below_by_zero_and_above_by_log_b_plus_2_over_tau(B, E, tau):
    g = torch.Generator().manual_seed(B * 10 + E)
    a = torch.randn(B, E, generator=g)
    b = torch.randn(B, E, generator=g)
    loss = info_nce(a, b, temperature=tau).item()
    assert -1e-6 <= loss <= math.log(B) + 2 / tau + 1e-4


def test_bad_input_names_the_argument(gen):
    a = torch.randn(4, 8, generator=gen)
    for tau in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            info_nce(a, a, temperature=tau)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce(a, a, temperature=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="z_a and z_b must have the same shape"):
        info_nce(a, a[:3])
    with pytest.raises(ValueError, match="negatives must have the embedding width"):
        info_nce(a, a, negatives=torch.randn(3, 5))
    with pytest.raises(ValueError, match="z_a must have 2 dimensions"):
        info_nce(a[None], a[None])
    bad = a.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="z_b contains NaN or Inf"):
        info_nce(a, bad)


def test_tensor_temperature_is_read_only_with_the_value_checks_on(gen):
    a = torch.randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce(a, a, temperature=torch.tensor(float("nan")))
    with mrissl.checks("none"):  # no synchronisation: the value is not looked at
        assert torch.isfinite(info_nce(a, a, temperature=torch.tensor(-1.0)))


def test_learnable_temperature_stays_positive_without_a_check(gen):
    loss_fn = InfoNCELoss(temperature=0.07, learnable_temperature=True, min_temperature=0.05)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(-50.0)  # exp(-50) would be far below the floor
    assert float(loss_fn.temperature) == pytest.approx(0.05)
    a = torch.randn(4, 8, generator=gen)
    with mrissl.checks("none"):
        torch.testing.assert_close(loss_fn(a, a), info_nce(a, a, temperature=0.05))

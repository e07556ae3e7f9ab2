from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.losses import BarlowTwinsLoss, barlow_twins


def feature_reference(z_a: np.ndarray, z_b: np.ndarray, lam: float) -> float:
    """Textbook Barlow Twins: standardise each feature along the batch, D x D correlation."""
    D = z_a.shape[-1]
    a = z_a.reshape(-1, D).astype(np.float64)
    b = z_b.reshape(-1, D).astype(np.float64)
    M = a.shape[0]
    a = (a - a.mean(0)) / a.std(0)  # biased std, the M that divides C
    b = (b - b.mean(0)) / b.std(0)
    loss = 0.0
    for i in range(D):
        for j in range(D):
            c_ij = sum(a[m, i] * b[m, j] for m in range(M)) / M
            loss += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return loss


def token_reference(z: np.ndarray, z_m: np.ndarray, lam: float, batch_mode: str) -> float:
    """E-MIM eqs. 4 and 8 with loops over patch positions i, j."""
    B, N, E = z.shape
    z, z_m = z.astype(np.float64), z_m.astype(np.float64)

    def level_loss(C):
        total = 0.0
        for i in range(N):
            for j in range(N):
                total += (1 - C[i][j]) ** 2 if i == j else lam * C[i][j] ** 2
        return total

    if batch_mode == "per_sample":
        losses = []
        for b in range(B):
            C = [[0.0] * N for _ in range(N)]
            for i in range(N):
                for j in range(N):
                    num = sum(z[b, i, f] * z_m[b, j, f] for f in range(E))
                    den = np.sqrt(sum(z[b, i, f] ** 2 for f in range(E))) * np.sqrt(
                        sum(z_m[b, j, f] ** 2 for f in range(E))
                    )
                    C[i][j] = num / den
            losses.append(level_loss(C))
        return float(np.mean(losses))
    C = [[0.0] * N for _ in range(N)]
    for i in range(N):
        for j in range(N):
            num = sum(z[b, i, f] * z_m[b, j, f] for b in range(B) for f in range(E))
            den = np.sqrt((z[:, i] ** 2).sum()) * np.sqrt((z_m[:, j] ** 2).sum())
            C[i][j] = num / den
    return level_loss(C)


@pytest.mark.parametrize(("B", "D"), [(7, 5), (3, 12), (2, 9)])  # direct and Gram paths
def test_feature_mode_matches_textbook_barlow_twins(B, D, gen):
    z_a = torch.randn(B, D, generator=gen, dtype=torch.float64)
    z_b = torch.randn(B, D, generator=gen, dtype=torch.float64)
    got = barlow_twins(z_a, z_b, lambda_offdiag=0.3)
    assert got.item() == pytest.approx(feature_reference(z_a.numpy(), z_b.numpy(), 0.3), rel=1e-10)


def test_feature_mode_standardises_over_batch_and_tokens(gen):
    z_a = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    z_b = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    got = barlow_twins(z_a, z_b)
    assert got.item() == pytest.approx(feature_reference(z_a.numpy(), z_b.numpy(), 5e-3), rel=1e-10)


@pytest.mark.parametrize("batch_mode", ["per_sample", "joint"])
@pytest.mark.parametrize(("N", "E"), [(4, 6), (9, 2)])  # direct and Gram paths
def test_token_mode_matches_emim_eq_4_and_8(batch_mode, N, E, gen):
    z = torch.randn(3, N, E, generator=gen, dtype=torch.float64)
    z_m = torch.randn(3, N, E, generator=gen, dtype=torch.float64)
    got = barlow_twins(z, z_m, mode="token", batch_mode=batch_mode)
    want = token_reference(z.numpy(), z_m.numpy(), 1.0, batch_mode)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_feature_mode_equals_lightly(gen):
    lightly_loss = pytest.importorskip("lightly.loss").BarlowTwinsLoss
    for B, D in [(32, 64), (16, 256), (64, 32)]:
        z_a = torch.randn(B, D, generator=gen)
        z_b = torch.randn(B, D, generator=gen)
        ours = barlow_twins(z_a, z_b, lambda_offdiag=5e-3)
        theirs = lightly_loss(lambda_param=5e-3)(z_a, z_b)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("B", [2, 3, 8, 64])
def test_identical_views_give_zero_invariance_at_any_batch_size(B, gen):
    z = torch.randn(B, 16, generator=gen)
    assert barlow_twins(z, z, lambda_offdiag=0.0).item() < 1e-9


def test_monai_cannot_reach_zero_at_small_batch_but_we_do(gen):
    monai_losses = pytest.importorskip("monai.losses")
    z = torch.randn(4, 8, generator=gen)
    assert monai_losses.BarlowTwinsLoss(lambd=0.0)(z, z).item() > 0.5  # 8 · (1/4)²
    assert barlow_twins(z, z, lambda_offdiag=0.0).item() < 1e-10


def test_constant_feature_gives_a_zero_row_not_noise(gen):
    z = torch.randn(16, 6, generator=gen)
    z[:, 2] = 0.3  # a dead unit: 0.3 is not exact in binary, the mean is rounded
    # the constant feature cannot correlate with anything: its diagonal term is exactly 1
    loss_inv = barlow_twins(z, z, lambda_offdiag=0.0)
    assert loss_inv.item() == pytest.approx(1.0, abs=1e-6)
    z.requires_grad_(True)
    barlow_twins(z, z.detach().flip(0)).backward()
    assert torch.isfinite(z.grad).all()


def test_scale_by_size_divides_by_matrix_size(gen):
    z_a, z_b = torch.randn(2, 10, 6, generator=gen)
    assert barlow_twins(z_a, z_b, scale_by_size=True).item() == pytest.approx(
        barlow_twins(z_a, z_b).item() / 6, rel=1e-6
    )
    z, z_m = torch.randn(2, 2, 5, 3, generator=gen)
    assert barlow_twins(z, z_m, mode="token", scale_by_size=True).item() == pytest.approx(
        barlow_twins(z, z_m, mode="token").item() / 5, rel=1e-6
    )


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((6, 4), {}),  # direct
        ((2, 9), {}),  # Gram
        ((2, 3, 4), {}),
        ((2, 4, 3), {"mode": "token"}),
        ((2, 9, 2), {"mode": "token"}),  # Gram
        ((2, 4, 3), {"mode": "token", "batch_mode": "joint"}),
    ],
)
def test_gradients_pass_gradcheck(shape, kwargs, gen):
    z_a = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins(a, b, **kwargs), (z_a, z_b))


def test_module_calls_the_function(gen):
    z_a, z_b = torch.randn(2, 4, 6, 8, generator=gen)
    module = BarlowTwinsLoss("token", batch_mode="joint", lambda_offdiag=0.5)
    want = barlow_twins(z_a, z_b, mode="token", batch_mode="joint", lambda_offdiag=0.5)
    assert torch.equal(module(z_a, z_b), want)
    assert "token" in repr(module)


def test_runs_on_device(device, gen):
    z_a, z_b = torch.randn(2, 2, 8, 12, generator=gen).to(device)
    for mode in ("feature", "token"):
        loss = barlow_twins(z_a, z_b, mode=mode)
        assert loss.device.type == device.type
        assert loss.item() == pytest.approx(
            barlow_twins(z_a.cpu(), z_b.cpu(), mode=mode).item(), rel=1e-4
        )


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(1, 6), st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_feature_mode_is_invariant_to_affine_rescaling_of_a_feature(B, D, scale, offset):
    g = torch.Generator().manual_seed(B * 7 + D)
    z_a = torch.randn(B, D, generator=g, dtype=torch.float64)
    z_b = torch.randn(B, D, generator=g, dtype=torch.float64)
    moved = z_a.clone()
    moved[:, 0] = moved[:, 0] * scale + offset
    assert barlow_twins(moved, z_b).item() == pytest.approx(
        barlow_twins(z_a, z_b).item(), rel=1e-8, abs=1e-10
    )


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5))
def test_token_mode_is_non_negative_and_ignores_token_norms(B, N, E):
    g = torch.Generator().manual_seed(B * 100 + N * 10 + E)
    z = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    z_m = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    loss = barlow_twins(z, z_m, mode="token")
    assert loss.item() >= 0
    scales = torch.rand(B, N, 1, generator=g, dtype=torch.float64) + 0.5
    assert barlow_twins(z * scales, z_m, mode="token").item() == pytest.approx(
        loss.item(), rel=1e-9
    )


def test_bad_input_names_the_argument(gen):
    z = torch.randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins(z[:1], z[:1])
    with pytest.raises(ValueError, match=r"z_a and z_b must have the same shape"):
        barlow_twins(z, z[:, :4])
    with pytest.raises(ValueError, match="z_a must have 3 dimensions"):
        barlow_twins(z, z, mode="token")
    with pytest.raises(ValueError, match="mode must be one of"):
        barlow_twins(z, z, mode="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lambda_offdiag"):
        barlow_twins(z, z, lambda_offdiag=-1.0)
    with pytest.raises(TypeError, match="z_b must be a floating-point"):
        barlow_twins(z, z.long())
    bad = z.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="z_b contains NaN or Inf"):
        barlow_twins(z, bad)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="z_a contains NaN or Inf"):
        barlow_twins(bad.view(2, 2, 8), z.view(2, 2, 8), mode="token")

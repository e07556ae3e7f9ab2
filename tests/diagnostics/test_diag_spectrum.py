from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mrissl
from mrissl.diagnostics import effective_rank, rankme, singular_values, std_of_l2_normalized


def _with_singular_values(
    s: list[float], n: int, d: int, *, centered: bool, seed: int = 0
) -> torch.Tensor:
    """An (n, d) float64 matrix whose singular values are ``s`` (columns centered if asked)."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    if centered:
        a = a - a.mean(dim=0)
    u, _ = torch.linalg.qr(a)  # orthonormal columns, each of zero mean when centered
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def _reference_erank(s: np.ndarray, eps: float = 0.0) -> float:
    """exp(-sum p log p), p = s / sum(s) + eps, written as a plain loop."""
    values = [float(v) for v in s]
    total = sum(values)
    h = 0.0
    for value in values:
        p = value / total + eps
        if p > 0:
            h -= p * math.log(p)
    return math.exp(h)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("centered", [True, False])
def test_rank_k_with_equal_singular_values_gives_exactly_k(k, centered):
    z = _with_singular_values([3.0] * k, 64, 8, centered=centered)
    assert float(effective_rank(z, center=centered)) == pytest.approx(k, rel=1e-12)
    assert float(effective_rank(torch.full((k,), 0.5))) == pytest.approx(k, rel=1e-12)


def test_singular_values_are_recovered_in_descending_order(device):
    s = [0.5, 4.0, 2.0, 1.0]
    z = _with_singular_values(s, 50, 6, centered=True).to(device)
    got = singular_values(z)
    assert got.dtype == torch.float64
    assert got.device.type == device.type
    expected = torch.tensor([*sorted(s, reverse=True), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)


def test_centering_removes_the_mean_direction():
    z = _with_singular_values([1.0, 1.0], 40, 5, centered=True) + 100.0
    assert float(effective_rank(z)) == pytest.approx(2.0, rel=1e-10)
    assert float(effective_rank(z, center=False)) < 1.1  # dominated by the mean


@pytest.mark.parametrize("ratio", [0.9, 0.5, 0.1])
def test_geometric_spectrum_matches_the_formula(ratio):
    s = [ratio**i for i in range(10)]
    z = _with_singular_values(s, 100, 12, centered=True)
    assert float(effective_rank(z)) == pytest.approx(_reference_erank(np.array(s)), rel=1e-10)
    assert float(rankme(z, eps=1e-5, center=True)) == pytest.approx(
        _reference_erank(np.array([*s, 0.0, 0.0]), eps=1e-5), rel=1e-10
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=30).filter(
        lambda s: sum(s) > 1e-6
    )
)
def test_effective_rank_of_a_spectrum_is_between_1_and_its_length(s):
    erank = float(effective_rank(torch.tensor(s, dtype=torch.float64)))
    nonzero = sum(v > 0 for v in s)
    assert 1.0 - 1e-9 <= erank <= nonzero + 1e-9
    assert erank == pytest.approx(_reference_erank(np.array(s)), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_effective_rank_is_invariant_to_scale_rotation_and_row_order(seed, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(30, 6, generator=g, dtype=torch.float64) * torch.rand(6, generator=g).double()
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    perm = torch.randperm(30, generator=g)
    base = float(effective_rank(z))
    assert float(effective_rank(z * scale)) == pytest.approx(base, rel=1e-9)
    assert float(effective_rank(z @ q)) == pytest.approx(base, rel=1e-9)
    assert float(effective_rank(z[perm])) == pytest.approx(base, rel=1e-9)


def test_rankme_with_zero_eps_is_the_effective_rank_and_eps_lifts_it():
    s = torch.tensor([5.0, 1.0, 0.0, 0.0, 0.0])
    assert float(rankme(s, eps=0.0)) == pytest.approx(float(effective_rank(s)), rel=1e-12)
    lifted = float(rankme(s, eps=1e-7))
    assert lifted > float(effective_rank(s))
    assert lifted == pytest.approx(_reference_erank(s.numpy(), eps=1e-7), rel=1e-10)


def test_rankme_is_uncentered_by_default_as_in_the_paper():
    z = _with_singular_values([1.0, 1.0], 40, 5, centered=True) + 3.0
    s_raw = np.linalg.svd(z.numpy(), compute_uv=False)
    assert float(rankme(z)) == pytest.approx(_reference_erank(s_raw, eps=1e-7), rel=1e-9)


def test_token_features_are_flattened_to_samples():
    z = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(singular_values(z), singular_values(z.reshape(60, 8)))


def test_zero_matrix_has_effective_rank_zero():
    z = torch.ones(10, 4)  # constant features: zero after centering
    assert float(effective_rank(z)) == 0.0
    assert float(rankme(torch.zeros(4))) == 0.0


def test_low_precision_input_is_decomposed_in_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = effective_rank(z)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(float(effective_rank(z.double())), rel=1e-12)
    half = std_of_l2_normalized(z.half())
    assert half.dtype == torch.float32
    assert torch.isfinite(half)


def test_std_of_l2_normalized_matches_reference(device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 7, generator=g) * 3 + 1
    unit = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    expected = np.mean([np.std(unit[:, j], ddof=1) for j in range(7)])
    assert float(std_of_l2_normalized(z.to(device))) == pytest.approx(expected, rel=1e-5)


def test_fewer_samples_than_dimensions_warns_about_the_cap():
    z = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="capped at 4"):
        erank = effective_rank(z)
    assert math.isfinite(float(erank))
    assert float(erank) <= 4.0 + 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        effective_rank(torch.randn(64, 32))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_features_are_rejected(bad):
    z = torch.randn(10, 4)
    z[3, 1] = bad
    for fn in (singular_values, effective_rank, rankme, std_of_l2_normalized):
        with pytest.raises(ValueError, match="finite"):
            fn(z)


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        effective_rank(torch.randn(1, 8))
    with pytest.raises(ValueError, match="at least 2 samples"):
        std_of_l2_normalized(torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="dimensions"):
        singular_values(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="dimensions"):
        singular_values(torch.randn(5))
    with pytest.raises(TypeError, match="floating"):
        effective_rank(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        effective_rank(np.ones((4, 3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="at least one"):
        effective_rank(torch.zeros(0))
    with pytest.raises(ValueError, match="eps"):
        rankme(torch.ones(3), eps=-1.0)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float32_features_at_extreme_scale_give_the_unit_scale_values(scale):
    # the case: std_of_l2_normalized of features around 1e30 returned 0 (collapse)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 6, generator=g) * torch.rand(6, generator=g)
    big = scale * z
    assert big.dtype == torch.float32
    assert float(std_of_l2_normalized(big)) == pytest.approx(
        float(std_of_l2_normalized(z)), rel=1e-5
    )
    for fn in (effective_rank, rankme):
        assert float(fn(big)) == pytest.approx(float(fn(z)), rel=1e-5)
    torch.testing.assert_close(singular_values(big) / scale, singular_values(z), rtol=1e-5, atol=0)


def test_std_of_l2_normalized_uses_each_direction_whatever_the_length():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g)
    rows = torch.tensor([1e30, 1e-30, 1.0, 1e-36, 1e37, 2.0])[:, None]
    assert float(std_of_l2_normalized(z * rows)) == pytest.approx(
        float(std_of_l2_normalized(z)), rel=1e-5
    )


def test_with_value_checks_off_nothing_is_read_and_nan_comes_back():
    z = torch.randn(10, 4)
    z[3, 1] = math.nan
    with mrissl.checks("none"):
        assert torch.isnan(std_of_l2_normalized(z))
        assert torch.isnan(effective_rank(torch.tensor([1.0, math.nan])))
    with pytest.raises(ValueError, match="finite"):
        std_of_l2_normalized(z)  # the tests run with the checks on

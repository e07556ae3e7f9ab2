"""Student's t quantiles behind the collapse check's verdict interval."""

from __future__ import annotations

import math

import pytest

from mrissl.diagnostics._student_t import t_quantile

# two-sided 95 % points of standard t tables (q = 0.975), and one-sided 95 % (q = 0.95)
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 7: 2.365, 10: 2.228, 30: 2.042}
TABLE_95 = {1: 6.314, 3: 2.353, 9: 1.833, 30: 1.697}


@pytest.mark.parametrize(("dof", "want"), TABLE_975.items())
def test_matches_the_t_table_at_97_5_percent(dof, want):
    assert t_quantile(0.975, dof) == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize(("dof", "want"), TABLE_95.items())
def test_matches_the_t_table_at_95_percent(dof, want):
    assert t_quantile(0.95, dof) == pytest.approx(want, abs=1e-3)


def density(t, dof):
    return (
        math.gamma((dof + 1) / 2)
        / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
        * (1 + t * t / dof) ** (-(dof + 1) / 2)
    )


@pytest.mark.parametrize("dof", [2, 3, 6, 11])
def test_the_density_integrates_to_the_quantile(dof):
    t = t_quantile(0.9, dof)
    n = 20000  # Simpson's rule on [0, t]: P(0 ≤ T ≤ t) = 0.4
    h = t / n
    total = density(0, dof) + density(t, dof)
    total += sum((4 if i % 2 else 2) * density(i * h, dof) for i in range(1, n))
    assert total * h / 3 == pytest.approx(0.4, abs=1e-9)


def test_approaches_the_normal_quantile():
    assert t_quantile(0.975, 2000) == pytest.approx(1.95996, abs=2e-3)
    assert t_quantile(0.5, 4) == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="q must be in"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="dof must be >= 1"):
        t_quantile(0.975, 0)
    with pytest.raises(TypeError, match="dof must be an int"):
        t_quantile(0.975, 3.0)

"""The collapse check's verdict: a 95 % t interval around the floor (issue 13)."""

from __future__ import annotations

import pytest

from mrissl.cli import _verdict


def test_default_eight_draws_use_t_with_3_degrees_of_freedom():
    # 8 draws: 4 fit the constants, 4 evaluate; t(0.975, 3) = 3.182, not 2
    assert _verdict(1.0, 0.1, 1.30, 8) == "borderline"  # 2 s.e. would say COLLAPSE RISK
    assert _verdict(1.0, 0.1, 1.33, 8) == "COLLAPSE RISK"
    assert _verdict(1.0, 0.1, 0.70, 8) == "borderline"  # 2 s.e. would say ok
    assert _verdict(1.0, 0.1, 0.67, 8) == "ok"


@pytest.mark.parametrize(
    ("num_draws", "half_width"), [(6, 4.303), (8, 3.182), (20, 2.262), (64, 2.040)]
)
def test_interval_narrows_with_more_draws(num_draws, half_width):
    se = 0.01
    assert _verdict(1.0, se, 1.0 + (half_width + 0.002) * se, num_draws) == "COLLAPSE RISK"
    assert _verdict(1.0, se, 1.0 + (half_width - 0.002) * se, num_draws) == "borderline"
    assert _verdict(1.0, se, 1.0 - (half_width + 0.002) * se, num_draws) == "ok"

"""The shared scalar checks of ``mrissl._checks``: what passes, and what each failure says."""

from __future__ import annotations

import math
import re

import pytest

from mrissl._checks import check_bool, check_choice, check_number


def test_check_number_returns_a_float_or_the_int() -> None:
    assert check_number(3, "x") == 3.0
    assert isinstance(check_number(3, "x"), float)
    assert check_number(3, "x", integer=True) == 3
    assert isinstance(check_number(3, "x", integer=True), int)
    assert check_number(0.0, "x", low=0) == 0.0
    assert check_number(1.0, "x", low=0, low_open=True, high=1) == 1.0


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (0.0, {"low": 0, "low_open": True}, "x must be a finite number > 0, got 0.0"),
        (-1, {"low": 0}, "x must be a finite number >= 0, got -1"),
        (2.0, {"low": 0, "high": 1}, "x must be a finite number >= 0 and <= 1, got 2.0"),
        (1.0, {"high": 1, "high_open": True}, "x must be a finite number < 1, got 1.0"),
        (math.nan, {}, "x must be a finite number, got nan"),
        (math.inf, {"low": 0}, "x must be a finite number >= 0, got inf"),
        (0, {"low": 1, "integer": True}, "x must be an int >= 1, got 0"),
    ],
)
def test_check_number_names_the_bounds(
    value: float, bounds: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_number(value, "x", **bounds)


@pytest.mark.parametrize(
    ("value", "integer", "message"),
    [
        (True, False, "x must be a number, got bool True"),
        ("1", False, "x must be a number, got str '1'"),
        (1.5, True, "x must be an int, got float 1.5"),
        (False, True, "x must be an int, got bool False"),
    ],
)
def test_check_number_rejects_other_types(value: object, integer: bool, message: str) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        check_number(value, "x", integer=integer)


def test_check_choice_and_check_bool() -> None:
    assert check_choice("mean", "reduction", ("mean", "sum")) == "mean"
    with pytest.raises(
        ValueError, match=r"^reduction must be one of \('mean', 'sum'\), got 'max'$"
    ):
        check_choice("max", "reduction", ("mean", "sum"))
    with pytest.raises(ValueError, match="got 1"):
        check_choice(1, "reduction", ("mean", "sum"))
    assert check_bool(False, "flag") is False
    with pytest.raises(TypeError, match=r"^flag must be True or False, got int 1$"):
        check_bool(1, "flag")

"""Root fixtures: the value checks are on for every test and doctest (tests, src and docs).

The library's default is ``"none"`` (no host synchronisation on the training-step path); our
own tests run with ``"values"`` so that a NaN never passes silently. A test of the default
behaviour switches back with ``mrissl.checks("none")``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

import mrissl

# The docstrings of mrissl.integrations need their frameworks (optional extras); their tests
# skip themselves with pytest.importorskip.
collect_ignore = [
    f"src/mrissl/integrations/{module}.py"
    for module, package in (
        ("lightning", "lightning"),
        ("ignite", "ignite"),
        ("torchmetrics", "torchmetrics"),
    )
    if importlib.util.find_spec(package) is None
]


@pytest.fixture(autouse=True)
def _value_checks_on() -> Iterator[None]:
    with mrissl.checks("values"):
        yield

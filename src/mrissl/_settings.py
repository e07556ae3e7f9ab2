"""The value-checks switch (private module; the public names live in :mod:`mrissl`).

Checks of shapes, dtypes and arguments are free and always on. Checks of *values* (NaN or Inf in
an input, a non-finite result) need the host to read a device tensor, a synchronisation that
stalls the CUDA stream and breaks a ``torch.compile`` graph, so they are opt-in: off by default,
on with ``mrissl.set_checks("values")``, the ``mrissl.checks("values")`` context manager or the
environment variable ``MRISSL_CHECKS=values``. This module imports nothing heavy, so
``import mrissl`` stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

__all__ = ["CheckMode", "checks", "get_checks", "set_checks", "values_checked"]

CheckMode = Literal["none", "values"]
_MODES: tuple[str, ...] = ("none", "values")
_ENV = "MRISSL_CHECKS"


def _parse(mode: object, name: str) -> CheckMode:
    if not isinstance(mode, str):
        raise TypeError(f"{name} must be one of {_MODES}, got {type(mode).__name__} {mode!r}")
    if mode not in _MODES:
        raise ValueError(f"{name} must be one of {_MODES}, got {mode!r}")
    return "values" if mode == "values" else "none"


_mode: CheckMode = _parse(os.environ.get(_ENV, "none").strip().lower() or "none", _ENV)


def set_checks(mode: CheckMode) -> None:
    """Turn the value checks on (``"values"``) or off (``"none"``, the default).

    With ``"values"``, every loss, diagnostic and fill checks its inputs and results for NaN and
    Inf and raises ``ValueError`` naming the argument; each check reads one value on the host, so
    it synchronises a CUDA stream and breaks a compiled graph. With ``"none"`` nothing on the
    training-step path synchronises. The default comes from the environment variable
    ``MRISSL_CHECKS`` (``none`` when unset).

    Args:
        mode: ``"values"`` or ``"none"``.

    Raises:
        TypeError: ``mode`` is not a string.
        ValueError: ``mode`` is not one of the two names.

    Example:
        >>> import mrissl
        >>> previous = mrissl.get_checks()
        >>> mrissl.set_checks("values")
        >>> mrissl.get_checks()
        'values'
        >>> mrissl.set_checks(previous)
    """
    global _mode
    _mode = _parse(mode, "mode")


def get_checks() -> CheckMode:
    """The current value-checks mode, ``"none"`` or ``"values"``.

    Example:
        >>> import mrissl
        >>> mrissl.get_checks() in ("none", "values")
        True
    """
    return _mode


@contextmanager
def checks(mode: CheckMode = "values") -> Iterator[None]:
    """Run a block with the value checks set to ``mode``, then restore the previous mode.

    Example:
        >>> import torch, mrissl
        >>> from mrissl.losses import barlow_twins
        >>> z = torch.full((4, 8), float("nan"))
        >>> with mrissl.checks("values"):
        ...     barlow_twins(z, z)
        Traceback (most recent call last):
        ...
        ValueError: z_a contains NaN or Inf ...
    """
    global _mode
    new = _parse(mode, "mode")
    previous = _mode
    _mode = new
    try:
        yield
    finally:
        _mode = previous


def values_checked() -> bool:
    """True when the value checks are on (for the library's own use)."""
    return _mode == "values"

"""Student's t quantiles for small confidence intervals, without SciPy.

The collapse check reports a floor from a handful of Monte Carlo draws; its interval uses the
t quantile with ``draws − 1`` degrees of freedom. For an integer ``ν`` the two-sided
probability ``A(t | ν) = P(|T| ≤ t)`` has a closed form in ``θ = atan(t / √ν)``
(Abramowitz & Stegun 26.7.3-26.7.4):

    ν odd:   A = (2/π) (θ + sin θ (cos θ + (2/3) cos³θ + … + (2·4…(ν−3))/(1·3…(ν−2)) cos^(ν−2)θ))
    ν even:  A = sin θ (1 + (1/2) cos²θ + … + (1·3…(ν−3))/(2·4…(ν−2)) cos^(ν−2)θ)

(the series are empty for ``ν = 1`` and ``ν = 2``). ``A`` increases with ``t``, so the quantile
is found by bisection to machine precision.
"""

from __future__ import annotations

import math

__all__: list[str] = []


def _two_sided(t: float, dof: int) -> float:
    """``P(|T| ≤ t)`` for Student's t with ``dof`` degrees of freedom, ``t ≥ 0``."""
    theta = math.atan(t / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    if dof % 2 == 1:
        term, total = c, 0.0
        for k in range(1, (dof - 1) // 2 + 1):  # terms cos^(2k−1) θ
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total) if dof > 1 else 2 / math.pi * theta
    term, total = 1.0, 0.0
    for k in range(dof // 2):  # terms cos^(2k) θ
        total += term
        term *= c * c * (2 * k + 1) / (2 * k + 2)
    return s * total


def t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of Student's t distribution with ``dof`` degrees of freedom.

    Args:
        q: the probability, ``0.5 ≤ q < 1`` (for example 0.975 for a two-sided 95 % interval).
        dof: the degrees of freedom, an int ``≥ 1``.

    Returns:
        ``t`` with ``P(T ≤ t) = q``.

    Raises:
        TypeError: if ``dof`` is not an int.
        ValueError: for ``q`` outside ``[0.5, 1)`` or ``dof < 1``.

    Examples:
        >>> round(t_quantile(0.975, 3), 3)
        3.182
    """
    if isinstance(dof, bool) or not isinstance(dof, int):
        raise TypeError(f"dof must be an int, got {type(dof).__name__} {dof!r}")
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if not 0.5 <= q < 1:
        raise ValueError(f"q must be in [0.5, 1), got {q!r}")
    target = 2 * q - 1  # P(|T| ≤ t)
    lo, hi = 0.0, 1.0
    while _two_sided(hi, dof) < target:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _two_sided(mid, dof) < target:
            lo = mid
        else:
            hi = mid
    return hi

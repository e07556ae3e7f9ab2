"""Two percentiles of a volume from one selection, without sorting it (NumPy only).

Kept apart from [`preprocessing`][mrissl.data.preprocessing] so that a loader worker that only
needs the percentiles (the command's fast path) does not import MONAI.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Percentiles", "percentile_pair"]


class Percentiles(NamedTuple):
    """Two percentiles of one tensor, from [`percentile_pair`][mrissl.data.percentile_pair].

    Attributes:
        lower: the ``lower`` percentile, a Python float.
        upper: the ``upper`` percentile, a Python float.
    """

    lower: float
    upper: float


def percentile_pair(x: torch.Tensor, lower: float, upper: float) -> Percentiles:
    """The ``lower`` and ``upper`` percentiles of all values of ``x``, from one selection.

    The same values as ``numpy.percentile(x, [lower, upper])`` (linear interpolation between
    the order statistics around ``q / 100 · (n − 1)``), without sorting ``x``: a sorted sample
    brackets the order statistics needed, two counts check the bracket, and only the values
    inside it are partitioned (exact whatever the sample; a failed bracket falls back to a
    partition of everything).

    Args:
        x: any shape, real values.
        lower: percentile in [0, 100].
        upper: percentile in [0, 100].

    Returns:
        [`Percentiles`][mrissl.data.Percentiles] ``(lower, upper)``, Python floats
        (float64 arithmetic).

    Examples:
        >>> percentile_pair(torch.arange(101.0), 1.0, 99.0)
        Percentiles(lower=1.0, upper=99.0)
    """
    flat = x.detach().reshape(-1).cpu().numpy()
    n = flat.size
    if n == 0:
        raise ValueError("percentile_pair needs at least one value, got an empty tensor")
    positions = [q / 100.0 * (n - 1) for q in (lower, upper)]
    kth = sorted({min(math.floor(p) + j, n - 1) for p in positions for j in (0, 1)})
    value = _order_statistics(flat, kth)
    out = []
    for p in positions:
        lo = math.floor(p)
        hi = min(lo + 1, n - 1)
        a, b, t = value[lo], value[hi], p - lo
        # numpy's lerp: exact at both ends of the interval
        out.append(b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t)
    return Percentiles(out[0], out[1])


_SAMPLE = 1 << 16


def _order_statistics(flat: np.ndarray, kth: list[int]) -> dict[int, float]:
    """The ``k``-th smallest values of ``flat`` (0-based) for each ``k`` in ``kth``: exact.

    A sorted strided sample of about 65,536 values brackets each ``k`` (eight standard
    deviations of a sample quantile's rank on each side); two counts check the
    bracket ``[v_lo, v_hi]`` (fewer than ``k + 1`` values below ``v_lo``, more than ``k`` up to
    ``v_hi``) and only the values inside it are partitioned. A bracket that fails falls back to
    ``numpy.partition`` of everything, so the result never depends on the sample.
    """
    n = flat.size
    if n <= 4 * _SAMPLE:
        part = np.partition(flat, kth)
        return {k: float(part[k]) for k in kth}
    sample = np.sort(flat[:: n // _SAMPLE])
    m = sample.size
    masks = np.empty((2, n), dtype=bool)  # work space of the comparisons, reused
    out: dict[int, float] = {}
    for k in kth:
        if k in out:
            continue
        r = k / (n - 1) * (m - 1)
        # ranks of sampling error allowed around k: eight standard deviations of the rank of
        # a sample quantile (binomial), plus a margin for a strided sample's structure
        q = min(max(r / max(m - 1, 1), 0.0), 1.0)
        slack = int(8 * math.sqrt(m * q * (1 - q))) + 32
        v_lo = sample[max(0, math.floor(r) - slack)]
        v_hi = sample[min(m - 1, math.ceil(r) + slack)]
        below = int(np.count_nonzero(np.less(flat, v_lo, out=masks[0])))
        if v_lo == v_hi:  # one tied value (a background of zeros): count it, keep nothing
            inside = None
            upto = below + int(np.count_nonzero(np.equal(flat, v_lo, out=masks[0])))
        else:
            np.greater_equal(flat, v_lo, out=masks[0])
            np.less_equal(flat, v_hi, out=masks[1])
            inside = flat[np.logical_and(masks[0], masks[1], out=masks[0])]
            upto = below + inside.size
        if not below <= k < upto:  # the sample missed: exact fallback
            part = np.partition(flat, kth)
            return {k: float(part[k]) for k in kth}
        ks = [j for j in kth if below <= j < upto and j not in out]
        if inside is None:  # every such k is the tied value
            out.update({j: float(v_lo) for j in ks})
            continue
        part = np.partition(inside, [j - below for j in ks])
        out.update({j: float(part[j - below]) for j in ks})
    return out

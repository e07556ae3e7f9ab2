"""Feature consistency between two copies of one case (BrainMVP supplement eq. 7).

Downstream, BrainMVP makes two copies of each case with different modalities replaced by their
learned templates and ties the encoder's features of the two copies together:

    L_cons = || F_enc(X') − F_enc(X'') ||_2                        (supplement eq. 7)

added to the task loss with weight λ_cons = 0.1. The norm is taken per case over all feature
entries and averaged over the batch. ``metric="mse"`` gives the mean squared difference instead,
which does not grow with the size of the feature map.
"""

from __future__ import annotations

from typing import Literal

import torch

from mrissl._checks import check_choice
from mrissl.losses._common import (
    check_features,
    check_same_shape,
    compute_dtype,
    l2_norm,
    no_autocast,
    raise_if_not_finite,
)

__all__ = ["consistency_loss"]


def consistency_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, *, metric: Literal["l2", "mse"] = "l2"
) -> torch.Tensor:
    """Distance between the features of two copies of the same cases (BrainMVP supp. eq. 7).

    Args:
        z_a: ``(B, ...)`` features of the first copy, any trailing shape (pooled ``(B, E)``,
            tokens ``(B, N, E)`` or feature maps ``(B, E, d, h, w)``).
        z_b: the features of the second copy, the same shape.
        metric: ``"l2"``: the Euclidean norm of the difference of each case, averaged over the
            batch (the paper). ``"mse"``: the mean squared difference over all entries.

    Returns:
        The scalar loss, float32 (float64 for float64 inputs). Its gradient is finite (zero)
        where the two copies agree.

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: naming the argument, for shapes that differ, a bad ``metric``; NaN or Inf
            with the value checks on (``mrissl.set_checks``).

    Examples:
        >>> z_a = torch.zeros(2, 3)
        >>> z_b = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
        >>> consistency_loss(z_a, z_b)  # (5 + 1) / 2
        tensor(3.)
        >>> consistency_loss(z_a, z_b, metric="mse")  # (9 + 16 + 1) / 6
        tensor(4.3333)
    """
    check_features(z_a, "z_a", ndim=tuple(range(1, 9)))
    check_features(z_b, "z_b", ndim=tuple(range(1, 9)))
    check_same_shape(z_a, z_b, "z_a", "z_b")
    check_choice(metric, "metric", ("l2", "mse"))
    dtype = compute_dtype(z_a, z_b)
    with no_autocast(z_a):
        diff = (z_a.to(dtype) - z_b.to(dtype)).reshape(z_a.shape[0], -1)
        if metric == "mse":
            loss = diff.square().mean()
        else:  # BrainMVP supplement eq. 7; the norm of rows scaled to max 1: no overflow
            norm = l2_norm(diff, dim=1)
            loss = norm.mean()
    return raise_if_not_finite(loss, z_a=z_a, z_b=z_b)

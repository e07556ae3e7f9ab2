"""Singular value spectrum, effective rank and RankMe of a feature matrix.

Dimensional collapse (E-MIM Sec. I and Fig. 1b) shows in the singular values ``σ_k`` of the
``(N, D)`` features (``(B, N, E)`` tokens count as ``B·N`` samples). Its summary is the
effective rank of Roy & Vetterli (2007, E-MIM ref. [27]),

    p_k = σ_k / Σ_j σ_j,        erank = exp(−Σ_k p_k log p_k),

and RankMe (Garrido et al., 2023) is the same entropy with a small ε added to every ``p_k``.
Everything runs in float64. The conventions (singular values, centering, the ``min(N, D)``
cap): [Dimensional collapse][dimensional-collapse-spectrum-and-effective-rank].
"""

from __future__ import annotations

import warnings

import torch

from mrissl._checks import check_bool, check_floating, check_number, check_tensor
from mrissl._settings import values_checked

__all__ = ["effective_rank", "rankme", "singular_values", "std_of_l2_normalized"]

RANKME_EPS = 1e-7  # Garrido et al. recommend 1e-7 for float32 embeddings


def _feature_matrix(z: torch.Tensor, name: str, min_samples: int = 2) -> torch.Tensor:
    """Validate ``(N, D)`` or ``(B, N, E)`` features and return them as ``(N, D)`` (same dtype)."""
    check_tensor(z, name, ndim=(2, 3))
    check_floating(z, name)
    matrix = z.flatten(0, 1) if z.ndim == 3 else z
    if matrix.shape[0] < min_samples:
        raise ValueError(
            f"{name} must hold at least {min_samples} samples (rows of the (N, D) matrix, or "
            f"B·N tokens of (B, N, E) features), got shape {tuple(z.shape)}"
        )
    if matrix.shape[1] < 1:
        raise ValueError(
            f"{name} must have a feature dimension of at least 1, got {tuple(z.shape)}"
        )
    if values_checked() and not bool(torch.isfinite(matrix).all()):
        bad = int((~torch.isfinite(matrix)).sum())
        raise ValueError(
            f"{name} must be finite, got {bad} NaN or Inf values in a tensor of shape "
            f"{tuple(z.shape)}"
        )
    return matrix


def _warn_if_capped(num_samples: int, dim: int, center: bool) -> None:
    cap = min(num_samples - int(center), dim)
    # a shape fact, known without the data; a compiled graph (which cannot hold a Python
    # warning without a break) skips it
    if cap < dim and not torch.compiler.is_compiling():
        warnings.warn(
            f"{num_samples} samples of dimension {dim}: the spectrum has at most {cap} non-zero "
            f"singular values{' after centering' if center else ''}, so the effective rank is "
            f"capped at {cap}; accumulate more samples (EffectiveRankMeter) for a full-rank view",
            stacklevel=3,
        )


def singular_values(z: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Singular values of a feature matrix, in float64 and in descending order.

    Args:
        z: ``(N, D)`` features, or ``(B, N, E)`` token features flattened to ``(B·N, E)``;
            any floating dtype, any device, at least 2 samples, all finite.
        center: subtract the mean of every feature (column) first, giving the spectrum of the
            covariance; ``False`` decomposes the raw matrix.

    Returns:
        ``(min(N, D),)`` float64 singular values on ``z``'s device, largest first. Eigenvalues
        of the (unnormalised) covariance ``zᵀz`` are their squares.

    Raises:
        TypeError: if ``z`` is not a floating-point tensor.
        ValueError: if ``z`` is not 2-D or 3-D, has fewer than 2 samples, or (with the value
            checks on, ``mrissl.set_checks``) holds NaN/Inf.

    Warns:
        UserWarning: when fewer samples than dimensions cap the number of non-zero values.

    Examples:
        >>> z = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> singular_values(z)
        tensor([4.2426, 1.4142], dtype=torch.float64)
        >>> singular_values(torch.randn(2, 16, 8)).shape  # 32 tokens of dimension 8
        torch.Size([8])
    """
    check_bool(center, "center")
    matrix = _feature_matrix(z, "z").to(torch.float64)
    _warn_if_capped(matrix.shape[0], matrix.shape[1], center)
    if center:
        matrix = matrix - matrix.mean(dim=0, keepdim=True)
    s: torch.Tensor = torch.linalg.svdvals(matrix)
    return s


def _spectrum(z_or_spectrum: torch.Tensor, center: bool, name: str) -> torch.Tensor:
    """Singular values of features, or a validated float64 copy of a given spectrum."""
    check_tensor(z_or_spectrum, name, ndim=(1, 2, 3))
    check_bool(center, "center")
    if z_or_spectrum.ndim > 1:
        return singular_values(z_or_spectrum, center=center)
    check_floating(z_or_spectrum, name)
    s = z_or_spectrum.to(torch.float64)
    if s.numel() == 0:
        raise ValueError(f"{name} as a spectrum must hold at least one singular value, got none")
    if values_checked() and not bool((torch.isfinite(s) & (s >= 0)).all()):
        raise ValueError(
            f"{name} as a 1-D spectrum must hold finite, non-negative singular values, got "
            f"min {float(s.min()):.4g} and max {float(s.max()):.4g}"
        )
    return s


def _entropy_rank(s: torch.Tensor, eps: float) -> torch.Tensor:
    """``exp(−Σ p log p)`` with ``p = σ/Σσ + eps``; 0 for an all-zero spectrum (rank 0)."""
    total = s.sum()
    p = s / torch.where(total > 0, total, torch.ones_like(total)) + eps
    rank = torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0·log 0 = 0
    # NaN stays NaN (it is not 0): with the value checks off, a broken input must still show
    return torch.where(total == 0, torch.zeros_like(rank), rank)


def effective_rank(z_or_spectrum: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Effective rank of Roy & Vetterli (2007), without ε.

    ``p_k = σ_k / Σ_j σ_j`` and ``erank = exp(−Σ_k p_k log p_k)`` over the singular values
    ``σ_k`` (not eigenvalues), with ``0·log 0 = 0``. A matrix with ``k`` equal non-zero singular
    values has effective rank exactly ``k``; the all-zero matrix has effective rank 0. The value
    is at most ``min(N, D)`` (a warning says so when ``N < D``).

    Args:
        z_or_spectrum: ``(N, D)`` or ``(B, N, E)`` features (see
            [`singular_values`][mrissl.diagnostics.singular_values]), or a 1-D tensor of
            precomputed singular values.
        center: subtract the feature means before decomposing (ignored for a spectrum).

    Returns:
        A 0-dim float64 tensor on the input's device.

    Raises:
        TypeError: if the input is not a floating-point tensor.
        ValueError: for a wrong number of dimensions, fewer than 2 samples; with the value
            checks on, NaN/Inf values or a spectrum with negative entries.

    Examples:
        >>> erank = effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0]))  # 3 equal singular values
        >>> erank.dtype, round(float(erank), 12)
        (torch.float64, 3.0)
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(1000, 4, generator=g) @ torch.diag(torch.tensor([1.0, 1.0, 1e-3, 0]))
        >>> round(float(effective_rank(z)), 2)  # two strong directions, one weak, one empty
        2.01
    """
    # Roy & Vetterli (2007), E-MIM ref. [27]
    return _entropy_rank(_spectrum(z_or_spectrum, center, "z_or_spectrum"), 0.0)


def rankme(
    z_or_spectrum: torch.Tensor, *, eps: float = RANKME_EPS, center: bool = False
) -> torch.Tensor:
    """RankMe of Garrido et al. (2023): the effective rank with ``ε`` added to every ``p_k``.

    ``p_k = σ_k / Σ_j σ_j + ε`` and ``RankMe = exp(−Σ_k p_k log p_k)`` over the singular values
    (not eigenvalues). The ``ε`` keeps the logarithm finite but lifts a collapsed score: every
    empty direction adds about ``ε·log(1/ε)``, so ``eps=0`` equals
    [`effective_rank`][mrissl.diagnostics.effective_rank]. The paper decomposes the raw
    embeddings, hence ``center=False`` by default here. Capped at ``min(N, D)`` like the
    effective rank; an all-zero matrix gives 0.

    Args:
        z_or_spectrum: ``(N, D)`` or ``(B, N, E)`` features, or a 1-D tensor of singular values.
        eps: the ``ε`` added to the normalised singular values, ``>= 0`` (paper: ``1e-7``).
        center: subtract the feature means before decomposing (ignored for a spectrum).

    Returns:
        A 0-dim float64 tensor on the input's device.

    Raises:
        TypeError: if the input is not a floating-point tensor or ``eps`` is not a number.
        ValueError: as [`effective_rank`][mrissl.diagnostics.effective_rank], or if ``eps < 0``.

    Examples:
        >>> s = torch.tensor([1.0, 1.0, 0.0, 0.0])
        >>> float(rankme(s, eps=0.0))
        2.0
        >>> float(rankme(s)) > 2.0  # the two empty directions add a little
        True
    """
    eps = check_number(eps, "eps", low=0)
    # Garrido et al. (2023), eqs. 1-2
    return _entropy_rank(_spectrum(z_or_spectrum, center, "z_or_spectrum"), eps)


def std_of_l2_normalized(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the standard deviation of L2-normalised features.

    The collapse indicator of SimSiam (Chen & He, 2021), ``mean_d std_n (z_n / ||z_n||)_d``:
    0 when every sample points the same way (complete collapse), close to ``1/sqrt(D)`` for
    isotropic Gaussian features. Computed in float32 (float64 stays float64) at any scale; an
    all-zero sample stays zero.

    Args:
        z: ``(N, D)`` features, or ``(B, N, E)`` tokens flattened to ``(B·N, E)``; at least 2
            samples, all finite.

    Returns:
        A 0-dim tensor on ``z``'s device.

    Raises:
        TypeError: if ``z`` is not a floating-point tensor.
        ValueError: for a wrong number of dimensions, fewer than 2 samples or (with the value
            checks on) NaN/Inf values.

    Examples:
        >>> std_of_l2_normalized(torch.ones(8, 4))  # every sample points the same way
        tensor(0.)
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(20000, 64, generator=g)
        >>> abs(float(std_of_l2_normalized(z)) - 64 ** -0.5) < 1e-3
        True
    """
    matrix = _feature_matrix(z, "z")
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    x = matrix.to(dtype)
    # the direction of each sample at any magnitude: the norm of the row scaled to max |x| = 1
    # (an all-zero sample stays zero)
    peak = x.detach().abs().amax(dim=1, keepdim=True)
    x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    unit = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1.0)
    out: torch.Tensor = unit.std(dim=0).mean()
    return out

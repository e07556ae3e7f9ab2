"""Barlow Twins: push a cross-correlation matrix of two views towards the identity.

``L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²`` (E-MIM eq. 8), optionally divided by the size of
``C`` (``scale_by_size``). Two ways to build ``C`` are in use, and both are here:

* ``mode="feature"`` (Zbontar et al. 2021): ``C_ij = (1/M) Σ_m a_mi b_mj``, the ``D × D``
  correlation of features standardised along the ``M`` samples (biased std), λ = 5e-3;
* ``mode="token"`` (E-MIM eqs. 4 and 8): ``C_ij = z_i · z_m_j / (||z_i|| ||z_m_j||)``, the
  ``N × N`` cosine matrix over **patch positions**, λ = 1, built per sample or jointly over
  the batch (``batch_mode``).

Why the standard deviation is the biased one, how the batch enters token mode and when the
Gram-matrix shortcut is taken: [Barlow Twins in two modes][barlow-twins-in-two-modes].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mrissl._checks import check_bool, check_choice, check_number
from mrissl.distributed import (
    all_gather,
    all_reduce,
    broadcast_,
    gather_sizes,
    is_distributed,
)
from mrissl.losses._common import (
    check_features,
    check_same_shape,
    compute_dtype,
    frobenius_sq_of_product,
    inv_l2_norm,
    l2_normalize,
    max_abs_scale,
    no_autocast,
    raise_if_not_finite,
)

__all__ = ["BarlowTwinsLoss", "barlow_twins"]

Mode = Literal["feature", "token"]
BatchMode = Literal["per_sample", "joint"]

_DEFAULT_LAMBDA = {"feature": 5e-3, "token": 1.0}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _standardize(z: torch.Tensor, eps: float, n_total: int, distributed: bool) -> torch.Tensor:
    """Centre and scale each feature of ``z: (M, D)`` to mean 0 and (biased) std 1.

    The data are first shifted by one reference sample (the same on every process). The shift
    cancels mathematically and is detached, so values and gradients are those of ``z − mean``;
    but a constant feature becomes exactly zero in any precision, so its row of ``C`` is 0 and
    not rounding noise divided by a tiny standard deviation. Each feature is then divided by its
    (detached) largest magnitude, so that its squares neither overflow float32 for features
    around 1e30 nor underflow for features around 1e-30; the standardised result is the same.
    """
    reduce = all_reduce if distributed else _identity
    shift = z[:1].detach().clone()
    if distributed:
        broadcast_(shift)
    y = z - shift
    s = max_abs_scale(y, 0, across_processes=distributed)  # (1, D)
    y = y / s
    mean = reduce(y.sum(dim=0)) / n_total
    y = y - mean
    var = reduce(y.square().sum(dim=0)) / n_total
    # the smallest std, eps, in the units of y / s; a non-constant feature has var >= 1/M² here
    return y * var.clamp_min((eps / s[0]).square()).rsqrt()


def _feature_mode(
    z_a: torch.Tensor, z_b: torch.Tensor, lam: float, eps: float, gather: bool
) -> tuple[torch.Tensor, int]:
    D = z_a.shape[-1]
    a, b = z_a.reshape(-1, D), z_b.reshape(-1, D)
    distributed = gather and is_distributed()
    sizes = gather_sizes(a.shape[0], device=a.device) if distributed else [a.shape[0]]
    M = sum(sizes)
    if M < 2:
        raise ValueError(
            f"z_a and z_b need at least 2 samples in feature mode (each feature is standardised "
            f"along the batch), got shape {tuple(z_a.shape)}"
            + (f" on {len(sizes)} processes, {M} in all" if distributed else "")
        )
    reduce = all_reduce if distributed else _identity
    a = _standardize(a, eps, M, distributed)
    b = _standardize(b, eps, M, distributed)

    C_ii = reduce((a * b).sum(dim=0)) / M
    if 2 * M < D:  # Σ_ij C_ij² from M × M Gram matrices (see frobenius_sq_of_product)
        if distributed:
            gram_a = a @ all_gather(a, sizes=sizes).T
            gram_b = b @ all_gather(b, sizes=sizes).T
            sum_sq = reduce((gram_a * gram_b).sum())
        else:
            sum_sq = frobenius_sq_of_product(a.T, b.T)
    else:
        C = reduce(a.T @ b)
        sum_sq = torch.linalg.vector_norm(C).square()
    sum_sq = sum_sq / (M * M)
    invariance = (1 - C_ii).square().sum()
    redundancy = sum_sq - C_ii.square().sum()
    return invariance + lam * redundancy, D


def _token_mode(
    z: torch.Tensor, z_m: torch.Tensor, lam: float, eps: float, batch_mode: str, gather: bool
) -> tuple[torch.Tensor, int]:
    B, N, E = z.shape
    distributed = gather and is_distributed()
    reduce = all_reduce if distributed else _identity
    if batch_mode == "per_sample":
        # E-MIM eq. 4: C_ij = z_i · z_m_j / (||z_i|| ||z_m_j||), one N × N matrix per sample;
        # each token is scaled to max |z| = 1 first, so no square or product overflows
        s_a, s_b = max_abs_scale(z, -1), max_abs_scale(z_m, -1)  # (B, N, 1)
        u, v = z / s_a, z_m / s_b
        inv_a, inv_b = inv_l2_norm(u, -1, eps / s_a), inv_l2_norm(v, -1, eps / s_b)
        if 2 * E < N:  # Σ_ij C_ij² from E × E Gram matrices, C never formed
            u, v = u * inv_a, v * inv_b
            C_ii = torch.linalg.vecdot(u, v)  # (B, N)
            sum_sq = frobenius_sq_of_product(u, v)  # (B,)
        else:  # scale the N × N product rather than the (B, N, E) features: fewer passes
            C = (u @ v.mT) * inv_a * inv_b.mT
            C_ii = C.diagonal(dim1=-2, dim2=-1)
            sum_sq = torch.linalg.vector_norm(C, dim=(-2, -1)).square()
        per_sample = (1 - C_ii).square().sum(-1) + lam * (sum_sq - C_ii.square().sum(-1))
        if not distributed:
            return per_sample.mean(), N
        n_total = sum(gather_sizes(B, device=z.device))
        return reduce(per_sample.sum()) / n_total, N
    # "joint": the feature vector of position i is z[:, i, :] over the whole batch
    s_a = max_abs_scale(z, (0, 2), across_processes=distributed)  # (1, N, 1)
    s_b = max_abs_scale(z_m, (0, 2), across_processes=distributed)
    u = l2_normalize(z, (0, 2), eps, scale=s_a, reduce=reduce)
    v = l2_normalize(z_m, (0, 2), eps, scale=s_b, reduce=reduce)
    C_ii = reduce((u * v).sum(dim=(0, 2)))
    if distributed:
        C = reduce(torch.einsum("bie,bje->ij", u, v))
        sum_sq = torch.linalg.vector_norm(C).square()
    else:
        sum_sq = frobenius_sq_of_product(
            u.transpose(0, 1).reshape(N, B * E), v.transpose(0, 1).reshape(N, B * E)
        )
    return (1 - C_ii).square().sum() + lam * (sum_sq - C_ii.square().sum()), N


def barlow_twins(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    mode: Mode = "feature",
    lambda_offdiag: float | None = None,
    batch_mode: BatchMode = "per_sample",
    scale_by_size: bool = False,
    eps: float = 1e-6,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """Barlow Twins loss between two views, in feature or token mode (module docstring).

    ``L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²`` with ``C`` the ``D × D`` feature correlation
    (``mode="feature"``, Zbontar et al. 2021) or the ``N × N`` cosine matrix over patch positions
    (``mode="token"``, E-MIM eqs. 4 and 8). Computed in float32 (float64 for float64 inputs)
    with autocast off, so bf16/fp16 features give the float32 value of their rounded inputs.

    Args:
        z_a: first view. Feature mode: ``(B, D)`` embeddings or ``(B, N, D)`` token features.
            Token mode: ``(B, N, E)`` token features (E-MIM: ``z^l`` of the full image).
        z_b: second view, the same shape (E-MIM: ``z_m^l`` of the masked image).
        mode: ``"feature"`` or ``"token"``.
        lambda_offdiag: weight λ of the off-diagonal term; ``None`` gives 5e-3 in feature mode
            (Barlow Twins) and 1.0 in token mode (E-MIM eq. 8).
        batch_mode: token mode only. ``"per_sample"``: one ``N × N`` matrix per sample, the
            ``B`` losses averaged. ``"joint"``: one matrix, with the sums in eq. 4 running over
            the batch and the features.
        scale_by_size: divide the loss by the matrix size (``D`` or ``N``), so that it is a
            mean over rows and comparable across sizes.
        eps: the smallest standard deviation (feature mode) or norm (token mode) divided by;
            a constant feature or an all-zero token contributes a zero row to ``C``.
        gather_distributed: use the batch of all processes: feature mode standardises and
            correlates over the global batch, token mode averages over the global batch. The
            value and the (DDP-averaged) gradients are those of one process holding the whole
            batch (see [`mrissl.distributed`][mrissl.distributed]).

    Returns:
        The scalar loss, float32 (float64 for float64 inputs).

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: naming the argument, for shapes that differ or do not fit the mode, a
            single sample in feature mode, a bad ``mode``/``batch_mode``, a negative
            ``lambda_offdiag`` or non-positive ``eps``, and (with the value checks on) NaN or Inf
            in the features.

    Examples:
        Identical views give exactly zero invariance loss, even for a batch of two:

        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(2, 16, generator=g)
        >>> float(barlow_twins(z, z, lambda_offdiag=0.0)) < 1e-10
        True

        Token mode compares patch positions of the full and the masked view (E-MIM):

        >>> z, z_m = torch.randn(2, 2, 8, 32, generator=g)  # (B, N, E) each
        >>> loss = barlow_twins(z, z_m, mode="token")
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
    """
    lam = _check_config(mode, lambda_offdiag, batch_mode, scale_by_size, eps, gather_distributed)
    return _barlow_twins(
        z_a,
        z_b,
        mode=mode,
        lam=lam,
        batch_mode=batch_mode,
        scale_by_size=scale_by_size,
        eps=eps,
        gather_distributed=gather_distributed,
    )


def _check_config(
    mode: str,
    lambda_offdiag: float | None,
    batch_mode: str,
    scale_by_size: bool,
    eps: float,
    gather_distributed: bool,
) -> float:
    """Validate the configuration of a Barlow Twins loss; return the resolved λ."""
    check_choice(mode, "mode", ("feature", "token"))
    check_choice(batch_mode, "batch_mode", ("per_sample", "joint"))
    check_bool(scale_by_size, "scale_by_size")
    check_bool(gather_distributed, "gather_distributed")
    check_number(eps, "eps", low=0, low_open=True)
    lam = _DEFAULT_LAMBDA[mode] if lambda_offdiag is None else lambda_offdiag
    return check_number(lam, "lambda_offdiag", low=0)


def _barlow_twins(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    mode: str,
    lam: float,
    batch_mode: str,
    scale_by_size: bool,
    eps: float,
    gather_distributed: bool,
) -> torch.Tensor:
    """[`barlow_twins`][mrissl.losses.barlow_twins] for a validated configuration.

    Checks the tensors (every call) but not the configuration (checked once by the caller).
    """
    check_features(z_a, "z_a", ndim=(2, 3) if mode == "feature" else 3)
    check_features(z_b, "z_b", ndim=(2, 3) if mode == "feature" else 3)
    check_same_shape(z_a, z_b, "z_a", "z_b")
    if z_a.device != z_b.device:
        raise ValueError(f"z_a and z_b must be on one device, got {z_a.device} and {z_b.device}")

    dtype = compute_dtype(z_a, z_b)
    with no_autocast(z_a):
        a, b = z_a.to(dtype), z_b.to(dtype)
        if mode == "feature":
            loss, size = _feature_mode(a, b, lam, float(eps), gather_distributed)
        else:
            loss, size = _token_mode(a, b, lam, float(eps), batch_mode, gather_distributed)
        if scale_by_size:
            loss = loss / size
    return raise_if_not_finite(loss, z_a=z_a, z_b=z_b)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss as a module.

    Holds the configuration, validated once here, and computes
    [`barlow_twins`][mrissl.losses.barlow_twins] with it:
    ``L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²``.

    Args:
        mode: ``"feature"`` (Barlow Twins, ``D × D`` feature correlation) or ``"token"``
            (E-MIM eq. 4, ``N × N`` cosine matrix over patch positions).
        lambda_offdiag: off-diagonal weight; ``None`` gives 5e-3 (feature) or 1.0 (token).
        batch_mode: token mode: ``"per_sample"`` matrices averaged, or one ``"joint"`` matrix.
        scale_by_size: divide by the matrix size ``D`` or ``N``.
        eps: smallest standard deviation or norm divided by.
        gather_distributed: use the global batch across processes, with gradients.

    Raises:
        TypeError: for a non-bool flag or a non-number ``lambda_offdiag``/``eps``.
        ValueError: for an unknown ``mode``/``batch_mode``, a negative ``lambda_offdiag`` or a
            non-positive ``eps``; ``forward`` raises as
            [`barlow_twins`][mrissl.losses.barlow_twins].

    Examples:
        >>> loss_fn = BarlowTwinsLoss()  # feature mode, λ = 5e-3
        >>> g = torch.Generator().manual_seed(0)
        >>> z_a = torch.randn(32, 64, generator=g, requires_grad=True)  # (B, D)
        >>> z_b = z_a.detach() + 0.1 * torch.randn(32, 64, generator=g)
        >>> loss = loss_fn(z_a, z_b)
        >>> loss.backward()
        >>> z_a.grad.shape
        torch.Size([32, 64])
    """

    def __init__(
        self,
        mode: Mode = "feature",
        *,
        lambda_offdiag: float | None = None,
        batch_mode: BatchMode = "per_sample",
        scale_by_size: bool = False,
        eps: float = 1e-6,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self._lam = _check_config(
            mode, lambda_offdiag, batch_mode, scale_by_size, eps, gather_distributed
        )
        self.mode: Mode = mode
        self.lambda_offdiag = lambda_offdiag
        self.batch_mode: BatchMode = batch_mode
        self.scale_by_size = scale_by_size
        self.eps = eps
        self.gather_distributed = gather_distributed

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """Return the loss of ``z_a`` and ``z_b``: ``(B, D)``, ``(B, N, D)`` or ``(B, N, E)``."""
        return _barlow_twins(
            z_a,
            z_b,
            mode=self.mode,
            lam=self._lam,
            batch_mode=self.batch_mode,
            scale_by_size=self.scale_by_size,
            eps=self.eps,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        """The configuration, shown in ``repr(module)``."""
        return (
            f"mode={self.mode!r}, lambda_offdiag={self.lambda_offdiag}, "
            f"batch_mode={self.batch_mode!r}, scale_by_size={self.scale_by_size}, "
            f"gather_distributed={self.gather_distributed}"
        )

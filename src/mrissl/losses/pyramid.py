"""E-MIM's pyramid Barlow Twins (PBT) loss, for any encoder whose blocks can be captured.

The token features ``z^l`` (full image) and ``z_m^l`` (masked image) of ``L`` encoder levels
([`pyramid_levels`][mrissl.nn.pyramid_levels]) are compared by token-mode
[`barlow_twins`][mrissl.losses.barlow_twins] and summed:

    L^l     = Σ_i (1 − C^l_ii)² + Σ_i Σ_{j≠i} (C^l_ij)²          (E-MIM eq. 8)
    L_PBT   = Σ_l w_l L^l                                          (E-MIM eq. 7, w_l = 1)

``reduction="mean"`` (default) divides each ``L^l`` by the ``N²`` entries of its matrix;
``reduction="sum"`` is eq. 8 as printed. A token-dropping encoder passes the ``keep`` indices
of its masked view. Why the mean, and how to weigh PBT against a reconstruction loss:
[Balancing the E-MIM objective][balancing-the-e-mim-objective].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, overload

import torch
from torch import nn

from mrissl._checks import as_index, check_choice, check_index, check_number, check_tensor
from mrissl._settings import values_checked
from mrissl.losses.barlow_twins import BatchMode, Mode, _barlow_twins, _check_config
from mrissl.nn import gather_tokens

__all__ = ["PyramidBarlowTwinsLoss", "PyramidLoss", "pyramid_barlow_twins"]

Reduction = Literal["mean", "sum"]


class PyramidLoss(NamedTuple):
    """The pyramid Barlow Twins loss with its parts (``return_levels=True``).

    Attributes:
        total: the scalar ``Σ_l w_l L^l`` (E-MIM eq. 7), the value to back-propagate.
        per_level: ``(L,)`` the unweighted level losses ``L^l`` in level order, each reduced as
            ``reduction`` says; for logging (both keep their graph). A module's level names are
            in ``PyramidBarlowTwinsLoss.levels``: ``dict(zip(pbt.levels, per_level))``.
    """

    total: torch.Tensor
    per_level: torch.Tensor


def _check_reduction(reduction: str, scale_by_size: bool) -> None:
    check_choice(reduction, "reduction", ("mean", "sum"))
    if reduction == "mean" and scale_by_size:
        raise ValueError(
            "scale_by_size=True divides each level by N and reduction='mean' by N²; pass "
            "reduction='sum' with scale_by_size=True, or reduction='mean' alone"
        )


def _check_level_count(n_a: int, n_b: int) -> None:
    if n_a == 0 or n_a != n_b:
        raise ValueError(
            f"z_a and z_b must hold the same, non-zero number of levels, got {n_a} and {n_b}"
        )


def _check_weights(
    weights: Sequence[float] | torch.Tensor | None, levels: int
) -> list[float] | torch.Tensor:
    """Level weights as floats, or as a tensor (its values checked only with the value checks)."""
    if weights is None:
        return [1.0] * levels
    if isinstance(weights, torch.Tensor):
        if weights.numel() != levels:
            raise ValueError(
                f"weights must have one entry per level ({levels}), got shape "
                f"{tuple(weights.shape)}"
            )
        # reading the values would synchronise with the device: a value check (opt-in)
        if values_checked() and not bool(((weights >= 0) & torch.isfinite(weights)).all()):
            raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
        return weights.flatten()
    if not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != levels:
        raise ValueError(f"weights must have one entry per level ({levels}), got {len(weights)}")
    return [check_number(w, f"weights[{i}]", low=0) for i, w in enumerate(weights)]


@overload
def pyramid_barlow_twins(
    z_a: Sequence[torch.Tensor],
    z_b: Sequence[torch.Tensor],
    *,
    keep: torch.Tensor | None = ...,
    weights: Sequence[float] | torch.Tensor | None = ...,
    mode: Mode = ...,
    lambda_offdiag: float | None = ...,
    batch_mode: BatchMode = ...,
    scale_by_size: bool = ...,
    eps: float = ...,
    gather_distributed: bool = ...,
    reduction: Reduction = ...,
    return_levels: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def pyramid_barlow_twins(
    z_a: Sequence[torch.Tensor],
    z_b: Sequence[torch.Tensor],
    *,
    keep: torch.Tensor | None = ...,
    weights: Sequence[float] | torch.Tensor | None = ...,
    mode: Mode = ...,
    lambda_offdiag: float | None = ...,
    batch_mode: BatchMode = ...,
    scale_by_size: bool = ...,
    eps: float = ...,
    gather_distributed: bool = ...,
    reduction: Reduction = ...,
    return_levels: Literal[True],
) -> PyramidLoss: ...


def pyramid_barlow_twins(
    z_a: Sequence[torch.Tensor],
    z_b: Sequence[torch.Tensor],
    *,
    keep: torch.Tensor | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    mode: Mode = "token",
    lambda_offdiag: float | None = None,
    batch_mode: BatchMode = "per_sample",
    scale_by_size: bool = False,
    eps: float = 1e-6,
    gather_distributed: bool = False,
    reduction: Reduction = "mean",
    return_levels: bool = False,
) -> torch.Tensor | PyramidLoss:
    """Pyramid Barlow Twins loss (E-MIM eqs. 4–8): the weighted sum of per-level losses.

    Args:
        z_a: the full view: ``L`` tensors ``(B, N, E_l)``, the features of the full image at
            each level (an [`IntermediateFeatures`][mrissl.nn.IntermediateFeatures] works as is).
        z_b: the masked view: ``L`` tensors, the masked image's features at the same levels:
            ``(B, N, E_l)`` from a full-token encoder, or ``(B, K, E_l)`` from a
            token-dropping encoder.
        keep: ``(B, K)`` int64 positions of the tokens the masked view kept, for a
            token-dropping encoder; ``z_a`` is gathered at them. ``None``: every position.
        weights: ``L`` non-negative level weights ``w_l``; ``None`` gives 1 (eq. 7).
        mode: ``"token"`` (E-MIM, ``N × N`` over positions) or ``"feature"``.
        lambda_offdiag: off-diagonal weight; ``None``: 1.0 in token mode (eq. 8).
        batch_mode: how the batch enters eq. 4 (see [`barlow_twins`][mrissl.losses.barlow_twins]).
        scale_by_size: divide each level's loss by its matrix size (only with
            ``reduction="sum"``).
        eps: smallest norm or standard deviation divided by.
        gather_distributed: use the global batch across processes, with gradients.
        reduction: ``"mean"`` divides each level's eq. 8 by the number of entries of its
            matrix (``N²`` in token mode, ``D²`` in feature mode), so that it is on the scale
            of a mean-squared reconstruction loss; ``"sum"`` is eq. 8 as printed.
        return_levels: also return the unweighted level losses, as a
            [`PyramidLoss`][mrissl.losses.PyramidLoss].

    Returns:
        The scalar ``Σ_l w_l L^l``; with ``return_levels=True`` a
        [`PyramidLoss`][mrissl.losses.PyramidLoss] ``(total, per_level)``.

    Raises:
        ValueError: naming the argument and the level, for different numbers of levels,
            shapes that differ between the views, a bad ``keep`` or ``weights``; NaN or Inf with
            the value checks on (``mrissl.set_checks``).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> full = [torch.randn(2, 27, 16, generator=g) for _ in range(4)]  # 4 × (B, N, E)
        >>> masked = [z + 0.1 * torch.randn(z.shape, generator=g) for z in full]
        >>> total, per_level = pyramid_barlow_twins(full, masked, return_levels=True)
        >>> per_level.shape, bool(torch.isclose(total, per_level.sum()))
        (torch.Size([4]), True)
        >>> as_printed = pyramid_barlow_twins(full, masked, reduction="sum")  # eq. 8
        >>> bool(torch.isclose(as_printed, 27**2 * total))
        True
    """
    lam = _check_config(mode, lambda_offdiag, batch_mode, scale_by_size, eps, gather_distributed)
    _check_reduction(reduction, scale_by_size)
    full, masked = list(z_a), list(z_b)
    _check_level_count(len(full), len(masked))
    w = _check_weights(weights, len(full))
    result = _pyramid_barlow_twins(
        full,
        masked,
        keep=keep,
        weights=w,
        mode=mode,
        lam=lam,
        batch_mode=batch_mode,
        scale_by_size=scale_by_size,
        eps=eps,
        gather_distributed=gather_distributed,
        reduction=reduction,
    )
    return result if return_levels else result.total


def _pyramid_barlow_twins(
    z_a: Sequence[torch.Tensor],
    z_b: Sequence[torch.Tensor],
    *,
    keep: torch.Tensor | None,
    weights: list[float] | torch.Tensor,
    mode: str,
    lam: float,
    batch_mode: str,
    scale_by_size: bool,
    eps: float,
    gather_distributed: bool,
    reduction: str,
) -> PyramidLoss:
    """[`pyramid_barlow_twins`][mrissl.losses.pyramid_barlow_twins] for a validated configuration.

    Checks the level tensors (every call), not the configuration (checked once by the caller).
    """
    full, masked = list(z_a), list(z_b)
    _check_level_count(len(full), len(masked))
    if len(weights) != len(full):
        raise ValueError(f"weights must have one entry per level ({len(full)}), got {len(weights)}")
    losses = []
    for level, (z, z_m) in enumerate(zip(full, masked, strict=True)):
        for name, t in (("z_a", z), ("z_b", z_m)):
            if not isinstance(t, torch.Tensor) or t.ndim != 3:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}[{level}] must be a (B, N, E) tensor, got {shape}")
        if keep is not None:
            keep = as_index(keep, "keep", z.device)
            check_tensor(keep, "keep", ndim=2)
            if z_m.shape[1] != keep.shape[-1]:
                raise ValueError(
                    f"z_b[{level}] must hold one token per kept position: keep has shape "
                    f"{tuple(keep.shape)}, z_b[{level}] has shape {tuple(z_m.shape)}"
                )
            check_index(keep, "keep", z.shape[0], z.shape[1])
            z = gather_tokens(z, keep)
        if z.shape != z_m.shape:
            hint = "" if keep is not None else " (pass keep= for a token-dropping encoder)"
            raise ValueError(
                f"z_a[{level}] and z_b[{level}] must have the same shape, got "
                f"{tuple(z.shape)} and {tuple(z_m.shape)}{hint}"
            )
        try:
            loss = _barlow_twins(
                z,
                z_m,
                mode=mode,
                lam=lam,
                batch_mode=batch_mode,
                scale_by_size=scale_by_size,
                eps=eps,
                gather_distributed=gather_distributed,
            )
        except ValueError as err:
            msg = str(err).replace("z_a", f"z_a[{level}]").replace("z_b", f"z_b[{level}]")
            raise ValueError(msg) from err
        if reduction == "mean":  # eq. 8 over the entries of C: N² positions or D² features
            size = z.shape[1] if mode == "token" else z.shape[-1]
            loss = loss / (size * size)
        losses.append(loss)
    per_level = torch.stack(losses)
    if isinstance(weights, torch.Tensor):
        total = (weights.to(per_level) * per_level).sum()
    else:
        total = sum(
            (wl * loss for wl, loss in zip(weights, losses, strict=True)), per_level.new_zeros(())
        )
    return PyramidLoss(total, per_level)


class PyramidBarlowTwinsLoss(nn.Module):
    """E-MIM's pyramid Barlow Twins loss as a module.

    Holds the configuration, validated once here, and computes
    [`pyramid_barlow_twins`][mrissl.losses.pyramid_barlow_twins] with it. To add it to an
    existing masked autoencoder, capture the block outputs of both views with
    [`capture_intermediates`][mrissl.nn.capture_intermediates] and write
    ``loss = loss + pbt(full_feats, masked_feats)``.

    Args:
        levels: the number of levels ``L``, or the block numbers of the levels (for example
            ``pyramid_levels(12, 4)``), which then name the per-level values.
        weights: ``L`` non-negative level weights; ``None`` gives 1 (eq. 7).
        mode: ``"token"`` (E-MIM) or ``"feature"``.
        lambda_offdiag: off-diagonal weight; ``None``: 1.0 in token mode (eq. 8).
        batch_mode: ``"per_sample"`` or ``"joint"`` (see
            [`barlow_twins`][mrissl.losses.barlow_twins]).
        scale_by_size: divide each level's loss by its matrix size (only with
            ``reduction="sum"``).
        eps: smallest norm or standard deviation divided by.
        gather_distributed: use the global batch across processes, with gradients.
        reduction: ``"mean"`` (default: each level's eq. 8 divided by the number of entries of
            its matrix, the scale of a mean-squared reconstruction loss) or ``"sum"`` (eq. 8 as
            printed, for ``masked_reconstruction_loss(..., reduction="sum")``, E-MIM eq. 10).

    Attributes:
        levels: the level names: block numbers, or ``1 … L``, in the order of ``per_level``.

    Raises:
        TypeError: for ``levels`` that are neither an int nor a sequence, or a bad setting type.
        ValueError: for no or repeated levels, ``weights`` of the wrong length or negative, and
            the settings [`BarlowTwinsLoss`][mrissl.losses.BarlowTwinsLoss] rejects;
            ``forward`` raises as [`pyramid_barlow_twins`][mrissl.losses.pyramid_barlow_twins].

    Examples:
        >>> from mrissl.nn import pyramid_levels
        >>> pbt = PyramidBarlowTwinsLoss(pyramid_levels(12, 4))
        >>> g = torch.Generator().manual_seed(0)
        >>> full = [torch.randn(2, 27, 16, generator=g) for _ in range(4)]
        >>> masked = [z + 0.1 * torch.randn(z.shape, generator=g) for z in full]
        >>> loss = torch.tensor(0.5)  # e.g. the reconstruction loss
        >>> loss = loss + pbt(full, masked)
        >>> total, per_level = pbt(full, masked, return_levels=True)
        >>> sorted(dict(zip(pbt.levels, per_level)))  # block numbers -> unweighted level losses
        [3, 6, 9, 12]
    """

    def __init__(
        self,
        levels: int | Sequence[int] = 4,
        *,
        weights: Sequence[float] | torch.Tensor | None = None,
        mode: Mode = "token",
        lambda_offdiag: float | None = None,
        batch_mode: BatchMode = "per_sample",
        scale_by_size: bool = False,
        eps: float = 1e-6,
        gather_distributed: bool = False,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, (int, Sequence)):
            raise TypeError(f"levels must be an int or a sequence of block numbers, got {levels!r}")
        names = list(range(1, levels + 1)) if isinstance(levels, int) else list(levels)
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"levels must be a positive int or distinct block numbers, got {levels!r}"
            )
        self._lam = _check_config(
            mode, lambda_offdiag, batch_mode, scale_by_size, eps, gather_distributed
        )
        _check_reduction(reduction, scale_by_size)
        self.levels: list[int] = names
        if isinstance(weights, torch.Tensor):  # configuration: read once, here
            weights = [float(w) for w in weights.detach().flatten().tolist()]
        self.weights = _check_weights(weights, len(names))
        self.mode: Mode = mode
        self.lambda_offdiag = lambda_offdiag
        self.batch_mode: BatchMode = batch_mode
        self.scale_by_size = scale_by_size
        self.eps = eps
        self.gather_distributed = gather_distributed
        self.reduction: Reduction = reduction

    @overload
    def forward(
        self,
        z_a: Sequence[torch.Tensor],
        z_b: Sequence[torch.Tensor],
        keep: torch.Tensor | None = ...,
        *,
        return_levels: Literal[False] = ...,
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        z_a: Sequence[torch.Tensor],
        z_b: Sequence[torch.Tensor],
        keep: torch.Tensor | None = ...,
        *,
        return_levels: Literal[True],
    ) -> PyramidLoss: ...

    def forward(
        self,
        z_a: Sequence[torch.Tensor],
        z_b: Sequence[torch.Tensor],
        keep: torch.Tensor | None = None,
        *,
        return_levels: bool = False,
    ) -> torch.Tensor | PyramidLoss:
        """Return ``L_PBT`` for the level features of both views.

        Args:
            z_a: the full view, ``L`` tensors ``(B, N, E_l)``.
            z_b: the masked view, ``L`` tensors ``(B, N, E_l)``, or ``(B, K, E_l)`` with
                ``keep``.
            keep: ``(B, K)`` int64 kept positions of a token-dropping encoder's masked view.
            return_levels: also return the unweighted level losses, in the order of
                ``self.levels``.

        Returns:
            The scalar total, or a [`PyramidLoss`][mrissl.losses.PyramidLoss]
            ``(total, per_level)`` with ``return_levels=True``.
        """
        if len(z_a) != len(self.levels):
            raise ValueError(
                f"z_a must hold {len(self.levels)} levels (levels={self.levels}), got {len(z_a)}"
            )
        result = _pyramid_barlow_twins(
            z_a,
            z_b,
            keep=keep,
            weights=self.weights,
            mode=self.mode,
            lam=self._lam,
            batch_mode=self.batch_mode,
            scale_by_size=self.scale_by_size,
            eps=self.eps,
            gather_distributed=self.gather_distributed,
            reduction=self.reduction,
        )
        return result if return_levels else result.total

    def extra_repr(self) -> str:
        """The configuration, shown in ``repr(module)``."""
        return (
            f"levels={self.levels}, weights={self.weights}, mode={self.mode!r}, "
            f"lambda_offdiag={self.lambda_offdiag}, batch_mode={self.batch_mode!r}, "
            f"reduction={self.reduction!r}"
        )

"""Masked reconstruction loss: MAE, E-MIM eq. 9 and BrainMVP in one function.

``L = Σ w (pred − target)² / Σ w`` (``reduction="mean"``) or ``Σ w (pred − target)² / B``
(``reduction="sum"``, E-MIM eq. 9's squared norm), where ``w`` selects the masked voxels (or
all, ``on="all"``) of the modalities that exist. The recipes of the three papers:
[Masked reconstruction][masked-reconstruction].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange

from mrissl._checks import check_bool, check_bool_mask, check_choice, check_tensor
from mrissl.losses._common import (
    check_features,
    check_same_shape,
    compute_dtype,
    no_autocast,
    raise_if_not_finite,
)
from mrissl.nn import patchify

__all__ = ["masked_reconstruction_loss"]


def _check_mask(mask: torch.Tensor, name: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """Return which of ``shapes`` the bool ``mask`` has, or raise naming them all."""
    check_bool_mask(mask, name)
    for kind, shape in shapes.items():
        if tuple(mask.shape) == shape:
            return kind
    want = ", ".join(f"{kind} {shape}" for kind, shape in shapes.items())
    raise ValueError(f"{name} must have one of the shapes {want}; got {tuple(mask.shape)}")


def _norm_pix(t: torch.Tensor, over_modalities: bool, av: torch.Tensor | None) -> torch.Tensor:
    """Normalise each target patch to mean 0, variance 1 (MAE: unbiased variance, eps 1e-6).

    ``t: (B, C, N, P)``. Per-modality patches are normalised over ``P``; stacked tokens over
    the available modalities and ``P`` together, as MAE normalises a whole token.
    """
    if not over_modalities:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        return (t - mean) / (var + 1e-6).sqrt()
    w = torch.ones_like(t[:, :, :1, :1]) if av is None else av[:, :, None, None].to(t.dtype)
    n = w.sum(dim=1, keepdim=True) * t.shape[-1]
    mean = (t * w).sum(dim=(1, 3), keepdim=True) / n.clamp_min(1)
    var = ((t - mean).square() * w).sum(dim=(1, 3), keepdim=True) / (n - 1).clamp_min(1)
    return (t - mean) / (var + 1e-6).sqrt()


def masked_reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    patch_size: int | Sequence[int] | None = None,
    on: Literal["masked", "all"] = "masked",
    norm_pix: bool = False,
    available: torch.Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Squared reconstruction error over the masked (or all) voxels of existing modalities.

    ``L = Σ w (pred − target)² / Σ w``, or ``Σ w (pred − target)² / B`` with
    ``reduction="sum"`` (E-MIM eq. 9), ``w`` the counted voxels.

    Args:
        pred: the reconstruction, in one of three layouts: a volume ``(B, C, D, H, W)``
            (BrainMVP, E-MIM's ``g``); per-modality patches ``(B, C, N, p0·p1·p2)``; or
            stacked tokens ``(B, N, C·p0·p1·p2)`` (MAE, MONAI's ``MaskedAutoEncoderViT``), in
            the layouts of [`patchify`][mrissl.nn.patchify].
        target: ``(B, C, D, H, W)`` the original volume (not the masked input).
        mask: which voxels count when ``on="masked"``, bool, True = masked: a token mask
            ``(B, C, N)``, a per-position mask ``(B, N)`` or a voxel mask ``(B, C, D, H, W)``.
            Ignored when ``on="all"``.
        patch_size: ``(p0, p1, p2)`` or one int; needed for token layouts, token masks and
            ``norm_pix``.
        on: ``"masked"`` (MAE, BrainMVP) or ``"all"`` (E-MIM eq. 9, the whole image).
        norm_pix: compare with targets normalised per patch (MAE): per-modality patches over
            their voxels, stacked tokens over all modalities of the token.
        available: ``(B, C)`` bool, False for a missing modality: its voxels are never counted.
        reduction: ``"mean"`` (MAE, BrainMVP: the mean over the counted voxels) or ``"sum"``
            (E-MIM eq. 9's squared norm: the sum over each image's counted voxels, averaged
            over the batch). The sum grows with the number of counted voxels: see
            [Balancing the E-MIM objective][balancing-the-e-mim-objective].

    Returns:
        The scalar loss, float32 (float64 for float64 inputs). When nothing is counted (no voxel
        masked) it is 0, still connected to ``pred``.

    Raises:
        TypeError: if ``pred``/``target`` are not floating or a mask is not bool.
        ValueError: naming the argument, for shapes that do not fit each other or
            ``patch_size``, a missing ``mask`` or ``patch_size``, ``norm_pix`` with one
            voxel per patch (a variance over one value); NaN or Inf with the value checks on
            (``mrissl.set_checks``).

    Examples:
        A perfect reconstruction of the masked voxels costs nothing, whatever the rest is;
        a missing modality (here 3 of case 1) is never a target:

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(2, 4, 32, 32, 32, generator=g)  # (B, C, D, H, W)
        >>> voxel_mask = torch.rand(2, 4, 32, 32, 32, generator=g) < 0.5
        >>> guess = torch.where(voxel_mask, x, torch.zeros_like(x))
        >>> available = torch.tensor([[True] * 4, [True, True, True, False]])
        >>> float(masked_reconstruction_loss(guess, x, voxel_mask, available=available))
        0.0
    """
    check_features(target, "target", ndim=5)
    check_features(pred, "pred", ndim=(3, 4, 5))
    check_choice(on, "on", ("masked", "all"))
    check_choice(reduction, "reduction", ("mean", "sum"))
    check_bool(norm_pix, "norm_pix")
    B, C = target.shape[:2]
    if pred.shape[0] != B:
        raise ValueError(
            f"pred and target must have the same batch size, got shapes {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if on == "masked" and mask is None:
        raise ValueError("mask is required when on='masked'; pass on='all' to count every voxel")
    if on == "all":
        mask = None
    if available is not None:
        check_tensor(available, "available", ndim=2)
        if available.dtype != torch.bool or tuple(available.shape) != (B, C):
            raise ValueError(
                f"available must be a bool tensor of shape (B, C) = {(B, C)}, got "
                f"{available.dtype} {tuple(available.shape)}"
            )

    voxel_shape = tuple(target.shape)
    token_mask = mask is not None and mask.ndim in (2, 3)
    in_patches = pred.ndim < 5 or norm_pix or token_mask
    dtype = compute_dtype(pred, target)
    with no_autocast(pred):
        if in_patches:
            if patch_size is None:
                raise ValueError(
                    "patch_size is required for token-layout pred, token masks and norm_pix, "
                    "got None"
                )
            t = patchify(target, patch_size)  # (B, C, N, P)
            N, P = t.shape[2], t.shape[3]
            layouts = {"stacked": (B, N, C * P), "per_modality": (B, C, N, P)}
            if pred.ndim == 5:
                check_same_shape(pred, target, "pred", "target")
                p = patchify(pred, patch_size)
            elif tuple(pred.shape) == layouts["stacked"]:
                p = rearrange(pred, "b n (c p) -> b c n p", c=C)
            elif tuple(pred.shape) == layouts["per_modality"]:
                p = pred
            else:
                raise ValueError(
                    f"pred must be a volume {voxel_shape}, stacked tokens {layouts['stacked']} "
                    f"or per-modality patches {layouts['per_modality']} for target "
                    f"{voxel_shape} and patch_size {patch_size!r}; got {tuple(pred.shape)}"
                )
            w: torch.Tensor | None = None
            if mask is not None:
                kind = _check_mask(
                    mask,
                    "mask",
                    {"token": (B, C, N), "position": (B, N), "voxel": voxel_shape},
                )
                if kind == "token":
                    w = mask[..., None]
                elif kind == "position":
                    w = mask[:, None, :, None]
                else:
                    w = patchify(mask, patch_size)
            if available is not None:
                av = available[:, :, None, None]
                w = av if w is None else w & av
            t = t.to(dtype)
            if norm_pix:
                values = P * (C if pred.ndim == 3 else 1)  # values normalised together
                if values < 2:
                    raise ValueError(
                        f"norm_pix=True normalises each target patch by its variance, which is "
                        f"undefined over {values} value (patch_size {patch_size!r} gives {P} "
                        "voxel per patch); use a larger patch_size or norm_pix=False"
                    )
                t = _norm_pix(t, over_modalities=pred.ndim == 3, av=available)
            diff2 = (p.to(dtype) - t).square()
        else:
            check_same_shape(pred, target, "pred", "target")
            w = None
            if mask is not None:
                _check_mask(mask, "mask", {"voxel": voxel_shape})
                w = mask
            if available is not None:
                av = available[:, :, None, None, None]
                w = av if w is None else w & av
            diff2 = (pred.to(dtype) - target.to(dtype)).square()

        if reduction == "sum":  # E-MIM eq. 9: ||x − g(·)||² of each image, batch mean
            loss = (diff2 if w is None else diff2 * w).sum() / B
        elif w is None:
            loss = diff2.mean()
        else:
            count = w.expand(diff2.shape).sum()
            # nothing counted: the weighted sum is 0, and so is the loss (no 0/0)
            loss = (diff2 * w).sum() / count.clamp_min(1).to(dtype)
    return raise_if_not_finite(loss, pred=pred, target=target)

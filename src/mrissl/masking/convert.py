"""Convert masks: token masks to voxel masks and back, and to an MAE encoder's keep indices.

Token ``n`` of a ``(gd, gh, gw)`` grid of ``(p0, p1, p2)`` patches is patch
``(n // (gh·gw), (n // gw) % gh, n % gw)`` (raster order, depth slowest; DESIGN.md), so
the conversions are the einops patterns ``b c (gd gh gw) <-> b c (gd p0) (gh p1) (gw p2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from einops import reduce, repeat

from mrissl._checks import (
    Triple,
    check_bool_mask,
    check_choice,
    check_number,
    to_triple,
)
from mrissl._settings import values_checked
from mrissl.nn import grid_size

__all__ = ["KeepIndices", "keep_indices", "mask_to_voxels", "voxels_to_mask"]


def _token_mask_5d(
    mask: torch.Tensor, grid: Triple, batch: int | None = None, chans: int | None = None
) -> torch.Tensor:
    """``(B, C, N)`` or ``(B, N)`` -> ``(B, C or 1, gd, gh, gw)``, checking the sizes."""
    check_bool_mask(mask, "mask", ndim=(2, 3))
    m = mask if mask.ndim == 3 else mask[:, None]
    N = grid[0] * grid[1] * grid[2]
    if m.shape[2] != N:
        raise ValueError(
            f"mask has {m.shape[2]} tokens (shape {tuple(mask.shape)}) but the token grid "
            f"{grid} has {N}"
        )
    if batch is not None and m.shape[0] != batch:
        raise ValueError(
            f"mask must have the batch size of the volume ({batch}), got shape {tuple(mask.shape)}"
        )
    if chans is not None and m.shape[1] not in (1, chans):
        raise ValueError(
            f"mask must have one row per modality ({chans}) or be per-position (B, N), got "
            f"shape {tuple(mask.shape)}"
        )
    return m.reshape(m.shape[0], m.shape[1], *grid)


def mask_to_voxels(
    mask: torch.Tensor, patch_size: int | Sequence[int], img_size: int | Sequence[int]
) -> torch.Tensor:
    """Expand a token mask to a voxel mask: every voxel of a masked patch is masked.

    ``voxels[b, c, z, y, x] = mask[b, c, (z // p0)·gh·gw + (y // p1)·gw + x // p2]``. The
    inverse is [`voxels_to_mask`][mrissl.masking.voxels_to_mask];
    [`apply_mask`][mrissl.masking.apply_mask] does not need this (it broadcasts the token
    mask).

    Args:
        mask: ``(B, C, N)`` bool, True = masked, or a per-position ``(B, N)`` mask.
        patch_size: ``(p0, p1, p2)`` or one int.
        img_size: ``(D, H, W)`` or one int; the patch size must divide it.

    Returns:
        ``(B, C, D, H, W)`` bool (``C = 1`` for a ``(B, N)`` mask).

    Raises:
        ValueError: if the mask does not have the grid's number of tokens.
        TypeError: for a mask that is not bool.

    Examples:
        >>> mask = torch.tensor([[[True, False]]])  # (1, 1, 2): a grid of 1 x 1 x 2
        >>> mask_to_voxels(mask, 2, (2, 2, 4))[0, 0, 0]
        tensor([[ True,  True, False, False],
                [ True,  True, False, False]])
    """
    p0, p1, p2 = to_triple(patch_size, "patch_size")
    m5 = _token_mask_5d(mask, grid_size(img_size, (p0, p1, p2)))
    return repeat(m5, "b c gd gh gw -> b c (gd pd) (gh ph) (gw pw)", pd=p0, ph=p1, pw=p2)


def voxels_to_mask(
    voxel_mask: torch.Tensor,
    patch_size: int | Sequence[int],
    *,
    rule: Literal["any", "all", "majority"] = "any",
) -> torch.Tensor:
    """Reduce a voxel mask to a token mask.

    ``mask[b, c, n]`` is the ``rule`` of the ``p0·p1·p2`` voxels of patch ``n``.

    Args:
        voxel_mask: ``(B, C, D, H, W)`` bool, True = masked.
        patch_size: ``(p0, p1, p2)`` or one int; it must divide ``(D, H, W)``.
        rule: a token is masked if ``"any"`` of its voxels is, if ``"all"`` are, or if more
            than half are (``"majority"``).

    Returns:
        ``(B, C, N)`` bool, True = masked. For a mask made by
        [`mask_to_voxels`][mrissl.masking.mask_to_voxels] every rule gives the token mask back.

    Raises:
        ValueError: for a bad rule or a patch size that does not divide the volume.
        TypeError: for a voxel mask that is not bool.

    Examples:
        >>> vox = torch.zeros(1, 1, 2, 2, 4, dtype=torch.bool)
        >>> vox[..., 0] = True  # one voxel column of the first 2³ patch
        >>> voxels_to_mask(vox, 2), voxels_to_mask(vox, 2, rule="all")
        (tensor([[[ True, False]]]), tensor([[[False, False]]]))
    """
    check_bool_mask(voxel_mask, "voxel_mask", ndim=5)
    check_choice(rule, "rule", ("any", "all", "majority"))
    p0, p1, p2 = to_triple(patch_size, "patch_size")
    grid_size(tuple(voxel_mask.shape[2:]), (p0, p1, p2))  # the patch size divides the volume
    pattern = "b c (gd pd) (gh ph) (gw pw) -> b c (gd gh gw)"
    if rule == "majority":
        count = reduce(voxel_mask.to(torch.int32), pattern, "sum", pd=p0, ph=p1, pw=p2)
        return count * 2 > p0 * p1 * p2
    return reduce(voxel_mask, pattern, rule, pd=p0, ph=p1, pw=p2)


class KeepIndices(NamedTuple):
    """Keep, restore and padding indices from [`keep_indices`][mrissl.masking.keep_indices].

    Attributes:
        keep: ``(B, K)`` int64, the kept (unmasked) token positions of each sample in
            increasing order; with padding, followed by masked positions as filler.
        restore: ``(B, L)`` int64, the inverse permutation: for a sequence laid out as
            ``[kept tokens, masked tokens]`` (sorted order), ``gather(seq, 1, restore)`` puts
            every token back at its position (MAE's ``ids_restore``).
        padding: ``(B, K)`` bool, True where ``keep`` holds filler rather than a kept token
            (all False when every sample keeps the same number of tokens).
    """

    keep: torch.Tensor
    restore: torch.Tensor
    padding: torch.Tensor


def keep_indices(
    mask: torch.Tensor, *, pad: bool = False, num_kept: int | None = None
) -> KeepIndices:
    """Keep and restore indices for an MAE-style encoder, derived from a token mask.

    With the token order of ``PatchEmbed3d(layout="per_modality")``, token ``c·N + n`` is
    ``mask.flatten(1)[:, c·N + n]``; ``keep`` lists the unmasked tokens in order and
    ``restore = argsort(argsort(mask.flatten(1), stable))``. The indices come from the mask
    (no second random draw) and go to [`gather_tokens`][mrissl.nn.gather_tokens] and
    [`scatter_tokens`][mrissl.nn.scatter_tokens]. Without ``num_kept`` the kept count ``K``
    is read on the host (a synchronisation on CUDA); padding and the step path are explained
    in [the masking guide][token-dropping-encoders].

    Args:
        mask: ``(B, C, N)`` or ``(B, N)`` bool, True = masked.
        pad: allow different kept counts per sample, with padding.
        num_kept: ``K``, the length of ``keep``, known in advance (no host read); ``None``
            reads it from the mask.

    Returns:
        [`KeepIndices`][mrissl.masking.KeepIndices] ``(keep, restore, padding)``:
        ``(B, K)``, ``(B, C·N)`` and ``(B, K)``.

    Raises:
        ValueError: if the samples keep different numbers of tokens and ``pad`` is False, for
            a ``num_kept`` outside ``[0, C·N]``, and (value checks on) if a sample keeps more
            than ``num_kept`` tokens, or fewer without ``pad``.
        TypeError: for a mask that is not bool or a ``num_kept`` that is not an int.

    Examples:
        >>> mask = torch.tensor([[[False, True], [True, False]]])  # (B=1, C=2, N=2)
        >>> keep, restore, padding = keep_indices(mask)
        >>> keep, restore  # kept tokens 0 and 3 of the sequence c·N + n
        (tensor([[0, 3]]), tensor([[0, 2, 3, 1]]))
        >>> keep_indices(mask, num_kept=2).keep  # the same, without reading the mask
        tensor([[0, 3]])
        >>> ragged = torch.tensor([[False, True, True], [False, False, True]])  # (B, N)
        >>> keep_indices(ragged, pad=True)
        KeepIndices(keep=tensor([[0, 1], [0, 1]]), restore=tensor([[0, 1, 2], [0, 1, 2]]), padding=tensor([[False,  True], [False, False]]))
    """  # noqa: E501
    check_bool_mask(mask, "mask", ndim=(2, 3))
    flat = mask.flatten(1)
    L = flat.shape[1]
    if num_kept is not None:  # at most L = C·N of the mask
        num_kept = check_number(num_kept, "num_kept", low=0, high=L, integer=True)
    if flat.shape[0] == 0:  # an empty batch keeps nothing (and has no min or max count)
        K0 = 0 if num_kept is None else num_kept
        index = torch.zeros((0, K0), dtype=torch.long, device=mask.device)
        restore0 = torch.zeros((0, L), dtype=torch.long, device=mask.device)
        padding0 = torch.zeros((0, K0), dtype=torch.bool, device=mask.device)
        return KeepIndices(index, restore0, padding0)
    order = torch.argsort(flat.to(torch.uint8), dim=1, stable=True)
    restore = torch.argsort(order, dim=1)
    kept = (~flat).sum(dim=1)
    if num_kept is None or values_checked():
        lo, hi = int(kept.min()), int(kept.max())
        if num_kept is not None and (hi > num_kept or (lo < num_kept and not pad)):
            raise ValueError(
                f"num_kept={num_kept} but the samples keep from {lo} to {hi} tokens "
                f"(counts {kept.tolist()})"
            )
        if lo != hi and not pad:
            raise ValueError(
                f"mask keeps a different number of tokens per sample (from {lo} to {hi}; "
                f"counts {kept.tolist()}); pass pad=True for padded indices with a padding "
                "mask, or use a generator with an exact count"
            )
    K = hi if num_kept is None else num_kept
    keep = order[:, :K]
    padding = torch.arange(K, device=mask.device) >= kept[:, None]
    return KeepIndices(keep, restore, padding)

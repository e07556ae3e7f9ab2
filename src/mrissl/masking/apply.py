"""Apply token masks to volumes: voxel masks, keep/restore indices, fills, cross-modal fill.

The masks are small (``B·C·N`` booleans); the cost of masking is writing the masked volume.
Every function here reads the volume once and writes the result once where it can: a
``(B, C, D, H, W)`` volume is viewed as ``(B, C, gd, p0, gh, p1, W)`` and the token mask is
spread along one image row per patch, ``(B, C, gd, 1, gh, 1, W)`` (``p0·p1`` times smaller than
a voxel mask), so one broadcast elementwise kernel covers every voxel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch

from mrissl._checks import (
    Triple,
    check_available,
    check_choice,
    check_floating,
    check_generator,
    check_number,
    check_tensor,
    to_triple,
)
from mrissl._settings import values_checked
from mrissl.masking._base import _rand
from mrissl.nn import grid_size

__all__ = [
    "CrossModalFill",
    "KeepIndices",
    "apply_mask",
    "cross_modal_fill",
    "keep_indices",
    "mask_to_voxels",
    "voxels_to_mask",
]

Fill = float | Literal["mean", "noise"] | torch.Tensor


def _check_bool(mask: torch.Tensor, name: str) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = masked), got dtype {mask.dtype}")


def _token_mask_5d(
    mask: torch.Tensor, grid: Triple, batch: int | None = None, chans: int | None = None
) -> torch.Tensor:
    """``(B, C, N)`` or ``(B, N)`` -> ``(B, C or 1, gd, gh, gw)``, checking the sizes."""
    check_tensor(mask, "mask", ndim=(2, 3))
    _check_bool(mask, "mask")
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


def _row_mask(m5: torch.Tensor, p2: int) -> torch.Tensor:
    """``(B, C, gd, gh, gw)`` -> ``(B, C, gd, 1, gh, 1, W)``: the mask along each image row.

    Broadcast against the volume viewed by ``_rows`` it covers every voxel. It is ``p0·p1``
    times smaller than a voxel mask, and the elementwise kernels run along whole rows of
    ``W`` voxels (a much faster inner loop than the ``p2`` voxels of one patch row).
    """
    B, C, gd, gh, gw = m5.shape
    rows = m5[..., None].expand(B, C, gd, gh, gw, p2)
    return rows.reshape(B, C, gd, 1, gh, 1, gw * p2)


def _rows(volume: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> the view ``(B, C, gd, p0, gh, p1, W)`` that ``_row_mask`` fits."""
    B, C, D, H, W = volume.shape
    return volume.reshape(B, C, D // p0, p0, H // p1, p1, W)


def mask_to_voxels(
    mask: torch.Tensor, patch_size: int | Sequence[int], img_size: int | Sequence[int]
) -> torch.Tensor:
    """Expand a token mask to a voxel mask: every voxel of a masked patch is masked.

    The inverse direction is [`voxels_to_mask`][mrissl.masking.voxels_to_mask].
    [`apply_mask`][mrissl.masking.apply_mask] does not need this: it broadcasts the token mask.

    Args:
        mask: ``(B, C, N)`` bool, True = masked, or a per-position ``(B, N)`` mask.
        patch_size: ``(p0, p1, p2)`` or one int.
        img_size: ``(D, H, W)`` or one int; the patch size must divide it.

    Returns:
        ``(B, C, D, H, W)`` bool (``C = 1`` for a ``(B, N)`` mask).

    Raises:
        ValueError: if the mask does not have the grid's number of tokens.

    Examples:
        >>> mask = torch.tensor([[[True, False]]])  # (1, 1, 2): a grid of 1 x 1 x 2
        >>> mask_to_voxels(mask, 2, (2, 2, 4))[0, 0, 0]
        tensor([[ True,  True, False, False],
                [ True,  True, False, False]])
    """
    p0, p1, p2 = to_triple(patch_size, "patch_size")
    gd, gh, gw = grid_size(img_size, (p0, p1, p2))
    m = _token_mask_5d(mask, (gd, gh, gw))
    B, C = m.shape[:2]
    full = m.view(B, C, gd, 1, gh, 1, gw, 1).expand(B, C, gd, p0, gh, p1, gw, p2)
    return full.reshape(B, C, gd * p0, gh * p1, gw * p2)


def voxels_to_mask(
    voxel_mask: torch.Tensor,
    patch_size: int | Sequence[int],
    *,
    rule: Literal["any", "all", "majority"] = "any",
) -> torch.Tensor:
    """Reduce a voxel mask to a token mask.

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

    Examples:
        >>> vox = torch.zeros(1, 1, 2, 2, 4, dtype=torch.bool)
        >>> vox[..., 0] = True  # one voxel column of the first 2³ patch
        >>> voxels_to_mask(vox, 2), voxels_to_mask(vox, 2, rule="all")
        (tensor([[[ True, False]]]), tensor([[[False, False]]]))
    """
    check_tensor(voxel_mask, "voxel_mask", ndim=5)
    _check_bool(voxel_mask, "voxel_mask")
    check_choice(rule, "rule", ("any", "all", "majority"))
    p0, p1, p2 = to_triple(patch_size, "patch_size")
    gd, gh, gw = grid_size(tuple(voxel_mask.shape[2:]), (p0, p1, p2))
    B, C = voxel_mask.shape[:2]
    v = voxel_mask.reshape(B, C, gd, p0, gh, p1, gw, p2)
    if rule == "any":
        out = v.any(dim=7).any(dim=5).any(dim=3)
    elif rule == "all":
        out = v.all(dim=7).all(dim=5).all(dim=3)
    else:
        out = v.sum(dim=(3, 5, 7)) * 2 > p0 * p1 * p2
    return out.reshape(B, C, gd * gh * gw)


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


class CrossModalFill(NamedTuple):
    """The result of [`cross_modal_fill`][mrissl.masking.cross_modal_fill].

    Attributes:
        volume: ``(B, C, D, H, W)`` the filled volume (``out`` when given).
        source: ``(B, C)`` int64, the source modality of each case and modality (``-1`` =
            none, ``fallback`` used).
    """

    volume: torch.Tensor
    source: torch.Tensor


def keep_indices(
    mask: torch.Tensor, *, pad: bool = False, num_kept: int | None = None
) -> KeepIndices:
    """Keep and restore indices for an MAE-style encoder, derived from a token mask.

    The token order is that of [`PatchEmbed3d`][mrissl.nn.PatchEmbed3d] with
    ``layout="per_modality"``: modality-major, token ``c·N + n`` is modality ``c`` at position
    ``n``, i.e. ``mask.flatten(1)``. A ``(B, N)`` mask indexes a channel-stacked sequence.
    The indices come from the mask; there is no second random draw.

    ``gather_tokens(tokens, keep)`` gives the encoder input, and
    ``scatter_tokens(latent, keep, L, fill=mask_token)`` puts the encoder output back for
    the decoder (see [`gather_tokens`][mrissl.nn.gather_tokens]).

    A batch needs the same number ``K`` of kept tokens in every sample to stay rectangular.
    Every generator of this package gives that when all modalities are present, except
    ``ModalMask(probability=...)`` (alone or inside ``HybridMaskPattern``), whose count
    varies. With missing modalities, or masks from elsewhere, pass ``pad=True``: ``K`` is
    the largest count, the shorter samples are padded with some of their masked positions,
    and ``padding`` marks those entries. Use ``~padding`` as the encoder's attention mask
    (key padding mask), and before ``scatter_tokens`` replace the padded outputs by the
    mask token (``torch.where(padding[..., None], mask_token, latent)``), since they sit at
    masked positions.

    The shape of ``keep`` depends on the mask's values, so finding ``K`` reads the kept counts
    on the host: a synchronisation on CUDA, and a graph break under ``torch.compile``. On the
    training-step path pass ``num_kept=K`` instead: nothing is read, the shapes are fixed.
    For a generator with an exact count ``K = round(C·N·(1 - gen.expected_mask_ratio(C, N)))``
    (for ``HybridMaskPattern()`` with ``C = 4``, ``N = 216``: 162). The counts are then
    checked against ``K`` only when value checks are on (``mrissl.checks("values")``):
    without them a sample that keeps fewer than ``K`` is padded (marked in ``padding``) and
    one that keeps more loses its last kept tokens.

    Args:
        mask: ``(B, C, N)`` or ``(B, N)`` bool, True = masked.
        pad: allow different kept counts per sample, with padding.
        num_kept: ``K``, the length of ``keep``, known in advance (no host read); ``None``
            reads it from the mask.

    Returns:
        [`KeepIndices`][mrissl.masking.KeepIndices] ``(keep, restore, padding)``.

    Raises:
        ValueError: if the samples keep different numbers of tokens and ``pad`` is False, for
            a ``num_kept`` outside ``[0, C·N]``, and (value checks on) if a sample keeps more
            than ``num_kept`` tokens, or fewer without ``pad``.
        TypeError: for a ``num_kept`` that is not an int.

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
    check_tensor(mask, "mask", ndim=(2, 3))
    _check_bool(mask, "mask")
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


def _visible_stats(
    v8: torch.Tensor, m5: torch.Tensor, with_std: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over the unmasked voxels of each case and modality, in float32.

    ``v8``: ``(B, C, gd, p0, gh, p1, gw, p2)``; ``m5``: ``(B, C or 1, gd, gh, gw)``.
    Returns ``(B, C)`` tensors; 0 where a modality has no unmasked voxel (and for the std
    when ``with_std`` is False).
    """
    B, C = v8.shape[:2]
    P = v8.shape[3] * v8.shape[5] * v8.shape[7]
    visible = (~m5).expand(B, C, *m5.shape[2:]).float()
    sums = v8.sum(dim=(3, 5, 7), dtype=torch.float32)  # per patch
    count = visible.sum(dim=(2, 3, 4)) * P
    denom = count.clamp(min=1)
    mean = (sums * visible).sum(dim=(2, 3, 4)) / denom
    if not with_std:
        return mean, torch.zeros_like(mean)
    sq = torch.linalg.vector_norm(v8, ord=2, dim=(3, 5, 7), dtype=torch.float32).square()
    var = (sq * visible).sum(dim=(2, 3, 4)) / denom - mean.square()
    return mean, var.clamp(min=0).sqrt()


def apply_mask(
    volume: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int | Sequence[int] | None = None,
    fill: Fill = 0.0,
    *,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace the masked patches (or voxels) of a volume by a fill; the input is not changed.

    This gives the masked view ``x_m`` that the encoder sees (E-MIM eq. 9); keep ``volume``
    itself as the reconstruction target (the E-MIM authors' code zeroed its target in place).

    Fills:

    * a number (default ``0.0``): that constant;
    * ``"mean"``: the mean of the **unmasked** voxels of the same case and modality (0 for a
      modality with none), so no masked intensity leaks into the input;
    * ``"noise"``: Gaussian noise with that mean and the matching standard deviation,
      drawn from ``generator``;
    * a tensor broadcastable to ``(B, C, D, H, W)``, for example learnable modality templates
      ``(1, C, D, H, W)`` (BrainMVP's data distillation); gradients flow to it from every
      masked voxel, and to ``volume`` from every kept one.

    Statistics are computed in float32 whatever the volume's dtype; the result has the
    volume's dtype (a tensor fill is cast to it).

    On the CPU most of the cost of masking a large batch is not the masking but the first
    write to a freshly allocated output (the kernel zeroes every new page). In a training loop,
    pass ``out=`` a buffer of the volume's shape that lives across steps: the masked view is
    written into it, and the step costs one read of the volume and one write of the buffer
    (see ``benchmarks/bench_masking.py``). ``out`` does not support autograd, like ``out=``
    in PyTorch: it is refused when ``volume`` or a tensor ``fill`` requires a gradient.

    Args:
        volume: ``(B, C, D, H, W)`` floating-point volumes.
        mask: ``(B, C, N)`` bool token mask (True = masked), a per-position ``(B, N)`` mask,
            or a ``(B, C, D, H, W)`` / ``(B, 1, D, H, W)`` bool voxel mask.
        patch_size: the token size for a token mask (``(p0, p1, p2)`` or one int); not used
            with a voxel mask.
        fill: what replaces the masked voxels, see above.
        generator: random source for ``fill="noise"``, on the volume's device type.
        out: optional contiguous tensor of the volume's shape, dtype and device that receives
            the result; it must not share memory with ``volume`` (the reconstruction target).

    Returns:
        ``(B, C, D, H, W)``, the masked volume (``out`` itself when given).

    Raises:
        ValueError: for mismatched shapes, a missing ``patch_size``, an unknown fill, or an
            ``out`` of the wrong shape, dtype or device, overlapping ``volume``, or used with
            tensors that require gradients.
        TypeError: for a non-bool mask, a non-floating volume or an ``out`` that is not a
            tensor.

    Examples:
        >>> x = torch.arange(1.0, 9.0).view(1, 1, 2, 2, 2)
        >>> mask = torch.tensor([[[True, False]]])  # two 2 x 2 x 1 patches; the first masked
        >>> apply_mask(x, mask, (2, 2, 1))[0, 0, 0]
        tensor([[0., 2.],
                [0., 4.]])
        >>> apply_mask(x, mask, (2, 2, 1), fill="mean")[0, 0, 0]  # mean of 2, 4, 6, 8
        tensor([[5., 2.],
                [5., 4.]])
        >>> template = torch.zeros(1, 1, 2, 2, 2, requires_grad=True)
        >>> apply_mask(x, mask, (2, 2, 1), fill=template).sum().backward()
        >>> int(template.grad.sum())  # one per masked voxel
        4
        >>> buffer = torch.empty_like(x)  # reused across training steps
        >>> apply_mask(x, mask, (2, 2, 1), out=buffer) is buffer
        True
    """
    check_tensor(volume, "volume", ndim=5)
    check_floating(volume, "volume")
    B, C, D, H, W = volume.shape
    check_tensor(mask, "mask", ndim=(2, 3, 5))
    _check_bool(mask, "mask")
    if isinstance(fill, str) and fill not in ("mean", "noise"):
        raise ValueError(f"fill must be a number, 'mean', 'noise' or a tensor, got {fill!r}")
    if mask.ndim == 5:
        if mask.shape[0] != B or mask.shape[1] not in (1, C) or mask.shape[2:] != (D, H, W):
            raise ValueError(
                f"a voxel mask must have shape (B, C or 1, D, H, W) = ({B}, {C}, {D}, {H}, "
                f"{W}), got {tuple(mask.shape)}"
            )
        vol = volume
        m = mask.to(volume.device)
        # for the statistics of fill="mean"/"noise", every voxel is its own patch
        stats_v = volume.reshape(B, C, D, 1, H, 1, W, 1)
        stats_m = m.reshape(B, m.shape[1], D, H, W)
    else:
        if patch_size is None:
            raise ValueError(
                "apply_mask needs patch_size for a token mask of shape "
                f"{tuple(mask.shape)}; got patch_size=None"
            )
        p0, p1, p2 = to_triple(patch_size, "patch_size")
        gd, gh, gw = grid_size((D, H, W), (p0, p1, p2))
        m5 = _token_mask_5d(mask.to(volume.device), (gd, gh, gw), B, C)
        vol, m = _rows(volume, p0, p1), _row_mask(m5, p2)
        stats_v, stats_m = volume.reshape(B, C, gd, p0, gh, p1, gw, p2), m5

    if out is not None:
        _check_out(out, volume, "apply_mask", isinstance(fill, torch.Tensor) and fill.requires_grad)

    value: torch.Tensor | float
    if isinstance(fill, torch.Tensor):
        try:
            f = torch.broadcast_to(fill.to(dtype=volume.dtype, device=volume.device), volume.shape)
        except RuntimeError as err:
            raise ValueError(
                f"fill must broadcast to the volume's shape {tuple(volume.shape)}, got "
                f"{tuple(fill.shape)}"
            ) from err
        value = f.reshape(vol.shape)
    elif isinstance(fill, str):
        mean, std = _visible_stats(stats_v, stats_m, with_std=fill == "noise")
        stat_shape = (B, C) + (1,) * (vol.ndim - 2)
        if fill == "mean":
            value = mean.to(volume.dtype).view(stat_shape)
        else:
            check_generator(generator, volume.device)
            noise = torch.randn(vol.shape, generator=generator, device=volume.device)
            value = (noise * std.view(stat_shape) + mean.view(stat_shape)).to(volume.dtype)
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
        value = float(fill)
        bits = _BIT_VIEWS.get(volume.dtype)
        needs_grad = torch.is_grad_enabled() and volume.requires_grad
        positive_zero = value == 0.0 and math.copysign(1.0, value) > 0
        if positive_zero and bits is not None and mask.ndim != 5 and not needs_grad:
            # +0.0 is the all-zero bit pattern: AND each element with a keep mask of all-one
            # or all-zero bits (one per patch row, small). A vectorised integer kernel, exact
            # for every value (NaN and inf included), and the fastest masked copy on CPU.
            keep = (~m).to(bits).neg_()
            if out is None:
                res = torch.bitwise_and(vol.view(bits), keep)
                return res.view(volume.dtype).reshape(B, C, D, H, W)
            torch.bitwise_and(vol.view(bits), keep, out=out.view(vol.shape).view(bits))
            return out
        if out is None:
            # masked_fill, not torch.where: same result, less work per element on CPU
            return vol.masked_fill(m, value).reshape(B, C, D, H, W)
        # torch.full, not torch.tensor: no host-to-device copy (a synchronisation on CUDA)
        value = torch.full((), value, dtype=volume.dtype, device=volume.device)
    else:
        raise TypeError(
            f"fill must be a number, 'mean', 'noise' or a tensor, got {type(fill).__name__}"
        )
    if out is None:
        return torch.where(m, value, vol).reshape(B, C, D, H, W)
    torch.where(m, value, vol, out=out.view(vol.shape))
    return out


# integer dtypes of the same width, for the bitwise zero fill of apply_mask
_BIT_VIEWS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _check_out(out: Any, volume: torch.Tensor, caller: str, fill_grad: bool = False) -> None:
    """Validate an ``out`` buffer of ``apply_mask`` or ``cross_modal_fill``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != volume.shape or out.dtype != volume.dtype or out.device != volume.device:
        raise ValueError(
            "out must match the volume's shape, dtype and device "
            f"({tuple(volume.shape)}, {volume.dtype}, {volume.device}), got "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if out.untyped_storage().data_ptr() == volume.untyped_storage().data_ptr():
        raise ValueError(
            f"out shares memory with volume; {caller} never overwrites its input (keep the "
            "unmasked volume as the reconstruction target), so give a separate buffer"
        )
    if torch.is_grad_enabled() and (volume.requires_grad or out.requires_grad or fill_grad):
        what = "volume, out or the fill tensor" if caller == "apply_mask" else "volume or out"
        raise ValueError(
            f"out= does not support autograd: {what} requires a gradient; call {caller} "
            "without out= (or under torch.no_grad())"
        )


def _choose_sources(
    available: torch.Tensor, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``(B, C)`` int64: for each present modality, another present one, uniformly; else -1."""
    B, C = available.shape
    eye = torch.eye(C, dtype=torch.bool, device=device)
    valid = available[:, None, :] & available[:, :, None] & ~eye  # [b, target, source]
    scores = _rand((B, C, C), generator, device).masked_fill(~valid, -1.0)
    return torch.where(valid.any(dim=2), scores.argmax(dim=2), -1)


def cross_modal_fill(
    volume: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int | Sequence[int] | None = None,
    *,
    available: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    fallback: float = 0.0,
    out: torch.Tensor | None = None,
) -> CrossModalFill:
    """BrainMVP cross-modal fill: masked voxels take the values of another modality.

    For each case ``b`` and modality ``c`` a source modality ``s ≠ c`` is drawn uniformly
    among the other **present** modalities of the same case, and the masked voxels of
    ``(b, c)`` are replaced by the same voxels of ``(b, s)`` (BrainMVP Algorithm 1, "fill with
    corresponding data from X_in"). The source's values are those of the unmasked input
    ``volume``. A missing modality is never a source. Where no source exists (the case has
    one present modality, or ``c`` itself is missing) the masked voxels take ``fallback``
    and the source is reported as ``-1``.

    With a token mask (the blocks of [`BlockMask`][mrissl.masking.BlockMask]) the mask is
    never expanded to voxels: the sources are copied channel by channel, and the kept blocks
    are put back in place with the block mask broadcast over each block.

    Args:
        volume: ``(B, C, D, H, W)`` floating-point volumes.
        mask: ``(B, C, D, H, W)`` bool voxel mask or ``(B, C, N)`` bool token mask,
            True = masked.
        patch_size: the token (block) size for a token mask; not used with a voxel mask.
        available: ``(B, C)`` bool, True = modality present; ``None`` means all present.
        generator: random source for the choice of sources, on the volume's device type.
        fallback: the value of masked voxels that have no source.
        out: optional contiguous tensor of the volume's shape, dtype and device that receives
            the filled volume, reused across training steps (see ``out`` of
            [`apply_mask`][mrissl.masking.apply_mask]: on the CPU it saves the page zeroing of
            a new allocation; no autograd; it must not share memory with ``volume``).

    Returns:
        ``CrossModalFill(volume, source)``: the ``(B, C, D, H, W)`` filled volume (``out``
        when given) and the ``(B, C)`` int64 source modality of each case and modality
        (``-1`` = none, ``fallback`` used); it unpacks as ``filled, source = ...``.

    Raises:
        ValueError: for mismatched shapes, a bad ``available`` or a bad ``out``.

    Examples:
        >>> x = torch.stack([torch.full((2, 2, 2), float(c)) for c in range(3)])[None]
        >>> mask = torch.ones(1, 3, 1, dtype=torch.bool)  # one 2³ block, masked everywhere
        >>> g = torch.Generator().manual_seed(0)
        >>> filled, source = cross_modal_fill(x, mask, 2, generator=g)
        >>> source
        tensor([[1, 2, 1]])
        >>> filled[0, :, 0, 0, 0]  # each modality now holds its source's values
        tensor([1., 2., 1.])
        >>> cross_modal_fill(x, mask, 2, available=torch.tensor([[True, False, True]]),
        ...                  generator=g).source  # modality 1 is missing: never a source
        tensor([[ 2, -1,  0]])
    """
    check_tensor(volume, "volume", ndim=5)
    check_floating(volume, "volume")
    check_tensor(mask, "mask", ndim=(3, 5))
    _check_bool(mask, "mask")
    B, C, D, H, W = volume.shape
    device = volume.device
    check_generator(generator, device)
    avail = check_available(available, B, C, device)
    if avail is None:
        avail = torch.ones(B, C, dtype=torch.bool, device=device)
    if out is not None:
        _check_out(out, volume, "cross_modal_fill")
    source = _choose_sources(avail, generator, device)
    volume = volume.contiguous()

    if mask.ndim == 5:
        if tuple(mask.shape) != (B, C, D, H, W):
            raise ValueError(
                f"a voxel mask must have the volume's shape {(B, C, D, H, W)}, got "
                f"{tuple(mask.shape)}"
            )
        src = _source_volume(volume, source, fallback, out)
        if _needs_grad(volume):  # where(out=...) has no autograd
            return CrossModalFill(torch.where(mask.to(device), src, volume), source)
        return CrossModalFill(torch.where(mask.to(device), src, volume, out=src), source)

    if patch_size is None:
        raise ValueError(
            "cross_modal_fill needs patch_size for a token mask of shape "
            f"{tuple(mask.shape)}; got patch_size=None"
        )
    if mask.shape[:2] != (B, C):
        raise ValueError(
            f"a token mask must have shape (B, C, N) with (B, C) = ({B}, {C}), got "
            f"{tuple(mask.shape)}"
        )
    p = to_triple(patch_size, "patch_size")
    grid = grid_size((D, H, W), p)
    m5 = _token_mask_5d(mask.to(device), grid, B, C)

    filled = _source_volume(volume, source, fallback, out)  # one copy, channel by channel
    if _needs_grad(volume):  # the in-place put-back below has no autograd
        kept = _row_mask(~m5, p[2])
        rows_grad = torch.where(kept, _rows(volume, p[0], p[1]), _rows(filled, p[0], p[1]))
        return CrossModalFill(rows_grad.reshape(volume.shape), source)
    # put the kept patches back, in place
    rows = _rows(filled, p[0], p[1])
    torch.where(_row_mask(~m5, p[2]), _rows(volume, p[0], p[1]), rows, out=rows)
    return CrossModalFill(filled, source)


def _needs_grad(volume: torch.Tensor) -> bool:
    """Whether autograd records operations on ``volume`` (then no ``out=`` kernels)."""
    return torch.is_grad_enabled() and volume.requires_grad


def _source_volume(
    volume: torch.Tensor, source: torch.Tensor, fallback: float, out: torch.Tensor | None
) -> torch.Tensor:
    """``(B, C, D, H, W)``: channel ``source[b, c]`` of case ``b`` (``fallback`` where -1).

    Written into ``out`` when given (contiguous, the volume's shape), else a new tensor.
    """
    B, C = source.shape
    rows = (torch.arange(B, device=volume.device)[:, None] * C + source.clamp(min=0)).flatten()
    voxels = math.prod(volume.shape[2:])  # not -1: B may be 0
    flat = volume.reshape(B * C, voxels)
    if out is None:
        res = flat.index_select(0, rows)
    else:
        res = torch.index_select(flat, 0, rows, out=out.view(B * C, voxels))
    # fixed shapes: a masked fill over every row, not an index of the rows without a source
    res.masked_fill_((source.flatten() < 0)[:, None], fallback)
    return res.view(volume.shape) if out is None else out

"""Make the encoder's masked input: fill the masked voxels (E-MIM eq. 9, BrainMVP Alg. 1).

Each function runs three separate steps: the layout (how the mask lines up with the
volume), the fill value (a constant, a statistic, noise, a tensor or another modality), and
one elementwise write ``where(mask, value, volume)``. The fast paths, each checked against the
plain path in the tests and timed against it in ``benchmarks/bench_masking.py``, are
``_row_layout``, ``_bitwise_zero_fill`` and ``_patch_square_sums``; see
[the masking guide][how-a-mask-is-applied].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from einops import rearrange, reduce, repeat

from mrissl._checks import (
    Triple,
    check_available,
    check_bool_mask,
    check_floating,
    check_generator,
    check_tensor,
    to_triple,
)
from mrissl.masking._base import _rand
from mrissl.masking.convert import _token_mask_5d
from mrissl.nn import grid_size

__all__ = ["CrossModalFill", "apply_mask", "cross_modal_fill"]

#: what ``apply_mask`` fills with: a number, a statistic of the visible voxels, or a tensor
Fill = float | Literal["mean", "noise"] | torch.Tensor

# integer dtypes of the same width, for the bitwise zero fill
_BIT_VIEWS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


class CrossModalFill(NamedTuple):
    """The result of [`cross_modal_fill`][mrissl.masking.cross_modal_fill].

    Attributes:
        volume: ``(B, C, D, H, W)`` the filled volume (``out`` when given).
        source: ``(B, C)`` int64, the source modality of each case and modality (``-1`` =
            none, ``fallback`` used).
    """

    volume: torch.Tensor
    source: torch.Tensor


class _Layout(NamedTuple):
    """How a mask lines up with a volume: ``where(mask, value, volume.reshape(view))``."""

    mask: torch.Tensor  # broadcasts against the view
    view: tuple[int, ...]  # a view of the (B, C, D, H, W) volume
    tokens: torch.Tensor  # (B, C or 1, gd, gh, gw): the mask per patch
    patch: Triple  # (1, 1, 1) for a voxel mask


# ---- layout -------------------------------------------------------------------------------


def _layout(
    volume: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int | Sequence[int] | None,
    caller: str,
    *,
    per_position: bool,
) -> _Layout:
    """Check ``mask`` against ``volume`` and line the two up.

    A voxel mask is used as it is, a token mask through ``_row_layout``; ``per_position``
    allows a ``(B, N)`` or ``(B, 1, ...)`` mask.
    """
    B, C, D, H, W = volume.shape
    chans = (1, C) if per_position else (C,)
    if mask.ndim == 5:
        if mask.shape[0] != B or mask.shape[1] not in chans or mask.shape[2:] != (D, H, W):
            raise ValueError(
                f"a voxel mask must have shape (B, {'C or 1' if per_position else 'C'}, D, H, W)"
                f" = ({B}, {C}, {D}, {H}, {W}), got {tuple(mask.shape)}"
            )
        m = mask.to(volume.device)
        return _Layout(m, tuple(volume.shape), m, (1, 1, 1))
    if patch_size is None:
        raise ValueError(
            f"{caller} needs patch_size for a token mask of shape {tuple(mask.shape)}; "
            "got patch_size=None"
        )
    if not per_position and mask.shape[:2] != (B, C):
        raise ValueError(
            f"a token mask must have shape (B, C, N) with (B, C) = ({B}, {C}), got "
            f"{tuple(mask.shape)}"
        )
    patch = to_triple(patch_size, "patch_size")
    tokens = _token_mask_5d(mask.to(volume.device), grid_size((D, H, W), patch), B, C)
    rows, view = _row_layout(tokens, patch, (B, C, D, H, W))
    return _Layout(rows, view, tokens, patch)


def _row_layout(
    tokens: torch.Tensor, patch: Triple, shape: tuple[int, int, int, int, int]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Fast path: a token mask spread along image rows, and the volume view it fits.

    ``tokens: (B, C or 1, gd, gh, gw)`` -> the mask ``(B, C or 1, gd, 1, gh, 1, W)`` and the
    view ``(B, C, gd, p0, gh, p1, W)`` of a ``(B, C, D, H, W)`` volume. The plain path is the
    voxel mask of [`mask_to_voxels`][mrissl.masking.mask_to_voxels]; this one is ``p0·p1``
    times smaller and the elementwise kernel runs along whole rows of ``W`` voxels.
    """
    B, C, D, H, W = shape
    p0, p1, p2 = patch
    rows = repeat(tokens, "b c gd gh gw -> b c gd 1 gh 1 (gw pw)", pw=p2)
    return rows, (B, C, D // p0, p0, H // p1, p1, W)


# ---- fill values --------------------------------------------------------------------------


def _check_fill(fill: Any) -> None:
    if isinstance(fill, str):
        if fill not in ("mean", "noise"):
            raise ValueError(f"fill must be a number, 'mean', 'noise' or a tensor, got {fill!r}")
    elif isinstance(fill, bool) or not isinstance(fill, (int, float, torch.Tensor)):
        raise TypeError(
            f"fill must be a number, 'mean', 'noise' or a tensor, got {type(fill).__name__}"
        )


def _fill_value(
    fill: Fill,
    volume: torch.Tensor,
    layout: _Layout,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The value of the masked voxels, in the volume's dtype.

    A 0-d tensor for a number, else a tensor that broadcasts to ``volume: (B, C, D, H, W)``.
    """
    if isinstance(fill, torch.Tensor):
        try:
            return torch.broadcast_to(
                fill.to(dtype=volume.dtype, device=volume.device), volume.shape
            )
        except RuntimeError as err:
            raise ValueError(
                f"fill must broadcast to the volume's shape {tuple(volume.shape)}, got "
                f"{tuple(fill.shape)}"
            ) from err
    if isinstance(fill, str):
        mean, std = _visible_stats(volume, layout.tokens, layout.patch, fill == "noise")
        if fill == "mean":
            return mean.to(volume.dtype)
        check_generator(generator, volume.device)
        noise = torch.randn(volume.shape, generator=generator, device=volume.device)
        return (noise * std + mean).to(volume.dtype)
    # torch.full, not torch.tensor: no host-to-device copy (a synchronisation on CUDA)
    return torch.full((), float(fill), dtype=volume.dtype, device=volume.device)


def _visible_stats(
    volume: torch.Tensor, tokens: torch.Tensor, patch: Triple, with_std: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over the unmasked voxels of each case and modality, in float32.

    ``tokens: (B, C or 1, gd, gh, gw)``, True = masked. Returns ``(B, C, 1, 1, 1)`` tensors:
    0 where a modality has no unmasked voxel (and for the std when ``with_std`` is False).
    """
    B, C = volume.shape[:2]
    visible = (~tokens).float()
    count = reduce(visible.expand(B, C, *tokens.shape[2:]), "b c gd gh gw -> b c", "sum")
    denom = (count * (patch[0] * patch[1] * patch[2])).clamp(min=1)
    sums = _patches(volume, patch).sum(dim=(3, 5, 7), dtype=torch.float32)
    mean = reduce(sums * visible, "b c gd gh gw -> b c", "sum") / denom
    if with_std:
        squares = _patch_square_sums(volume, patch)
        var = reduce(squares * visible, "b c gd gh gw -> b c", "sum") / denom - mean.square()
        std = var.clamp(min=0).sqrt()
    else:
        std = torch.zeros_like(mean)
    return mean[..., None, None, None], std[..., None, None, None]


def _patches(volume: torch.Tensor, patch: Triple) -> torch.Tensor:
    """The view ``(B, C, gd, p0, gh, p1, gw, p2)`` of a ``(B, C, D, H, W)`` volume."""
    p0, p1, p2 = patch
    pattern = "b c (gd pd) (gh ph) (gw pw) -> b c gd pd gh ph gw pw"
    view: torch.Tensor = rearrange(volume, pattern, pd=p0, ph=p1, pw=p2)
    return view


def _patch_square_sums(volume: torch.Tensor, patch: Triple) -> torch.Tensor:
    """Fast path: the float32 sum of squares of each patch, ``(B, C, gd, gh, gw)``.

    Taken as a squared 2-norm, which reads the volume once; the plain path,
    ``reduce(volume.float().square(), "b c (gd pd) (gh ph) (gw pw) -> b c gd gh gw", "sum")``,
    writes and reads a volume-sized temporary. Equal up to float32 rounding.
    """
    x = volume.float() if volume.dtype == torch.float64 else volume  # norm's dtype= only widens
    v = _patches(x, patch)
    norm: torch.Tensor = torch.linalg.vector_norm(v, ord=2, dim=(3, 5, 7), dtype=torch.float32)
    return norm.square()


def _bitwise_zero_fill(
    volume: torch.Tensor, mask: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """Fast path of the ``+0.0`` fill: each value ANDed with all-one or all-zero bits.

    ``+0.0`` is the all-zero bit pattern, so ``value & (kept ? ~0 : 0)`` is exactly
    ``where(mask, +0.0, value)`` for every value (NaN, infinities and ``-0.0`` included), as
    a vectorised integer kernel. ``volume`` is a view of the layout, ``mask`` broadcasts to
    it; the dtype must be in ``_BIT_VIEWS`` and autograd off. Writes into ``out`` (contiguous,
    the volume's shape) when given.
    """
    bits = _BIT_VIEWS[volume.dtype]
    keep = (~mask).to(bits).neg_()  # 0 -> 0, 1 -> -1 (all bits set)
    if out is None:
        return torch.bitwise_and(volume.view(bits), keep).view(volume.dtype)
    torch.bitwise_and(volume.view(bits), keep, out=out.view(volume.shape).view(bits))
    return out


def _is_positive_zero(fill: Fill, volume: torch.Tensor) -> bool:
    """Whether ``_bitwise_zero_fill`` applies to ``fill`` on ``volume``."""
    return (
        isinstance(fill, (int, float))
        and not isinstance(fill, bool)
        and fill == 0
        and math.copysign(1.0, fill) > 0
        and volume.dtype in _BIT_VIEWS
        and not _needs_grad(volume)
    )


def _needs_grad(volume: torch.Tensor) -> bool:
    """Whether autograd records operations on ``volume`` (then no ``out=`` kernels)."""
    return torch.is_grad_enabled() and volume.requires_grad


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


def _check_inputs(volume: Any, mask: Any, mask_ndim: tuple[int, ...]) -> None:
    check_tensor(volume, "volume", ndim=5)
    check_floating(volume, "volume")
    check_bool_mask(mask, "mask", ndim=mask_ndim)


# ---- public -------------------------------------------------------------------------------


def apply_mask(
    volume: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int | Sequence[int] | None = None,
    fill: Fill = 0.0,
    *,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The masked view of a volume: masked voxels replaced by a fill; the input is unchanged.

    ``x_m = where(M, fill, x)`` with ``M`` the voxel mask of ``mask``: the encoder input of
    E-MIM eq. 9. Keep ``volume`` as the reconstruction target. The fills, their statistics and
    ``out=`` (a buffer reused across training steps) are described in
    [the masking guide][applying-a-mask].

    Args:
        volume: ``(B, C, D, H, W)`` floating-point volumes.
        mask: ``(B, C, N)`` bool token mask (True = masked), a per-position ``(B, N)`` mask,
            or a ``(B, C, D, H, W)`` / ``(B, 1, D, H, W)`` bool voxel mask.
        patch_size: the token size for a token mask (``(p0, p1, p2)`` or one int); not used
            with a voxel mask.
        fill: a number; ``"mean"``, the float32 mean of the unmasked voxels of the same case
            and modality (0 if none); ``"noise"``, Gaussian with that mean and standard
            deviation; or a tensor broadcastable to ``(B, C, D, H, W)`` (learnable templates
            receive a gradient from every masked voxel).
        generator: random source for ``fill="noise"``, on the volume's device type.
        out: optional contiguous tensor of the volume's shape, dtype and device that receives
            the result; not sharing memory with ``volume``; no autograd.

    Returns:
        ``(B, C, D, H, W)`` in the volume's dtype (``out`` itself when given).

    Raises:
        ValueError: for mismatched shapes, a missing ``patch_size``, an unknown fill, or an
            ``out`` of the wrong shape, dtype or device, overlapping ``volume``, or used with
            tensors that require gradients.
        TypeError: for a non-bool mask, a non-floating volume, a fill of another type or an
            ``out`` that is not a tensor.

    Examples:
        >>> x = torch.arange(1.0, 9.0).view(1, 1, 2, 2, 2)
        >>> mask = torch.tensor([[[True, False]]])  # two 2 x 2 x 1 patches; the first masked
        >>> apply_mask(x, mask, (2, 2, 1))[0, 0, 0]
        tensor([[0., 2.],
                [0., 4.]])
        >>> apply_mask(x, mask, (2, 2, 1), fill="mean")[0, 0, 0]  # mean of 2, 4, 6, 8
        tensor([[5., 2.],
                [5., 4.]])
    """
    _check_inputs(volume, mask, (2, 3, 5))
    _check_fill(fill)
    layout = _layout(volume, mask, patch_size, "apply_mask", per_position=True)
    if out is not None:
        _check_out(out, volume, "apply_mask", isinstance(fill, torch.Tensor) and fill.requires_grad)
    x = volume.reshape(layout.view)
    if mask.ndim != 5 and _is_positive_zero(fill, volume):
        filled = _bitwise_zero_fill(x, layout.mask, out)
        return filled.view(volume.shape) if out is None else out
    value = _fill_value(fill, volume, layout, generator)
    if value.ndim:
        value = torch.broadcast_to(value, volume.shape).reshape(layout.view)
    if out is None:
        return torch.where(layout.mask, value, x).reshape(volume.shape)
    torch.where(layout.mask, value, x, out=out.view(layout.view))
    return out


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

    ``filled[b, c] = where(M[b, c], x[b, s(b, c)], x[b, c])`` with the source ``s(b, c) ≠ c``
    drawn uniformly among the other **present** modalities of case ``b`` (BrainMVP
    Algorithm 1). Where there is none (one present modality, or ``c`` missing) the masked
    voxels take ``fallback`` and ``s = -1``. See
    [the masking guide][cross-modal-fill].

    Args:
        volume: ``(B, C, D, H, W)`` floating-point volumes.
        mask: ``(B, C, D, H, W)`` bool voxel mask or ``(B, C, N)`` bool token mask,
            True = masked.
        patch_size: the token (block) size for a token mask; not used with a voxel mask.
        available: ``(B, C)`` bool, True = modality present; ``None`` means all present.
        generator: random source for the choice of sources, on the volume's device type.
        fallback: the value of masked voxels that have no source.
        out: optional contiguous tensor of the volume's shape, dtype and device that receives
            the filled volume (as ``out`` of [`apply_mask`][mrissl.masking.apply_mask]).

    Returns:
        [`CrossModalFill`][mrissl.masking.CrossModalFill] ``(volume, source)``: the
        ``(B, C, D, H, W)`` filled volume (``out`` when given) and the ``(B, C)`` int64
        sources.

    Raises:
        ValueError: for mismatched shapes, a missing ``patch_size``, a bad ``available`` or a
            bad ``out``.
        TypeError: for a non-bool mask or a non-floating volume.

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
    _check_inputs(volume, mask, (3, 5))
    B, C = volume.shape[:2]
    device = volume.device
    check_generator(generator, device)
    avail = check_available(available, B, C, device)
    if avail is None:
        avail = torch.ones(B, C, dtype=torch.bool, device=device)
    if out is not None:
        _check_out(out, volume, "cross_modal_fill")
    layout = _layout(volume, mask, patch_size, "cross_modal_fill", per_position=False)
    source = _choose_sources(avail, generator, device)
    volume = volume.contiguous()
    filled = _source_volume(volume, source, fallback, out)  # one copy, channel by channel
    rows, x = filled.view(layout.view), volume.view(layout.view)
    if _needs_grad(volume):  # where(out=...) has no autograd
        return CrossModalFill(torch.where(layout.mask, rows, x).view(volume.shape), source)
    torch.where(layout.mask, rows, x, out=rows)  # put the kept voxels back, in place
    return CrossModalFill(filled, source)


def _choose_sources(
    available: torch.Tensor, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``(B, C)`` int64: for each present modality, another present one, uniformly; else -1."""
    B, C = available.shape
    eye = torch.eye(C, dtype=torch.bool, device=device)
    valid = available[:, None, :] & available[:, :, None] & ~eye  # [b, target, source]
    scores = _rand((B, C, C), generator, device).masked_fill(~valid, -1.0)
    return torch.where(valid.any(dim=2), scores.argmax(dim=2), -1)


def _source_volume(
    volume: torch.Tensor, source: torch.Tensor, fallback: float, out: torch.Tensor | None
) -> torch.Tensor:
    """``(B, C, D, H, W)``: channel ``source[b, c]`` of case ``b`` (``fallback`` where -1).

    Written into ``out`` when given (contiguous, the volume's shape), else a new tensor.
    """
    B, C = source.shape
    channels = "b c d h w -> (b c) (d h w)"
    row = torch.arange(B, device=volume.device)[:, None] * C + source.clamp(min=0)
    flat = rearrange(volume, channels)
    if out is None:
        res = flat.index_select(0, row.flatten())
    else:
        res = torch.index_select(flat, 0, row.flatten(), out=rearrange(out, channels))
    # fixed shapes: a masked fill over every row, not an index of the rows without a source
    res.masked_fill_((source.flatten() < 0)[:, None], fallback)
    return res.view(volume.shape) if out is None else out

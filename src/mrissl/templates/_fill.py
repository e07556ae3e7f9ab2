"""The crop gather and fill of the templates: pure functions (see ``mrissl.templates``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch

from mrissl._checks import (
    Triple,
    check_bool_mask,
    check_choice,
    check_floating,
    check_tensor,
    to_triple,
)
from mrissl._settings import values_checked

__all__ = ["crop_templates", "template_fill"]

Padding = Literal["error", "zeros", "border"]
_PADDING = ("error", "zeros", "border")


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_offsets(
    offsets: Any, batch: int, device: torch.device, canvas: Triple, crop: Triple, padding: str
) -> torch.Tensor:
    """``(B, 3)`` int64 crop starts on ``device``; ``None`` centers the crop in the canvas.

    With ``padding="error"`` every crop must lie inside the canvas: a negative index would
    otherwise wrap around silently. When ``values_checked()`` the check reads the ``B × 3``
    offsets on the host and raises a ``ValueError`` naming the cases; otherwise it is a
    ``torch._assert_async`` (no synchronization, traceable by ``torch.compile``), which stops
    the step with a ``RuntimeError`` on the CPU and a device-side assert on CUDA.
    """
    if offsets is None:
        start = [(c - s) // 2 for c, s in zip(canvas, crop, strict=True)]
        if padding == "error" and any(s < 0 for s in start):
            raise ValueError(
                f"the crop {crop} is larger than the template canvas {canvas}: choose a "
                "larger canvas (shape=...) or a padding rule (padding='zeros' or 'border')"
            )
        # made on the device (torch.tensor would copy from the host, a sync on CUDA)
        axes = [torch.full((batch,), s, dtype=torch.long, device=device) for s in start]
        return torch.stack(axes, dim=1)
    if not isinstance(offsets, torch.Tensor):
        if isinstance(offsets, Sequence) and not isinstance(offsets, str):
            offsets = torch.as_tensor(offsets)
        else:
            raise TypeError(
                f"offsets must be a (B, 3) or (3,) int tensor or None, got {type(offsets).__name__}"
            )
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool or offsets.is_complex():
        raise TypeError(f"offsets must be an integer tensor, got dtype {offsets.dtype}")
    if offsets.ndim == 1:
        offsets = offsets[None].expand(batch, -1)
    if offsets.ndim != 2 or tuple(offsets.shape) != (batch, 3):
        raise ValueError(
            f"offsets must have shape (B, 3) = ({batch}, 3) or (3,): the start of each crop "
            f"in the canvas along (D, H, W), got {tuple(offsets.shape)}"
        )
    offsets = offsets.to(device=device, dtype=torch.long)
    if padding == "error" and not values_checked():
        inside = (offsets >= 0).all()
        for k, (c, s) in enumerate(zip(canvas, crop, strict=True)):
            inside = inside & (offsets[:, k] <= c - s).all()
        torch._assert_async(inside, f"offsets put crops of size {crop} outside the canvas {canvas}")
    elif padding == "error":
        host = offsets.cpu()
        upper = torch.tensor([c - s for c, s in zip(canvas, crop, strict=True)])
        bad = ((host < 0) | (host > upper)).any(dim=1)
        if bool(bad.any()):
            cases = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"offsets put crops of size {crop} outside the template canvas {canvas} "
                f"(valid starts: 0..{upper.tolist()} per axis) for cases {cases[:8]}"
                f"{'...' if len(cases) > 8 else ''}, e.g. offsets {host[cases[0]].tolist()}; "
                "pass padding='zeros' or 'border' to allow crops that leave the canvas"
            )
    return cast(torch.Tensor, offsets)


def _check_ids(ids: Any, batch: int, chans: int, num: int, device: torch.device) -> torch.Tensor:
    """``(B, C)`` int64 template indices from a ``(B, C)`` tensor, or ``(B,)`` when ``C = 1``."""
    check_tensor(ids, "modality_ids", ndim=(1, 2))
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"modality_ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.ndim == 1:
        if chans != 1 or ids.shape[0] != batch:
            raise ValueError(
                f"a 1-D modality_ids gives one template per case and needs a single-modality "
                f"volume, (B,) = ({batch},) with C = 1; got shape {tuple(ids.shape)} for "
                f"C = {chans}: pass (B, C) ids, or modality names"
            )
        ids = ids[:, None]
    if tuple(ids.shape) != (batch, chans):
        raise ValueError(
            f"modality_ids must have shape (B, C) = ({batch}, {chans}), got {tuple(ids.shape)}"
        )
    if not values_checked():
        if ids.numel():  # a negative id would wrap around silently
            in_range = ((ids >= 0) & (ids < num)).all()
            torch._assert_async(in_range, f"modality_ids must index the {num} templates")
    elif ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num:
            raise ValueError(
                f"modality_ids must index the {num} templates, values in [0, {num}), got "
                f"values in [{lo}, {hi}]"
            )
    return cast(torch.Tensor, ids.to(device=device, dtype=torch.long))


def _check_volume_mask(volume: Any, voxel_mask: Any) -> tuple[int, int, int, int, int]:
    check_tensor(volume, "volume", ndim=5)
    check_floating(volume, "volume")
    check_bool_mask(voxel_mask, "voxel_mask", ndim=5)
    B, C, d, h, w = volume.shape
    vm = voxel_mask.shape
    if vm[0] != B or vm[1] not in (1, C) or tuple(vm[2:]) != (d, h, w):
        raise ValueError(
            f"voxel_mask must have shape (B, C or 1, d, h, w) = ({B}, {C}, {d}, {h}, {w}), "
            f"got {tuple(vm)}"
        )
    return B, C, d, h, w


# --------------------------------------------------------------------------------------------
# the crop gather


class _GatherRows(torch.autograd.Function):
    """Copy whole ``w``-voxel rows of the canvas; the backward adds into the used voxels only.

    Autograd's own backward for the strided row view would allocate the unfolded canvas
    (``W - w + 1`` times the canvas); this one adds the gradient into a canvas-sized buffer.
    """

    @staticmethod
    def forward(
        ctx: Any, canvas: torch.Tensor, rows: torch.Tensor, col: torch.Tensor, width: int
    ) -> torch.Tensor:
        S, D, H, W = canvas.shape
        ctx.save_for_backward(rows, col)
        ctx.canvas_shape = canvas.shape
        ctx.width = width
        windows = canvas.reshape(S * D * H, W).unfold(1, width, 1)  # (S·D·H, W - w + 1, w) view
        return windows[rows, col]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        rows, col = ctx.saved_tensors
        S, D, H, W = ctx.canvas_shape
        cols = col[..., None] + torch.arange(ctx.width, device=grad.device)
        out = torch.zeros(S * D * H, W, dtype=grad.dtype, device=grad.device)
        out.index_put_((rows[..., None], cols), grad, accumulate=True)
        return out.view(S, D, H, W), None, None, None


def crop_templates(
    templates: torch.Tensor,
    modality_ids: torch.Tensor,
    offsets: torch.Tensor | Sequence[int] | None,
    size: int | Sequence[int],
    *,
    padding: Padding = "error",
) -> torch.Tensor:
    """Cut each case's crop window out of the template of each of its channels, all at once.

    Channel ``c`` of case ``b`` gets
    ``templates[modality_ids[b, c], o0:o0+d, o1:o1+h, o2:o2+w]`` with ``(o0, o1, o2) =
    offsets[b]``. The windows of the whole batch are gathered by one indexing operation on
    the stacked templates (index grids ``offsets[:, k, None] + arange`` per axis), so the
    gradient reaches exactly the template voxels read, and nothing else.

    Args:
        templates: ``(S, D, H, W)`` the stacked canvases, one per modality.
        modality_ids: ``(B, C)`` int64 index into ``S`` of each case's channels.
        offsets: ``(B, 3)`` or ``(3,)`` int start of each crop in the canvas along
            ``(D, H, W)``; ``None`` centers the crop (``(canvas - crop) // 2``).
        size: ``(d, h, w)`` of the crop, or one int.
        padding: what a crop that leaves the canvas reads: ``"error"`` (raise, the default),
            ``"zeros"`` (0 outside) or ``"border"`` (the nearest canvas voxel).

    Returns:
        ``(B, C, d, h, w)`` in the templates' dtype.

    Raises:
        ValueError: for mismatched shapes; with the value checks on, for offsets outside the
            canvas (``padding="error"``) or ids out of range.
        RuntimeError: with the value checks off, for those offsets or ids
            (``torch._assert_async``; a device-side assert on CUDA).
        TypeError: for non-integer ids or offsets.

    Examples:
        >>> T = torch.arange(2 * 4 * 4 * 4.0).view(2, 4, 4, 4)  # two 4³ canvases
        >>> ids = torch.tensor([[1], [0]])  # case 0 reads template 1, case 1 template 0
        >>> crops = crop_templates(T, ids, torch.tensor([[0, 0, 0], [2, 2, 2]]), 2)
        >>> crops.shape, crops[0, 0, 0, 0].tolist(), crops[1, 0, 0, 0].tolist()
        (torch.Size([2, 1, 2, 2, 2]), [64.0, 65.0], [42.0, 43.0])
        >>> import mrissl
        >>> with mrissl.checks("values"):  # names the cases (reads the offsets on the host)
        ...     crop_templates(T, ids, torch.tensor([3, 0, 0]), 2)
        Traceback (most recent call last):
            ...
        ValueError: offsets put crops of size (2, 2, 2) outside the template canvas (4, 4, 4) ...
    """
    check_tensor(templates, "templates", ndim=4)
    check_choice(padding, "padding", _PADDING)
    check_tensor(modality_ids, "modality_ids", ndim=2)
    B, C = modality_ids.shape
    S, D, H, W = templates.shape
    crop = to_triple(size, "size")
    device = templates.device
    ids = _check_ids(modality_ids, B, C, S, device)
    off = _check_offsets(offsets, B, device, (D, H, W), crop, padding)
    d, h, w = crop
    i0 = off[:, 0, None] + torch.arange(d, device=device)  # (B, d)
    i1 = off[:, 1, None] + torch.arange(h, device=device)  # (B, h)
    if padding == "error":
        # whole rows of w voxels: (B, C, d, h) row numbers into the (S·D·H, W) canvas
        rows = ((ids[:, :, None] * D + i0[:, None]) * H)[..., None] + i1[:, None, None, :]
        col = off[:, 2, None, None, None].expand_as(rows)
        return cast(torch.Tensor, _GatherRows.apply(templates, rows, col, w))
    i2 = off[:, 2, None] + torch.arange(w, device=device)
    inside = None
    if padding == "zeros":
        inside = (
            ((i0 >= 0) & (i0 < D))[:, :, None, None]
            & ((i1 >= 0) & (i1 < H))[:, None, :, None]
            & ((i2 >= 0) & (i2 < W))[:, None, None, :]
        )[:, None]  # (B, 1, d, h, w)
    i0, i1, i2 = i0.clamp(0, D - 1), i1.clamp(0, H - 1), i2.clamp(0, W - 1)
    out = templates[
        ids[:, :, None, None, None],
        i0[:, None, :, None, None],
        i1[:, None, None, :, None],
        i2[:, None, None, None, :],
    ]
    if inside is not None:
        out = out * inside  # gradient 0 to the clamped voxels that stand for padding
    return out


def template_fill(
    volume: torch.Tensor,
    voxel_mask: torch.Tensor,
    templates: torch.Tensor,
    modality_ids: torch.Tensor,
    offsets: torch.Tensor | Sequence[int] | None = None,
    *,
    padding: Padding = "error",
) -> torch.Tensor:
    """BrainMVP's ``Φ_distill``: masked voxels take the template of their modality, in place.

    ``out = where(voxel_mask, crop_templates(...), volume)``: each masked voxel of channel
    ``c`` of case ``b`` takes the voxel of template ``modality_ids[b, c]`` at the same place
    of the crop (``offsets[b]`` plus its position in the crop); the other voxels are those
    of ``volume``. The input is not changed. Gradients reach ``volume`` at the kept voxels
    and the templates at exactly the masked voxels' places.

    Args:
        volume: ``(B, C, d, h, w)`` floating-point crops.
        voxel_mask: ``(B, C, d, h, w)`` or ``(B, 1, d, h, w)`` bool, True = masked (use
            [`mask_to_voxels`][mrissl.masking.mask_to_voxels] for a token mask).
        templates: ``(S, D, H, W)`` stacked (already normalized) canvases.
        modality_ids: ``(B, C)`` int64 template of each channel; ``(B,)`` when ``C = 1``.
        offsets: ``(B, 3)``/``(3,)`` crop starts in the canvas, or ``None`` (centered).
        padding: ``"error"``, ``"zeros"`` or ``"border"``, see
            [`crop_templates`][mrissl.templates.crop_templates].

    Returns:
        ``(B, C, d, h, w)`` in the volume's dtype.

    Raises:
        ValueError: for mismatched shapes; offsets outside the canvas or bad ids with the
            value checks on (a ``RuntimeError`` without them, see ``crop_templates``).
        TypeError: for a non-floating volume or a non-bool mask.

    Examples:
        >>> x = torch.ones(1, 1, 2, 2, 2)
        >>> mask = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
        >>> mask[..., 0] = True
        >>> T = torch.zeros(1, 4, 4, 4, requires_grad=True)
        >>> out = template_fill(x, mask, T, torch.tensor([0]), torch.tensor([1, 1, 1]))
        >>> out[0, 0, 0].tolist()
        [[0.0, 1.0], [0.0, 1.0]]
        >>> out.sum().backward()
        >>> int(T.grad.sum()), T.grad[0, 1:3, 1:3, 1].tolist()  # the 4 masked voxels only
        (4, [[1.0, 1.0], [1.0, 1.0]])
    """
    B, C, d, h, w = _check_volume_mask(volume, voxel_mask)
    check_tensor(templates, "templates", ndim=4)
    check_floating(templates, "templates")
    check_tensor(modality_ids, "modality_ids", ndim=(1, 2))
    ids = _check_ids(modality_ids, B, C, templates.shape[0], templates.device)
    crops = crop_templates(templates, ids, offsets, (d, h, w), padding=padding)
    crops = crops.to(device=volume.device, dtype=volume.dtype)
    return torch.where(voxel_mask.to(volume.device), crops, volume)

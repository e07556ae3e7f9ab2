"""Learnable modality templates (BrainMVP data distillation) and the downstream template mix.

BrainMVP learns one volume ``T_m`` per MRI modality, initialised to zero, by filling the masked
blocks of an input of modality ``m`` from ``T_m`` at the same place and reconstructing the
original (BrainMVP eq. 3):

    L_MD = ‖ F_dec(F_enc(Φ_distill(X_im, T_m))) − X_im ‖₂

so the gradient of the reconstruction loss reaches the template voxels that were used. Once
learned, the frozen templates replace some modalities of downstream cases (BrainMVP supplement
A): two copies ``X'``, ``X''`` with different modalities replaced feed the task loss, and an L2
term ties their features together (supplement eq. 7,
[`consistency_loss`][mrissl.losses.consistency_loss]).

* [`ModalityTemplates`][mrissl.templates.ModalityTemplates]: the learnable canvases, a
  crop-aware vectorised fill, optional safe normalization, their own learning rate, NIfTI
  export and import, and rebuilding from a checkpoint's ``state_dict``.
* [`template_fill`][mrissl.templates.template_fill] and
  [`crop_templates`][mrissl.templates.crop_templates]: the same fill as pure functions.
* [`TemplateMix`][mrissl.templates.TemplateMix]: the downstream augmentation (two views).

Unlike the released code, the canvas has any shape you choose (160 × 192 × 160 holds a 1 mm
MNI-sized head), every crop names its offset in the canvas, and a zero template is never
divided by ~1e-9. This module depends on ``torch``, ``mrissl.masking``, ``mrissl.modalities``
and ``mrissl._checks``; nibabel is imported only inside
[`to_nifti`][mrissl.templates.ModalityTemplates.to_nifti] and
[`from_nifti`][mrissl.templates.ModalityTemplates.from_nifti].
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import nn

from mrissl._checks import (
    Triple,
    check_available,
    check_choice,
    check_finite,
    check_floating,
    check_generator,
    check_number,
    check_tensor,
    to_triple,
)
from mrissl._settings import values_checked
from mrissl.masking import BlockMask, mask_to_voxels
from mrissl.modalities import canonical_modalities, canonical_modality
from mrissl.nn import grid_size

__all__ = [
    "ModalityTemplates",
    "TemplateMix",
    "TemplateMixViews",
    "crop_templates",
    "template_fill",
]

Normalize = Literal["none", "sigmoid", "minmax"]
Padding = Literal["error", "zeros", "border"]
_NORMALIZE = ("none", "sigmoid", "minmax")
_PADDING = ("error", "zeros", "border")
_KIND = "mrissl.ModalityTemplates"
_EXTRA_KEY = "_extra_state"


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_offsets(
    offsets: Any, batch: int, device: torch.device, canvas: Triple, crop: Triple, padding: str
) -> torch.Tensor:
    """``(B, 3)`` int64 crop starts on ``device``; ``None`` centres the crop in the canvas.

    With ``padding="error"`` every crop must lie inside the canvas: a negative index would
    otherwise wrap around silently. When ``values_checked()`` the check reads the ``B × 3``
    offsets on the host and raises a ``ValueError`` naming the cases; otherwise it is a
    ``torch._assert_async`` (no synchronisation, traceable by ``torch.compile``), which stops
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
    check_tensor(voxel_mask, "voxel_mask", ndim=5)
    if voxel_mask.dtype != torch.bool:
        raise TypeError(f"voxel_mask must be a bool tensor (True = masked), got {voxel_mask.dtype}")
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
            ``(D, H, W)``; ``None`` centres the crop (``(canvas - crop) // 2``).
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
        offsets: ``(B, 3)``/``(3,)`` crop starts in the canvas, or ``None`` (centred).
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


# --------------------------------------------------------------------------------------------
# the module


class ModalityTemplates(nn.Module):
    """One learnable template volume per named modality (BrainMVP modality-wise distillation).

    The templates are one parameter, ``weight: (S, D, H, W)``, a canvas per modality in the
    order of ``modalities``. Each training crop names where it lies in the canvas (its
    ``offsets``); [`fill`][mrissl.templates.ModalityTemplates.fill] gathers the windows of
    the whole batch at once, so the gradient reaches only the template voxels that were used.
    Choose the canvas to hold your preprocessed volumes (160 × 192 × 160 holds a 1 mm head);
    the Adam state is twice the canvas, so 8 modalities at 160 × 192 × 160 cost
    2 × 150 MiB, against 2 × 272 MiB for the released code's 8 × 240 × 240 × 155.

    **Normalization** of the values the fill uses (computed in float32):

    * ``"none"`` (default, the paper): the raw parameter, initialised to zero.
    * ``"sigmoid"``: ``σ(weight)``, in (0, 1) like the [0, 1]-scaled intensities; zero init
      gives 0.5 everywhere with gradient factor 0.25, nothing is divided.
    * ``"minmax"`` (the released code): ``(T − min T) / max(max T − min T, eps)`` per
      template. A constant template (zero init) gives 0 everywhere and its gradient is scaled
      by at most ``1 / eps`` (the released code's ``1e-9`` scales it by 10⁹). Min and max
      read the whole canvas each call, and pass gradient to the arg-min and arg-max voxels.

    **Names** are case-insensitive with the aliases of [`mrissl.modalities`][mrissl.modalities]
    (``t1c``, ``T1Gd`` → ``t1ce``; ``t2f`` → ``flair``). They, the normalization and the
    ``affine`` (a ``(4, 4)`` float64 buffer, voxel → RAS millimetres, identity by default) are
    saved in the ``state_dict`` (``_extra_state`` and ``affine``), so
    [`from_state_dict`][mrissl.templates.ModalityTemplates.from_state_dict] rebuilds the
    module from a checkpoint alone.

    Args:
        modalities: the modality names, in template order.
        shape: ``(D, H, W)`` of every canvas, or one int.
        init: ``"zeros"`` (the paper), a number, or an ``(S, D, H, W)`` tensor.
        normalize: ``"none"``, ``"sigmoid"`` or ``"minmax"``, see above.
        eps: the smallest range ``"minmax"`` divides by.
        padding: what crops leaving the canvas read: ``"error"`` (raise), ``"zeros"``,
            ``"border"``.
        affine: ``(4, 4)`` voxel-to-world matrix of the canvas, written to NIfTI.

    Raises:
        ValueError: for unknown or repeated modality names (the message lists the known ones),
            a bad shape, init, normalization or affine.

    Examples:
        >>> templates = ModalityTemplates(["T1", "t1c", "T2", "t2f"], shape=(32, 40, 32))
        >>> templates.modalities, tuple(templates.weight.shape)
        (('t1', 't1ce', 't2', 'flair'), (4, 32, 40, 32))
        >>> x = torch.rand(2, 1, 16, 16, 16)  # two single-modality crops
        >>> mask = torch.rand(2, 1, 16, 16, 16) < 0.75
        >>> ids = templates.index(["flair", "T1Gd"])  # case 0 is FLAIR, case 1 is T1ce
        >>> out = templates.fill(x, mask, ids, offsets=torch.tensor([[0, 0, 0], [8, 20, 16]]))
        >>> bool((out[mask] == 0).all()), torch.equal(out[~mask], x[~mask])
        (True, True)
    """

    weight: torch.Tensor
    affine: torch.Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        shape: int | Sequence[int] = (160, 192, 160),
        init: Literal["zeros"] | float | torch.Tensor = "zeros",
        normalize: Normalize = "none",
        eps: float = 1e-2,
        padding: Padding = "error",
        affine: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = canonical_modalities(modalities, "modalities")
        canvas = to_triple(shape, "shape")
        check_choice(normalize, "normalize", _NORMALIZE)
        check_choice(padding, "padding", _PADDING)
        eps = check_number(eps, "eps", low=0, low_open=True)
        self.normalize: Normalize = normalize
        self.eps = float(eps)
        self.padding: Padding = padding
        S = len(self.modalities)
        self.weight = nn.Parameter(_initial(init, (S, *canvas)))
        self.register_buffer("affine", _check_affine(affine))

    @property
    def shape(self) -> Triple:
        """``(D, H, W)`` of the canvas."""
        D, H, W = self.weight.shape[1:]
        return int(D), int(H), int(W)

    def index(self, names: str | Iterable[str]) -> torch.Tensor:
        """Template indices of modality names (any known spelling).

        Args:
            names: one name or several (for example the modality of each case).

        Returns:
            ``()`` or ``(len(names),)`` int64 on the templates' device.

        Raises:
            ValueError: for a name that is not a known modality (listing them) or that has no
                template here (listing the templates).

        Examples:
            >>> ModalityTemplates(["t1", "t2", "flair"], shape=8).index(["T2w", "t2f", "T1"])
            tensor([1, 2, 0])
        """
        single = isinstance(names, str)
        wanted = [names] if isinstance(names, str) else list(names)
        out = []
        for name in wanted:
            canonical = canonical_modality(name)
            if canonical not in self.modalities:
                raise ValueError(
                    f"modality {name!r} ({canonical}) has no template; the templates are "
                    f"{list(self.modalities)}"
                )
            out.append(self.modalities.index(canonical))
        ids = torch.tensor(out, dtype=torch.long, device=self.weight.device)
        return ids[0] if single else ids

    def templates(self) -> torch.Tensor:
        """The normalized canvases the fill reads, ``(S, D, H, W)`` float32, with gradient.

        Examples:
            >>> t = ModalityTemplates(["t1"], shape=4, normalize="sigmoid")
            >>> t.templates().unique().tolist()  # σ(0) at zero init
            [0.5]
        """
        return _normalize(self.weight, self.normalize, self.eps)

    def crop(
        self,
        modality_ids: torch.Tensor | Sequence[str],
        size: int | Sequence[int],
        offsets: torch.Tensor | Sequence[int] | None = None,
        *,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """The normalized template windows ``(B, C, d, h, w)`` of each case's channels.

        Args:
            modality_ids: ``(B, C)`` int64 template indices, or ``C`` modality names (the
                same for every case; give ``batch_size`` or ``(B, 3)`` offsets then).
            size: ``(d, h, w)`` of the crop, or one int.
            offsets: ``(B, 3)``/``(3,)`` crop starts in the canvas, ``None`` = centred.
            batch_size: ``B`` when names are given with ``(3,)`` or ``None`` offsets.

        Returns:
            ``(B, C, d, h, w)`` float32.

        Examples:
            >>> t = ModalityTemplates(["t1", "t2"], shape=8, init=1.0)
            >>> t.crop(["t2", "t1"], 4, batch_size=3).shape
            torch.Size([3, 2, 4, 4, 4])
        """
        ids = self._ids(modality_ids, offsets, batch_size)
        return self._crop(ids, offsets, to_triple(size, "size"))

    def _crop(
        self, ids: torch.Tensor, offsets: torch.Tensor | Sequence[int] | None, size: Triple
    ) -> torch.Tensor:
        """Raw windows first, then the normalization: nothing canvas-sized is written."""
        raw = crop_templates(self.weight, ids, offsets, size, padding=self.padding).float()
        if self.normalize == "sigmoid":
            return torch.sigmoid(raw)
        if self.normalize == "minmax":
            lo, scale = _minmax_stats(self.weight, self.eps)
            ids = ids.to(self.device)
            return (raw - lo[ids][..., None, None, None]) / scale[ids][..., None, None, None]
        return raw

    def fill(
        self,
        volume: torch.Tensor,
        voxel_mask: torch.Tensor,
        modality_ids: torch.Tensor | Sequence[str],
        offsets: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Fill the masked voxels from each case's own modality template (BrainMVP eq. 3).

        ``Φ_distill(X_im, T_m)``: see [`template_fill`][mrissl.templates.template_fill]; the
        templates are normalized first (``normalize``). Vectorised over the batch; gradients
        reach the template voxels used by masked voxels (and, for ``"minmax"``, the min and
        max voxels).

        Args:
            volume: ``(B, C, d, h, w)`` floating crops (``C = 1`` for BrainMVP's
                single-modality inputs).
            voxel_mask: ``(B, C or 1, d, h, w)`` bool, True = masked.
            modality_ids: ``(B, C)`` int64 template indices (``(B,)`` when ``C = 1``; see
                [`index`][mrissl.templates.ModalityTemplates.index]), or ``C`` modality names
                shared by every case.
            offsets: ``(B, 3)``/``(3,)`` start of each crop in the canvas along
                ``(D, H, W)``; ``None`` centres the crop.

        Returns:
            ``(B, C, d, h, w)`` in the volume's dtype.

        Raises:
            ValueError: for a crop that does not fit the canvas, bad names, mismatched shapes;
                offsets outside the canvas (``padding="error"``) or bad ids with the value
                checks on (a ``RuntimeError`` without them, see
                [`crop_templates`][mrissl.templates.crop_templates]).

        Examples:
            >>> t = ModalityTemplates(["t1", "t2"], shape=(8, 8, 8), init=2.0)
            >>> x, mask = torch.zeros(1, 2, 4, 4, 4), torch.ones(1, 2, 4, 4, 4, dtype=torch.bool)
            >>> t.fill(x, mask, ["T2", "T1"]).unique().tolist()
            [2.0]
            >>> t.fill(torch.zeros(1, 1, 10, 4, 4), mask[:, :1, :1].expand(1, 1, 10, 4, 4), ["t1"])
            Traceback (most recent call last):
                ...
            ValueError: the crop (10, 4, 4) is larger than the template canvas (8, 8, 8): ...
        """
        B, C, d, h, w = _check_volume_mask(volume, voxel_mask)
        if isinstance(modality_ids, torch.Tensor):
            ids = _check_ids(modality_ids, B, C, len(self.modalities), self.device)
        else:
            ids = self._ids(modality_ids, offsets, B)
            if ids.shape[1] != C:
                raise ValueError(
                    f"modality_ids names {ids.shape[1]} modalities but the volume has "
                    f"C = {C} channels (shape {tuple(volume.shape)})"
                )
        crops = self._crop(ids, offsets, (d, h, w)).to(device=volume.device, dtype=volume.dtype)
        return torch.where(voxel_mask.to(volume.device), crops, volume)

    @property
    def device(self) -> torch.device:
        """The device of the templates."""
        return self.weight.device

    def _ids(
        self,
        modality_ids: torch.Tensor | Sequence[str],
        offsets: torch.Tensor | Sequence[int] | None,
        batch_size: int | None,
    ) -> torch.Tensor:
        if isinstance(modality_ids, torch.Tensor):
            check_tensor(modality_ids, "modality_ids", ndim=2)
            return modality_ids
        if isinstance(modality_ids, str):
            raise TypeError(
                f"modality_ids must be a (B, C) tensor or a sequence of names, got the string "
                f"{modality_ids!r}; write [{modality_ids!r}]"
            )
        if batch_size is None:
            if isinstance(offsets, torch.Tensor) and offsets.ndim == 2:
                batch_size = offsets.shape[0]
            else:
                raise ValueError("batch_size is needed with modality names and no (B, 3) offsets")
        return self.index(modality_ids)[None].expand(batch_size, -1)

    def parameter_groups(
        self, lr: float, *, model: nn.Module | None = None, **options: Any
    ) -> list[dict[str, Any]]:
        """Optimiser parameter groups that give the templates their own learning rate.

        M3AE trains its learnable fill image at 0.005 against 3e-4 for the network. Without
        ``model`` the result is one group (the templates); with ``model`` (which may contain
        this module) it is ``[rest of model, templates]`` so no parameter appears twice.
        Template groups get ``weight_decay=0`` unless ``options`` says otherwise.

        Args:
            lr: the templates' learning rate.
            model: optional network whose other parameters form the first group.
            **options: further options of the template group (``betas``, ...).

        Returns:
            A list of parameter-group dicts for any ``torch.optim`` optimiser.

        Examples:
            >>> net = nn.Conv3d(1, 1, 3)
            >>> t = ModalityTemplates(["t1"], shape=8)
            >>> opt = torch.optim.Adam(t.parameter_groups(5e-3, model=net), lr=3e-4)
            >>> [g["lr"] for g in opt.param_groups]
            [0.0003, 0.005]
        """
        lr = check_number(lr, "lr", low=0, low_open=True)
        own = {id(p) for p in self.parameters()}
        group: dict[str, Any] = {"params": list(self.parameters()), "lr": float(lr)}
        group.setdefault("weight_decay", 0.0)
        group.update(options)
        if model is None:
            return [group]
        rest = [p for p in model.parameters() if id(p) not in own]
        return [{"params": rest}, group]

    # ---- state --------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Modality names and settings, saved in the ``state_dict`` under ``_extra_state``."""
        return {
            "kind": _KIND,
            "version": 1,
            "modalities": list(self.modalities),
            "normalize": self.normalize,
            "eps": self.eps,
            "padding": self.padding,
        }

    def set_extra_state(self, state: Any) -> None:
        """Check that a loaded ``state_dict`` holds the same modalities, and take its settings."""
        if not isinstance(state, Mapping) or state.get("kind") != _KIND:
            raise ValueError(f"not the extra state of a ModalityTemplates: {state!r}")
        names = tuple(state["modalities"])
        if names != self.modalities:
            raise ValueError(
                f"the state_dict holds templates for {list(names)}, this module for "
                f"{list(self.modalities)}; rebuild it with ModalityTemplates.from_state_dict"
            )
        self.normalize = _stored_normalize(state)
        self.eps = float(state["eps"])
        self.padding = state["padding"]

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], prefix: str | None = None
    ) -> ModalityTemplates:
        """Rebuild the templates from a ``state_dict`` or a whole checkpoint.

        Works on what ``torch.load(path, weights_only=True)`` returns: the module's own
        ``state_dict``, a model's ``state_dict`` holding it under some prefix, or a checkpoint
        dict nesting one (``{"model": ..., "optimizer": ...}``). With ``prefix=None`` the
        templates are found by their ``_extra_state`` marker; there must be exactly one.

        Args:
            state_dict: the (possibly nested) mapping of tensors.
            prefix: the module's key prefix, for example ``"templates."``; ``""`` for the
                module's own state_dict; ``None`` to search.

        Returns:
            A [`ModalityTemplates`][mrissl.templates.ModalityTemplates] on the CPU with the
            saved names, canvases, affine and settings.

        Raises:
            ValueError: if no templates (or several, with ``prefix=None``) are found.

        Examples:
            >>> model = nn.ModuleDict({"net": nn.Linear(2, 2),
            ...                        "templates": ModalityTemplates(["t1", "t2f"], shape=4)})
            >>> t = ModalityTemplates.from_state_dict({"model": model.state_dict()})
            >>> t.modalities, t.shape
            (('t1', 'flair'), (4, 4, 4))
        """
        flat = _flatten(state_dict)
        if prefix is None:
            found = [
                k[: -len(_EXTRA_KEY)]
                for k, v in flat.items()
                if k.endswith(_EXTRA_KEY) and isinstance(v, Mapping) and v.get("kind") == _KIND
            ]
            if len(found) != 1:
                what = "no ModalityTemplates" if not found else f"several ({found})"
                raise ValueError(
                    f"state_dict holds {what} (looked for '<prefix>{_EXTRA_KEY}' entries "
                    f"marked {_KIND!r}); pass prefix=... to choose"
                )
            prefix = found[0]
        keys = (f"{prefix}weight", f"{prefix}affine", f"{prefix}{_EXTRA_KEY}")
        missing = [k for k in keys if k not in flat]
        if missing:
            raise ValueError(f"state_dict has no {missing} for prefix {prefix!r}")
        weight, affine, extra = (flat[k] for k in keys)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
            raise ValueError(f"{keys[0]} must be an (S, D, H, W) tensor, got {weight!r:.80}")
        out = cls(
            extra["modalities"],
            shape=tuple(int(s) for s in weight.shape[1:]),
            init=weight.detach().cpu().float(),
            normalize=_stored_normalize(extra),
            eps=extra["eps"],
            padding=extra["padding"],
            affine=affine.detach().cpu(),
        )
        return out

    # ---- NIfTI --------------------------------------------------------------------------

    def to_nifti(
        self, folder: str | Path, affine: torch.Tensor | None = None, *, normalized: bool = True
    ) -> list[Path]:
        """Write one NIfTI file per modality, ``<folder>/<modality>.nii.gz`` (float32).

        Each file's header ``descrip`` records the modality, its place in the template order
        and the normalization, so [`from_nifti`][mrissl.templates.ModalityTemplates.from_nifti]
        gets names and order back. The voxel axes are the canvas axes ``(D, H, W)``.

        Args:
            folder: where to write (created if needed).
            affine: ``(4, 4)`` voxel-to-world matrix; defaults to the module's ``affine``.
            normalized: write the values the fill uses (``templates()``) rather than the
                raw parameter; the same when ``normalize="none"``.

        Returns:
            The paths written, in template order.

        Examples:
            >>> import tempfile
            >>> t = ModalityTemplates(["t1", "t2f"], shape=(4, 5, 6), init=0.5)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     paths = t.to_nifti(folder, affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
            ...     back = ModalityTemplates.from_nifti(folder)
            >>> [p.name for p in paths], back.modalities, torch.equal(back.weight, t.weight)
            (['t1.nii.gz', 'flair.nii.gz'], ('t1', 'flair'), True)
            >>> back.affine.diagonal().tolist()
            [2.0, 2.0, 2.0, 1.0]
        """
        import nibabel
        import numpy as np

        nib: Any = nibabel  # nibabel's partial annotations would make every call "untyped"
        mat = self.affine if affine is None else _check_affine(affine)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            data = self.templates() if normalized else self.weight.float()
            arrays = data.detach().cpu().numpy().astype(np.float32)
        norm = self.normalize if not normalized else "none"
        paths = []
        S = len(self.modalities)
        for i, name in enumerate(self.modalities):
            img: Any = nib.Nifti1Image(arrays[i], mat.cpu().numpy().astype(np.float64))
            img.header["descrip"] = f"mrissl template {name} {i + 1}/{S} normalize={norm}".encode()
            img.header.set_xyzt_units("mm")
            path = folder / f"{name}.nii.gz"
            nib.save(img, str(path))
            paths.append(path)
        return paths

    @classmethod
    def from_nifti(
        cls, folder: str | Path, modalities: Sequence[str] | None = None, **kwargs: Any
    ) -> ModalityTemplates:
        """Read templates written by [`to_nifti`][mrissl.templates.ModalityTemplates.to_nifti].

        Args:
            folder: the folder of ``.nii``/``.nii.gz`` files.
            modalities: which modalities to read, in this order (files named
                ``<name>.nii.gz`` in any known spelling); ``None`` reads every file and
                orders them by the index in their header (else by name).
            **kwargs: further arguments of the constructor (``padding``, ...); the
                normalization recorded in the files is used unless given.

        Returns:
            The templates, their affine taken from the files.

        Raises:
            ValueError: if the folder holds no template, a requested modality has no file,
                the files disagree in shape or affine, or a file cannot be read, is not a
                3-D real-valued volume or holds NaN or infinite voxels (one line naming it).
        """
        import numpy as np

        from mrissl._io import open_nifti, read_voxels

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"folder {str(folder)!r} does not exist or is not a folder")
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        entries: list[tuple[int, str, Path, str]] = []
        images: dict[Path, Any] = {}
        for p in files:
            images[p] = open_nifti(p)  # header checked: one ValueError line naming the file
            descrip = bytes(images[p].header["descrip"]).split(b"\0")[0].decode(errors="replace")
            m = re.match(r"mrissl template (\S+) (\d+)/\d+ normali[sz]e=(\S+)", descrip)
            stem = p.name[: -len(".nii.gz")] if p.name.endswith(".gz") else p.name[:-4]
            if m:
                entries.append((int(m.group(2)), canonical_modality(m.group(1)), p, m.group(3)))
            else:
                entries.append((10**6, canonical_modality(stem), p, "none"))
        if not entries:
            raise ValueError(f"folder {str(folder)!r} holds no .nii or .nii.gz template files")
        by_name = {name: (p, norm) for _, name, p, norm in entries}
        if modalities is None:
            names = [name for _, name, _, _ in sorted(entries, key=lambda e: (e[0], e[1]))]
        else:
            names = list(canonical_modalities(modalities))
            absent = [n for n in names if n not in by_name]
            if absent:
                raise ValueError(
                    f"folder {str(folder)!r} has no file for {absent}; it holds {sorted(by_name)}"
                )
        arrays, affines = [], []
        for name in names:
            path = by_name[name][0]
            img: Any = images[path]
            arrays.append(read_voxels(img, where=str(path)))
            affines.append(np.asarray(img.affine, dtype=np.float64))
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1 or len(arrays[0].shape) != 3:
            raise ValueError(f"template files must share one 3-D shape, got {sorted(shapes)}")
        if any(not np.allclose(a, affines[0]) for a in affines):
            raise ValueError("template files must share one affine; they differ")
        kwargs.setdefault("normalize", by_name[names[0]][1])
        return cls(
            names,
            shape=arrays[0].shape,
            init=torch.from_numpy(np.stack(arrays)),
            affine=torch.from_numpy(affines[0]),
            **kwargs,
        )

    def extra_repr(self) -> str:
        """Names, canvas and settings, for ``print(module)``."""
        return (
            f"modalities={list(self.modalities)}, shape={self.shape}, "
            f"normalize={self.normalize!r}, padding={self.padding!r}"
        )


class TemplateMixViews(NamedTuple):
    """The two copies made by [`TemplateMix`][mrissl.templates.TemplateMix].

    Attributes:
        view1: ``(B, C, d, h, w)`` the first copy ``X'``.
        view2: ``(B, C, d, h, w)`` the second copy ``X''``.
        replaced1: ``(B, C)`` bool, True where a whole modality of ``view1`` is its template.
        replaced2: the same for ``view2``.
        blocks1: ``(B, C, N)`` bool block mask of ``view1``'s single-modality cases (True =
            block filled from the template; all False for multi-modality cases), or ``None``
            when no case can be single-modality.
        blocks2: the same for ``view2``.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    replaced1: torch.Tensor
    replaced2: torch.Tensor
    blocks1: torch.Tensor | None
    blocks2: torch.Tensor | None


class TemplateMix(nn.Module):
    """BrainMVP's downstream template mix: two copies with some modalities made templates.

    BrainMVP supplement A: the learned templates are frozen; for a case with several
    modalities two copies ``X'`` and ``X''`` are made, in each a random number of randomly
    chosen modalities replaced by their templates (at the crop's place in the canvas). The
    task loss is applied to both copies and an L2 term ties their encoder features (supplement
    eqs. 7, 8; [`consistency_loss`][mrissl.losses.consistency_loss]):

        L_FT = L_sl(F(X'), Y) + L_sl(F(X''), Y) + λ_cons · ‖F_enc(X') − F_enc(X'')‖₂

    The counts come from ``min_replaced … min(max_replaced, A − 1)``, where ``A`` is the number
    of **present** modalities of the case, so at least one real modality always stays; missing
    modalities are never replaced and never counted. The supplement makes the two copies with
    *different* numbers of replaced modalities, and so does ``counts="different"`` (default):
    the pair of counts is uniform over the ordered pairs of distinct counts in the range, the
    modalities of each copy are then chosen independently. When the range holds one count
    only (two present modalities with ``min_replaced=1``: replace exactly one), the copies
    replace the same number of *different* modalities, so they are never identical (with
    ``min_replaced=0`` two modalities give the counts 0 and 1 instead).
    ``counts="independent"`` draws each copy's count and modalities on its own (the copies
    then share a count, or are identical, by chance: for ``C = 4``, equal counts a third of
    the time and identical copies 7.4 %, where the consistency term is exactly 0). A case
    with one present modality (a single-modality dataset, or the others missing) instead gets
    the supplement's single-modality variant: ``block_mask`` blocks of its volume are filled
    from its template, drawn independently for the two copies.

    Each copy is the whole input with its own replacements: ``(B, C, d, h, w)`` like the input.
    (The released code built the two copies by interleaving channels; here they are separate
    tensors. To run both through the network in one pass, concatenate along the **batch**,
    ``torch.cat([view1, view2])``, with the labels ``torch.cat([y, y])``.)

    The templates are read without gradient. Vectorised over the batch: one call draws every
    case's choices at once on the volume's device.

    Args:
        templates: the learned [`ModalityTemplates`][mrissl.templates.ModalityTemplates].
        modalities: the modality of each input channel, in channel order (any spelling).
        max_replaced: the most modalities replaced in one copy (capped at ``A − 1``);
            ``None`` = ``A − 1``.
        min_replaced: the fewest (``1`` by default; ``0`` lets a copy stay unchanged).
        block_mask: the [`BlockMask`][mrissl.masking.BlockMask] of the single-modality
            variant (BrainMVP's r = 8, p* = 0.875 by default); ``None`` leaves such cases
            unchanged.
        counts: ``"different"`` (BrainMVP supplement A: the two copies replace different
            numbers of modalities) or ``"independent"`` (each copy draws its own count).

    Raises:
        ValueError: for a modality without template, bad counts or ``counts``.

    Examples:
        >>> templates = ModalityTemplates(["t1", "t1ce", "t2", "flair"], shape=32, init=-1.0)
        >>> mix = TemplateMix(templates, modalities=["T1", "T1Gd", "T2", "FLAIR"])
        >>> x = torch.rand(3, 4, 16, 16, 16)
        >>> views = mix(x, generator=torch.Generator().manual_seed(0))
        >>> views.view1.shape, views.replaced1.sum(dim=1).tolist()  # 1 to 3 of 4 replaced
        (torch.Size([3, 4, 16, 16, 16]), [2, 3, 1])
        >>> views.replaced2.sum(dim=1).tolist()  # a different count in the other copy
        [3, 1, 3]
        >>> bool((views.view1[views.replaced1] == -1).all())
        True
        >>> available = torch.tensor([[True, False, True, False]] * 2)  # t1ce, flair missing
        >>> two = mix(x[:2], available=available, generator=torch.Generator().manual_seed(1))
        >>> two.replaced1[:, [0, 2]].tolist(), two.replaced2[:, [0, 2]].tolist()  # t1, t2
        ([[True, False], [True, False]], [[False, True], [False, True]])
    """

    ids: torch.Tensor

    def __init__(
        self,
        templates: ModalityTemplates,
        *,
        modalities: Sequence[str],
        max_replaced: int | None = None,
        min_replaced: int = 1,
        block_mask: BlockMask | None = None,
        counts: Literal["different", "independent"] = "different",
    ) -> None:
        super().__init__()
        if counts not in ("different", "independent"):
            raise ValueError(f"counts must be 'different' or 'independent', got {counts!r}")
        self.counts = counts
        if not isinstance(templates, ModalityTemplates):
            raise TypeError(
                f"templates must be a ModalityTemplates, got {type(templates).__name__}"
            )
        self.templates = templates
        self.modalities = canonical_modalities(modalities, "modalities")
        self.register_buffer("ids", templates.index(self.modalities), persistent=False)
        self.min_replaced = check_number(min_replaced, "min_replaced", low=0, integer=True)
        if max_replaced is not None:
            max_replaced = check_number(max_replaced, "max_replaced", low=0, integer=True)
            if max_replaced < max(self.min_replaced, 1):
                raise ValueError(
                    f"max_replaced must be at least max(min_replaced, 1) = "
                    f"{max(self.min_replaced, 1)}, got {max_replaced}"
                )
        self.max_replaced = max_replaced
        if block_mask is not None and not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask or None, got {type(block_mask)}")
        self.block_mask = BlockMask() if block_mask is None else block_mask

    def forward(
        self,
        volume: torch.Tensor,
        *,
        available: torch.Tensor | None = None,
        offsets: torch.Tensor | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> TemplateMixViews:
        """Make the two copies of every case.

        Args:
            volume: ``(B, C, d, h, w)`` floating crops, channels in ``modalities`` order.
            available: ``(B, C)`` bool, True = modality present; ``None`` = all present.
            offsets: ``(B, 3)``/``(3,)`` start of each crop in the template canvas; ``None``
                centres it.
            generator: the random source, on the volume's device type.

        Returns:
            [`TemplateMixViews`][mrissl.templates.TemplateMixViews].

        Raises:
            ValueError: for a channel count that differs from ``modalities``, a bad
                ``available``, offsets outside the canvas or a block size that does not
                divide the crop.
        """
        check_tensor(volume, "volume", ndim=5)
        check_floating(volume, "volume")
        B, C, d, h, w = volume.shape
        if len(self.modalities) != C:
            raise ValueError(
                f"volume has C = {C} channels but TemplateMix was built for "
                f"{len(self.modalities)} modalities {list(self.modalities)}"
            )
        device = volume.device
        check_generator(generator, device)
        avail = check_available(available, B, C, device)
        with torch.no_grad():
            ids = self.ids.to(self.templates.device)[None].expand(B, C)
            crops = self.templates.crop(ids, (d, h, w), offsets)
            crops = crops.to(device=device, dtype=volume.dtype)
        # with every modality present and C >= 2 no case is single-modality: skip the blocks
        blocks_needed = C == 1 or avail is not None
        present = avail if avail is not None else torch.ones(B, C, dtype=torch.bool, device=device)
        out: list[Any] = []
        pair = self._choose_pair(present, generator) if self.counts == "different" else None
        for copy in range(2):  # the two copies X', X'' (not a loop over samples)
            replaced = self._choose(present, generator) if pair is None else pair[copy]
            mask = replaced[:, :, None, None, None]
            blocks = None
            if blocks_needed:
                single = present.sum(dim=1, keepdim=True) == 1  # (B, 1)
                grid = grid_size((d, h, w), self.block_mask.block_size)
                tokens = self.block_mask.sample(B, C, grid, generator=generator, device=device)
                blocks = tokens & (single & present)[:, :, None]
                vox = mask_to_voxels(blocks, self.block_mask.block_size, (d, h, w))
                mask = mask | vox
            out += [torch.where(mask, crops, volume), replaced, blocks]
        return TemplateMixViews(out[0], out[3], out[1], out[4], out[2], out[5])

    def _range(self, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` fewest and most modalities one copy may replace, ``lo ≤ hi``."""
        A = present.sum(dim=1)
        hi = A - 1 if self.max_replaced is None else (A - 1).clamp(max=self.max_replaced)
        return torch.full_like(hi, self.min_replaced).clamp(max=hi), hi

    def _choose_pair(
        self, present: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both copies' ``(B, C)`` choices, with different counts wherever the range allows."""
        B, C = present.shape
        lo, hi = self._range(present)
        n = (hi - lo + 1).clamp(min=1)  # counts available per case
        u = torch.rand(2, B, generator=generator, device=present.device)
        k1 = lo + (u[0] * n).long().clamp(max=n - 1)
        # the other copy: uniform over the n − 1 other counts (the same count when n = 1)
        step = 1 + (u[1] * (n - 1)).long().clamp(max=(n - 2).clamp(min=0))
        k2 = torch.where(n >= 2, lo + (k1 - lo + step) % n, k1)
        k1, k2 = torch.where(hi >= 1, k1, 0), torch.where(hi >= 1, k2, 0)
        s1, fresh = torch.rand(2, B, C, generator=generator, device=present.device)
        # one count only: the second copy takes the last k by the first copy's scores, a
        # different set of modalities (k ≤ A − 1 < A)
        s2 = torch.where((n == 1)[:, None], 1.0 - s1, fresh)
        rank1 = s1.masked_fill(~present, 2.0).argsort(dim=1).argsort(dim=1)
        rank2 = s2.masked_fill(~present, 2.0).argsort(dim=1).argsort(dim=1)
        return (rank1 < k1[:, None]) & present, (rank2 < k2[:, None]) & present

    def _choose(self, present: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``(B, C)`` bool: ``k`` random present modalities per case, ``k`` uniform in range."""
        B, C = present.shape
        lo, hi = self._range(present)
        u = torch.rand(B, generator=generator, device=present.device)
        k = torch.where(hi >= 1, lo + (u * (hi - lo + 1)).long().clamp(max=hi - lo), 0)
        # rank of a uniform score among the present modalities; missing ones rank last
        scores = torch.rand(B, C, generator=generator, device=present.device)
        scores = scores.masked_fill(~present, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)
        return (rank < k[:, None]) & present

    def extra_repr(self) -> str:
        """Channels and counts, for ``print(module)``."""
        return (
            f"modalities={list(self.modalities)}, min_replaced={self.min_replaced}, "
            f"max_replaced={self.max_replaced}, counts={self.counts!r}"
        )


def _stored_normalize(state: Mapping[str, Any]) -> Any:
    """The normalization of a saved state (``"normalise"`` in states saved by earlier versions)."""
    return state["normalize"] if "normalize" in state else state["normalise"]


def _normalize(weight: torch.Tensor, how: str, eps: float) -> torch.Tensor:
    w = weight.float()
    if how == "sigmoid":
        return torch.sigmoid(w)
    if how == "minmax":
        lo, scale = _minmax_stats(weight, eps)
        return (w - lo.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1)
    return w


def _minmax_stats(weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S,)`` minimum and ``max(range, eps)`` of each template, float32, with gradient."""
    flat = weight.float().flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    return lo, (hi - lo).clamp(min=eps)


def _initial(init: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if isinstance(init, str):
        if init != "zeros":
            raise ValueError(f"init must be 'zeros', a number or a tensor, got {init!r}")
        return torch.zeros(shape)
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != shape:
            raise ValueError(
                f"init tensor must have the template shape (S, D, H, W) = {shape}, got "
                f"{tuple(init.shape)}"
            )
        if not init.is_floating_point():
            raise TypeError(f"init tensor must be floating point, got dtype {init.dtype}")
        return check_finite(init.detach().clone().float(), "init tensor", always=True)
    try:
        value = check_number(init, "init")  # a ValueError for NaN or an infinity
    except TypeError:
        raise TypeError(
            f"init must be 'zeros', a finite number or a tensor, got {type(init).__name__} {init!r}"
        ) from None
    return torch.full(shape, value)


def _check_affine(affine: Any) -> torch.Tensor:
    if affine is None:
        return torch.eye(4, dtype=torch.float64)
    if not isinstance(affine, torch.Tensor):
        affine = torch.as_tensor(affine)
    if tuple(affine.shape) != (4, 4):
        raise ValueError(f"affine must be a (4, 4) matrix, got shape {tuple(affine.shape)}")
    a: torch.Tensor = affine.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("affine must be finite")
    return a.clone()


def _flatten(state: Mapping[Any, Any]) -> dict[str, Any]:
    """Nested checkpoint dicts -> one level; a key of a nested dict is not prefixed by it."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, Mapping) and not key.endswith(_EXTRA_KEY):
            for k, v in _flatten(value).items():
                out.setdefault(k, v)
        else:
            out[key] = value
    return out

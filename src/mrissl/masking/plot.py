"""A montage of masked slices: one panel per modality, masked regions shaded (``plot`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mrissl._checks import check_tensor
from mrissl.masking.convert import mask_to_voxels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_masks"]

_AXIS_NAMES = ("depth", "height", "width")


def plot_masks(
    volume: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int | Sequence[int] | None = None,
    *,
    samples: int | Sequence[int] = 0,
    axis: int = 0,
    slice_index: int | None = None,
    modality_names: Sequence[str] | None = None,
    title: str | None = None,
    color: str = "tab:red",
    alpha: float = 0.45,
    path: str | None = None,
) -> Figure:
    """Draw one slice per modality with the masked voxels shaded, as a PNG-ready figure.

    Needs matplotlib (``pip install "mrissl[plot]"``); it is imported when the function is
    called, and no pyplot state is touched, so this works in scripts, notebooks and the
    docs build alike.

    Args:
        volume: ``(B, C, D, H, W)`` volumes (or one case ``(C, D, H, W)``).
        mask: ``(B, C, N)`` token mask with ``patch_size``, or a ``(B, C, D, H, W)`` voxel
            mask (one case: without the batch dimension); True = masked.
        patch_size: the token size of a token mask.
        samples: which cases to draw, one row each.
        axis: the axis the slice is taken across: 0 depth, 1 height, 2 width.
        slice_index: the slice position along ``axis``; the middle slice by default.
        modality_names: column titles; ``"modality c"`` by default.
        title: a title for the whole figure.
        color: the shading colour of masked voxels (any matplotlib colour).
        alpha: the shading opacity, in ``[0, 1]``.
        path: if given, the figure is also saved there (PNG for a ``.png`` path).

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: for mismatched shapes or an out-of-range axis, slice or sample.

    Examples:
        >>> from mrissl.masking import HybridMaskPattern
        >>> x = torch.rand(1, 4, 32, 32, 32)
        >>> mask = HybridMaskPattern()(x, 8, generator=torch.Generator().manual_seed(0))
        >>> fig = plot_masks(x, mask, 8, modality_names=["T1", "T1ce", "T2", "FLAIR"])
        >>> len(fig.axes)
        4
    """
    try:
        from matplotlib.colors import to_rgba
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plot_masks needs matplotlib; install it with pip install "mrissl[plot]"'
        ) from err

    check_tensor(volume, "volume", ndim=(4, 5))
    if volume.ndim == 4:
        volume = volume[None]
        mask = mask[None]
    B, C, D, H, W = volume.shape
    check_tensor(mask, "mask", ndim=(3, 5))
    if mask.ndim == 3:
        if patch_size is None:
            raise ValueError("plot_masks needs patch_size for a token mask")
        mask = mask_to_voxels(mask, patch_size, (D, H, W))
    if mask.shape[0] != B or mask.shape[2:] != volume.shape[2:] or mask.shape[1] not in (1, C):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit volume {tuple(volume.shape)}"
        )
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (depth), 1 (height) or 2 (width), got {axis!r}")
    size = volume.shape[2 + axis]
    index = size // 2 if slice_index is None else slice_index
    if not 0 <= index < size:
        raise ValueError(
            f"slice_index must be in [0, {size}) along {_AXIS_NAMES[axis]}, got {index}"
        )
    rows = [samples] if isinstance(samples, int) else list(samples)
    for b in rows:
        if not 0 <= b < B:
            raise ValueError(f"samples must index the batch of {B}, got {b}")
    names = (
        list(modality_names) if modality_names is not None else [f"modality {c}" for c in range(C)]
    )
    if len(names) != C:
        raise ValueError(f"modality_names must have {C} names, got {len(names)}")

    img = volume.detach().select(2 + axis, index).float().cpu()  # (B, C, h, w)
    shade = mask.detach().select(2 + axis, index).expand(B, C, *img.shape[2:]).cpu()
    rgba: Any = torch.tensor(to_rgba(color, alpha))

    fig = Figure(figsize=(2.2 * C, 2.3 * len(rows) + (0.4 if title else 0.0)), layout="constrained")
    axes = fig.subplots(len(rows), C, squeeze=False)
    for r, b in enumerate(rows):
        for c in range(C):
            ax = axes[r][c]
            ax.imshow(img[b, c].numpy(), cmap="gray", interpolation="nearest")
            overlay = torch.zeros(*img.shape[2:], 4)
            overlay[shade[b, c]] = rgba
            ax.imshow(overlay.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=10)
            if c == 0 and len(rows) > 1:
                ax.set_ylabel(f"case {b}")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig

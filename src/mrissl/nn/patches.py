"""Cut multi-modal volumes into flattened patches and put them back.

Two token layouts are used across mrissl (DESIGN.md, tensor conventions):

* ``"per_modality"``: ``(B, C, D, H, W) -> (B, C, N, p0·p1·p2)``, one token per modality and
  position; the layout of token masks ``(B, C, N)`` and of per-modality reconstruction targets.
* ``"stacked"``: ``(B, C, D, H, W) -> (B, N, C·p0·p1·p2)``, one token per position holding every
  modality (UNETR, E-MIM). Inside a token the modality varies slowest, then depth, height and
  width, which is the order of a ``Conv3d`` weight ``(E, C, p0, p1, p2)`` flattened, so
  ``patchify(x, p, layout="stacked") @ conv.weight.flatten(1).T`` is that convolution.

Tokens are numbered in raster order over the grid ``(D/p0, H/p1, W/p2)``: depth slowest,
width fastest. [`patchify`][mrissl.nn.patchify] and [`unpatchify`][mrissl.nn.unpatchify] are
exact inverses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange

from mrissl._checks import Triple, check_choice, check_tensor, to_triple

__all__ = ["Layout", "grid_size", "patchify", "unpatchify"]

Layout = Literal["per_modality", "stacked"]
_AXES = ("depth", "height", "width")

_PER_MODALITY = "b c (gd pd) (gh ph) (gw pw) -> b c (gd gh gw) (pd ph pw)"
_STACKED = "b c (gd pd) (gh ph) (gw pw) -> b (gd gh gw) (c pd ph pw)"


def grid_size(img_size: int | Sequence[int], patch_size: int | Sequence[int]) -> Triple:
    """Return the token grid ``(D/p0, H/p1, W/p2)`` of a volume, checking divisibility.

    Args:
        img_size: spatial size ``(D, H, W)`` of the volume, or one int for a cube.
        patch_size: patch size ``(p0, p1, p2)``, or one int for cubic patches.

    Returns:
        The number of patches along depth, height and width.

    Raises:
        ValueError: naming the axis whose size the patch size does not divide.

    Examples:
        >>> grid_size((96, 128, 160), 16)
        (6, 8, 10)
        >>> grid_size(96, (16, 16, 8))
        (6, 6, 12)
    """
    size = to_triple(img_size, "img_size")
    patch = to_triple(patch_size, "patch_size")
    for axis, s, p in zip(_AXES, size, patch, strict=True):
        if s % p:
            raise ValueError(
                f"patch_size {patch} does not divide the volume along {axis}: "
                f"{axis} is {s}, which is not a multiple of {p} (volume size {size})"
            )
    return size[0] // patch[0], size[1] // patch[1], size[2] // patch[2]


def patchify(
    volume: torch.Tensor, patch_size: int | Sequence[int], *, layout: Layout = "per_modality"
) -> torch.Tensor:
    """Cut a batch of multi-modal volumes into flattened, non-overlapping patches.

    Args:
        volume: ``(B, C, D, H, W)`` volumes; any dtype, any device.
        patch_size: patch size ``(p0, p1, p2)`` or one int; must divide ``(D, H, W)``.
        layout: ``"per_modality"`` gives ``(B, C, N, p0·p1·p2)``; ``"stacked"`` gives
            ``(B, N, C·p0·p1·p2)`` with the modality slowest inside each token.

    Returns:
        The patches, with ``N = (D/p0)·(H/p1)·(W/p2)`` tokens in raster order.

    Raises:
        ValueError: if ``volume`` is not 5-D or the patch size does not divide an axis.

    Examples:
        >>> x = torch.randn(2, 4, 32, 32, 16)
        >>> patchify(x, 8).shape
        torch.Size([2, 4, 32, 512])
        >>> patchify(x, (8, 8, 4), layout="stacked").shape
        torch.Size([2, 64, 1024])
    """
    check_tensor(volume, "volume", ndim=5)
    check_choice(layout, "layout", ("per_modality", "stacked"))
    p0, p1, p2 = to_triple(patch_size, "patch_size")
    grid_size(volume.shape[2:], (p0, p1, p2))
    pattern = _PER_MODALITY if layout == "per_modality" else _STACKED
    return rearrange(volume, pattern, pd=p0, ph=p1, pw=p2)


def unpatchify(
    patches: torch.Tensor,
    patch_size: int | Sequence[int],
    img_size: int | Sequence[int],
) -> torch.Tensor:
    """Reassemble volumes from flattened patches.

    The exact inverse of [`patchify`][mrissl.nn.patchify].
    The layout is read from the number of dimensions: 4-D input is ``"per_modality"``,
    3-D input is ``"stacked"`` (the number of modalities is then the token length divided
    by ``p0·p1·p2``).

    Args:
        patches: ``(B, C, N, p0·p1·p2)`` or ``(B, N, C·p0·p1·p2)``.
        patch_size: patch size ``(p0, p1, p2)`` or one int.
        img_size: spatial size ``(D, H, W)`` of the volume to rebuild, or one int.

    Returns:
        ``(B, C, D, H, W)`` volumes.

    Raises:
        ValueError: if the number of tokens or the token length does not fit ``img_size`` and
            ``patch_size``.

    Examples:
        >>> x = torch.randn(1, 2, 16, 32, 48)
        >>> tokens = patchify(x, (4, 8, 16))
        >>> torch.equal(unpatchify(tokens, (4, 8, 16), (16, 32, 48)), x)
        True
    """
    check_tensor(patches, "patches", ndim=(3, 4))
    p0, p1, p2 = to_triple(patch_size, "patch_size")
    gd, gh, gw = grid_size(img_size, (p0, p1, p2))
    n_tokens, patch_len = gd * gh * gw, p0 * p1 * p2
    n_axis = 2 if patches.ndim == 4 else 1
    if patches.shape[n_axis] != n_tokens:
        raise ValueError(
            f"patches has {patches.shape[n_axis]} tokens (shape {tuple(patches.shape)}) but "
            f"img_size {to_triple(img_size, 'img_size')} with patch_size {(p0, p1, p2)} "
            f"has a grid of {gd}x{gh}x{gw} = {n_tokens} tokens"
        )
    if patches.ndim == 4:
        if patches.shape[3] != patch_len:
            raise ValueError(
                f"per-modality patches must have length p0*p1*p2 = {patch_len} in their last "
                f"dimension, got shape {tuple(patches.shape)}"
            )
        pattern = "b c (gd gh gw) (pd ph pw) -> b c (gd pd) (gh ph) (gw pw)"
    else:
        if patches.shape[2] % patch_len:
            raise ValueError(
                f"stacked patches must have a length that is a multiple of p0*p1*p2 = "
                f"{patch_len} in their last dimension, got shape {tuple(patches.shape)}"
            )
        pattern = "b (gd gh gw) (c pd ph pw) -> b c (gd pd) (gh ph) (gw pw)"
    return rearrange(patches, pattern, gd=gd, gh=gh, gw=gw, pd=p0, ph=p1, pw=p2)

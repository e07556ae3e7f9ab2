"""timm's ``VisionTransformer`` on 3D volumes: building it, resizing it, dynamic input sizes.

timm assumes 2D images in three places, each covered here:
``timm.create_model(img_size=(D, H, W))`` (use ``embed_layer=PatchEmbed3d.for_timm((D, H, W))``,
[`PatchEmbed3dFactory`][mrissl.nn.PatchEmbed3dFactory]); ``dynamic_img_size=True`` and
``set_input_size`` (resampled in 3D after [`adapt_timm_vit`][mrissl.nn.adapt_timm_vit]); and
``forward_intermediates`` (use [`capture_intermediates`][mrissl.nn.capture_intermediates]).
Nothing here imports or changes timm: [With `timm.create_model`, any box, any input
size][with-timmcreate_model-any-box-any-input-size].
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from mrissl._checks import Triple, to_triple
from mrissl.nn.patch_embed import PatchEmbed3d, _in_timm_create_model, _timm_rejects_img_size
from mrissl.nn.pos_embed import resample_pos_embed_3d

__all__ = ["PatchEmbed3dFactory", "adapt_timm_vit"]


class PatchEmbed3dFactory:
    """A timm ``embed_layer`` that builds [`PatchEmbed3d`][mrissl.nn.PatchEmbed3d] for a 3D size.

    timm calls ``embed_layer(img_size=..., patch_size=..., in_chans=..., embed_dim=..., ...)``
    with its own 2D ``img_size`` (the model's default, such as 224, or the ``img_size`` given to
    ``timm.create_model``). The factory replaces that size by its 3D ``img_size`` and adds its
    other keywords (``layout="per_modality"``, for example); a keyword that timm also passes
    must agree with timm's value. Make one with ``PatchEmbed3d.for_timm(img_size, ...)``.

    Args:
        img_size: the volume size ``(D, H, W)``, or one int.
        **kwargs: further keywords of ``PatchEmbed3d``.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=16,
        ...                         in_chans=4, num_classes=0, embed_dim=48, depth=2,
        ...                         num_heads=4, embed_layer=PatchEmbed3d.for_timm((32, 48, 64)))
        >>> vit.patch_embed.grid_size, vit.pos_embed.shape  # class token + 2·3·4 positions
        ((2, 3, 4), torch.Size([1, 25, 48]))
        >>> vit(torch.randn(1, 4, 32, 48, 64)).shape
        torch.Size([1, 48])
    """

    def __init__(self, img_size: int | Sequence[int], **kwargs: Any) -> None:
        self.img_size: Triple = to_triple(img_size, "img_size")
        if "img_size" in kwargs:
            raise TypeError("give img_size once, as the first argument")
        self.kwargs = dict(kwargs)

    def __call__(self, **timm_kwargs: Any) -> PatchEmbed3d:
        """Build the layer from timm's keywords, with the 3D ``img_size``."""
        timm_size = timm_kwargs.pop("img_size", None)
        if (
            isinstance(timm_size, Sequence)
            and len(timm_size) == 3
            and _in_timm_create_model(sys._getframe(1))
            and _timm_rejects_img_size(timm_size)
        ):
            raise ValueError(
                f"img_size {tuple(timm_size)} given to timm.create_model would be rejected by "
                "timm after building the model (timm records img_size as a 2D (H, W) size); "
                "give the 3D size to PatchEmbed3d.for_timm only and no img_size to create_model"
            )
        if (
            isinstance(timm_size, Sequence)
            and len(timm_size) == 3
            and to_triple(timm_size, "img_size") != self.img_size
        ):
            raise ValueError(
                f"img_size {tuple(timm_size)} given to timm differs from the factory's "
                f"{self.img_size}; give the 3D size to PatchEmbed3d.for_timm only"
            )
        for key, value in self.kwargs.items():
            if key in timm_kwargs and timm_kwargs[key] != value:
                raise ValueError(
                    f"{key}={value!r} given to PatchEmbed3d.for_timm differs from timm's "
                    f"{key}={timm_kwargs[key]!r}; give it in one place"
                )
        return PatchEmbed3d(img_size=self.img_size, **{**timm_kwargs, **self.kwargs})

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"PatchEmbed3d.for_timm({self.img_size}{extra})"


def adapt_timm_vit(vit: nn.Module) -> nn.Module:
    """Make a timm ``VisionTransformer`` built on ``PatchEmbed3d`` resample in 3D.

    Sets, on this model instance only:

    * ``_pos_embed``: with ``dynamic_img_size=True``, the learned position embedding is
      resampled from the built token grid to the grid of each input by
      [`resample_pos_embed_3d`][mrissl.nn.resample_pos_embed_3d] (trilinear), where timm would
      resample it as a 2D image; class and register tokens are handled as timm does.
    * ``set_input_size(img_size)``: changes the built size and resamples the stored position
      embedding in 3D.
    * ``forward_intermediates``: raises ``NotImplementedError`` pointing to
      [`capture_intermediates`][mrissl.nn.capture_intermediates] (timm's version reshapes
      features to 2D maps).

    Args:
        vit: a timm ``VisionTransformer`` (or a model with its ``patch_embed``, ``pos_embed``,
            ``cls_token``, ``reg_token``, ``no_embed_class``, ``num_prefix_tokens`` and
            ``pos_drop`` attributes) whose ``patch_embed`` is a ``PatchEmbed3d``.

    Returns:
        ``vit`` itself.

    Raises:
        TypeError: if ``vit.patch_embed`` is not a ``PatchEmbed3d``.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=8,
        ...                         in_chans=2, num_classes=0, embed_dim=48, depth=2,
        ...                         num_heads=4, dynamic_img_size=True,
        ...                         embed_layer=PatchEmbed3d.for_timm((16, 24, 32)))
        >>> vit = adapt_timm_vit(vit)
        >>> vit.forward_features(torch.randn(1, 2, 16, 24, 32)).shape  # 1 + 2·3·4 tokens
        torch.Size([1, 25, 48])
        >>> vit.forward_features(torch.randn(1, 2, 32, 32, 16)).shape  # 1 + 4·4·2 tokens
        torch.Size([1, 33, 48])
    """
    embed = getattr(vit, "patch_embed", None)
    if not isinstance(embed, PatchEmbed3d):
        raise TypeError(
            f"vit.patch_embed must be a mrissl.nn.PatchEmbed3d, got {type(embed).__name__}"
        )
    object.__setattr__(vit, "_pos_embed", types.MethodType(_pos_embed_3d, vit))
    object.__setattr__(vit, "set_input_size", types.MethodType(_set_input_size_3d, vit))
    object.__setattr__(vit, "forward_intermediates", types.MethodType(_no_intermediates, vit))
    embed.adapted_for_timm = True
    return vit


def _prefix_in_table(vit: Any) -> int:
    """How many prefix tokens the position embedding table holds (0 for ``no_embed_class``)."""
    return 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)


def _pos_embed_3d(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Timm's ``_pos_embed`` with 3D resampling for grid-shaped (dynamic-size) tokens."""
    if x.ndim == 3:  # (B, N, E): the fixed-size path, timm's own code
        return type(self)._pos_embed(self, x)  # type: ignore[no-any-return]
    embed: PatchEmbed3d = self.patch_embed
    grid = (int(x.shape[-4]), int(x.shape[-3]), int(x.shape[-2]))
    B, E = x.shape[0], x.shape[-1]
    x = x.reshape(B, -1, E)  # raster order; per-modality tokens modality-major
    to_cat = []
    if getattr(self, "cls_token", None) is not None:
        to_cat.append(self.cls_token.expand(B, -1, -1))
    if getattr(self, "reg_token", None) is not None:
        to_cat.append(self.reg_token.expand(B, -1, -1))
    if self.pos_embed is None:
        return torch.cat([*to_cat, x], dim=1)
    if embed.grid_size is None:
        raise ValueError("the ViT's PatchEmbed3d has no img_size, so its grid is unknown")
    pos = resample_pos_embed_3d(
        self.pos_embed,
        grid,
        embed.grid_size,
        num_prefix_tokens=_prefix_in_table(self),
        num_groups=embed.tokens_per_position,
    )
    if getattr(self, "no_embed_class", False):
        x = x + pos
        if to_cat:
            x = torch.cat([*to_cat, x], dim=1)
    else:
        if to_cat:
            x = torch.cat([*to_cat, x], dim=1)
        x = x + pos
    return self.pos_drop(x)  # type: ignore[no-any-return]


def _set_input_size_3d(
    self: Any,
    img_size: int | Sequence[int] | None = None,
    patch_size: int | Sequence[int] | None = None,
) -> None:
    """Change the built volume size and resample the position embedding in 3D."""
    embed: PatchEmbed3d = self.patch_embed
    old = embed.grid_size
    embed.set_input_size(img_size=img_size, patch_size=patch_size)
    new = embed.grid_size
    if self.pos_embed is not None and old is not None and new is not None and new != old:
        table = resample_pos_embed_3d(
            self.pos_embed.detach(),
            new,
            old,
            num_prefix_tokens=_prefix_in_table(self),
            num_groups=embed.tokens_per_position,
        )
        self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)


def _no_intermediates(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    raise NotImplementedError(
        "timm's forward_intermediates lays features out as 2D (B, C, H, W) maps and cannot "
        "take a 3D volume; use mrissl.nn.capture_intermediates(vit, blocks) instead, as in "
        "`with capture_intermediates(vit, [3, 6, 9, 12]) as feats: vit(x)` (features "
        "(B, N, E) per block, prefix tokens removed)"
    )

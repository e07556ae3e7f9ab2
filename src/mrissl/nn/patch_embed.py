"""3D patch embedding for vision transformers on multi-modal volumes.

[`PatchEmbed3d`][mrissl.nn.PatchEmbed3d] takes timm's ``PatchEmbed`` keyword names, so it plugs into
``timm.models.vision_transformer.VisionTransformer(embed_layer=PatchEmbed3d, ...)``. It offers
both token layouts: ``"stacked"`` (one token per position, ``(B, C, D, H, W) -> (B, N, E)``)
and ``"per_modality"`` (one token per modality and position, ``(B, C·N, E)``, modality-major).
The projection is computed as a matrix product on the flattened patches while its weight stays
in a ``Conv3d`` named ``proj``: [Equivalence with `Conv3d`][equivalence-with-conv3d].
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from mrissl._checks import (
    Triple,
    check_bool,
    check_choice,
    check_floating,
    check_number,
    check_tensor,
    to_triple,
)
from mrissl.nn.patches import Layout, grid_size, patchify

if TYPE_CHECKING:
    from mrissl.nn.timm_vit import PatchEmbed3dFactory

__all__ = ["PatchEmbed3d"]

_AXES = ("depth", "height", "width")


class PatchEmbed3d(nn.Module):
    """Embed non-overlapping 3D patches of a multi-modal volume as tokens.

    ``tokens = W · patches + b``: a ``Conv3d`` with stride equal to its kernel, computed as a
    matrix product. Inside timm and with other input sizes:
    [Inside a timm `VisionTransformer`][inside-a-timm-visiontransformer].

    Args:
        img_size: spatial size ``(D, H, W)`` the layer is built for, or one int; ``None``
            leaves it open (then ``num_patches`` is unknown and any divisible size is accepted).
        patch_size: patch size ``(p0, p1, p2)`` or one int; anisotropic patches are allowed.
        in_chans: number of modalities ``C``.
        embed_dim: token dimension ``E``.
        norm_layer: optional normalisation applied to each token, called as
            ``norm_layer(embed_dim)`` (for example ``nn.LayerNorm``).
        flatten: return a token sequence (``True``) or the token grid (``False``).
        output_fmt: for a grid output, ``"NCDHW"`` (the default when ``flatten=False``) or
            ``"NDHWC"``; giving it implies ``flatten=False``, as in timm. ``"NHWC"`` (from a
            timm ViT with ``dynamic_img_size=True``) gives ``"NDHWC"`` grids; see
            [`adapt_timm_vit`][mrissl.nn.adapt_timm_vit].
        bias: whether the projection has a bias.
        strict_img_size: require inputs of exactly ``img_size``; when ``False`` any size that
            the patch size divides is accepted.
        dynamic_img_pad: zero-pad inputs at the far end of each axis up to a multiple of the
            patch size instead of rejecting them.
        layout: ``"stacked"`` (one token per position) or ``"per_modality"`` (one token per
            modality and position).
        modality_embed: with ``layout="per_modality"``, add a learnable embedding per modality
            (initialised from a normal distribution with std 0.02, as timm's position embedding).
        shared_proj: with ``layout="per_modality"``, use one projection for every modality
            (``True``) or one per modality (``False``).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        * input: ``(B, C, D, H, W)``.
        * ``layout="stacked"``: ``(B, N, E)``; grid output ``(B, E, gd, gh, gw)`` (NCDHW) or
          ``(B, gd, gh, gw, E)`` (NDHWC).
        * ``layout="per_modality"``: ``(B, C·N, E)``, modality-major; grid output
          ``(B, C, E, gd, gh, gw)`` or ``(B, C, gd, gh, gw, E)``.

    Raises:
        TypeError: for a non-bool flag, or (in ``forward``) a non-floating input or one whose
            dtype differs from the weights outside autocast.
        ValueError: for a bad size, count or choice, and (in ``forward``) an input whose
            modalities or size do not fit the layer.

    Examples:
        >>> embed = PatchEmbed3d(img_size=96, patch_size=16, in_chans=4, embed_dim=96)
        >>> embed(torch.randn(2, 4, 96, 96, 96)).shape
        torch.Size([2, 216, 96])
    """

    def __init__(
        self,
        img_size: int | Sequence[int] | None = 96,
        *,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        flatten: bool = True,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        layout: Layout = "stacked",
        modality_embed: bool = True,
        shared_proj: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        check_number(in_chans, "in_chans", low=1, integer=True)
        check_number(embed_dim, "embed_dim", low=1, integer=True)
        check_choice(layout, "layout", ("stacked", "per_modality"))
        for name, flag in (
            ("flatten", flatten),
            ("bias", bias),
            ("strict_img_size", strict_img_size),
            ("dynamic_img_pad", dynamic_img_pad),
            ("modality_embed", modality_embed),
            ("shared_proj", shared_proj),
        ):
            check_bool(flag, name)
        #: built by a timm ViT with dynamic_img_size=True (output_fmt="NHWC")
        self.timm_dynamic = output_fmt == "NHWC"
        #: set by adapt_timm_vit once the ViT resamples its position embedding in 3D
        self.adapted_for_timm = False
        if output_fmt is not None:
            # "NHWC" comes from timm's dynamic_img_size=True (class docstring)
            check_choice(output_fmt, "output_fmt", ("NCDHW", "NDHWC", "NHWC"))
            flatten = False
        self.patch_size: Triple = to_triple(patch_size, "patch_size")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.layout: Layout = layout
        self.flatten = flatten
        self.output_fmt: Literal["NCDHW", "NDHWC"] = (
            "NDHWC" if output_fmt in ("NDHWC", "NHWC") else "NCDHW"
        )
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.img_size: Triple | None = None
        self.grid_size: Triple | None = None
        self.num_patches: int | None = None
        _check_img_size_from_timm(img_size, sys._getframe(1))
        self.set_input_size(img_size)

        p = self.patch_size
        if layout == "stacked":
            self.proj = nn.Conv3d(in_chans, embed_dim, p, stride=p, bias=bias, **factory)
        elif shared_proj:
            self.proj = nn.Conv3d(1, embed_dim, p, stride=p, bias=bias, **factory)
        else:
            self.proj = nn.Conv3d(
                in_chans, in_chans * embed_dim, p, stride=p, bias=bias, groups=in_chans, **factory
            )
        self.shared_proj = shared_proj
        self.modality_embed: nn.Parameter | None = None
        if layout == "per_modality" and modality_embed:
            self.modality_embed = nn.Parameter(torch.empty(in_chans, embed_dim, **factory))
            nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.norm = norm_layer(embed_dim, **factory) if norm_layer else nn.Identity()

    @classmethod
    def for_timm(cls, img_size: int | Sequence[int], **kwargs: Any) -> PatchEmbed3dFactory:
        """An ``embed_layer`` for ``timm.create_model`` that builds this layer for ``img_size``.

        timm's ``create_model`` records the input size as 2D and rejects ``img_size=(D, H, W)``
        after building the model; give the 3D size here instead (see
        [`PatchEmbed3dFactory`][mrissl.nn.PatchEmbed3dFactory]).

        Args:
            img_size: the volume size ``(D, H, W)``, or one int.
            **kwargs: further keywords of this layer, such as ``layout="per_modality"``.

        Returns:
            The factory to pass as ``embed_layer``.
        """
        from mrissl.nn.timm_vit import PatchEmbed3dFactory

        return PatchEmbed3dFactory(img_size, **kwargs)

    @property
    def tokens_per_position(self) -> int:
        """Tokens at one grid position: 1 for ``"stacked"``, ``C`` for ``"per_modality"``."""
        return 1 if self.layout == "stacked" else self.in_chans

    def set_input_size(
        self,
        img_size: int | Sequence[int] | None = None,
        patch_size: int | Sequence[int] | None = None,
    ) -> None:
        """Change the volume size the layer is built for (timm's ``set_input_size``).

        Args:
            img_size: the new ``(D, H, W)``; ``None`` keeps the current one.
            patch_size: must be ``None`` or the current patch size; resampling 3D patch
                weights is not supported.

        Raises:
            ValueError: if the patch size would change or does not divide ``img_size``.
        """
        if patch_size is not None and to_triple(patch_size, "patch_size") != self.patch_size:
            raise ValueError(
                f"PatchEmbed3d cannot change its patch size after construction "
                f"(built with {self.patch_size}, asked for {patch_size!r}); build a new layer"
            )
        if img_size is None:
            return
        size = to_triple(img_size, "img_size")
        if self.dynamic_img_pad:
            grid = self.dynamic_feat_size(size)
        else:
            grid = grid_size(size, self.patch_size)
        self.img_size = size
        self.grid_size = grid
        self.num_patches = math.prod(grid) * self.tokens_per_position

    def feat_ratio(self, as_scalar: bool = True) -> int | Triple:
        """Downsampling factor from voxels to tokens (timm's ``feat_ratio``)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Sequence[int]) -> Triple:
        """Token grid for a volume of spatial size ``img_size`` (timm's ``dynamic_feat_size``)."""
        size = to_triple(img_size, "img_size")
        if self.dynamic_img_pad:
            g = [math.ceil(s / p) for s, p in zip(size, self.patch_size, strict=True)]
            return g[0], g[1], g[2]
        return grid_size(size, self.patch_size)

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor(x, "x", ndim=5)
        check_floating(x, "x")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"x must have in_chans = {self.in_chans} modalities in dimension 1, "
                f"got shape {tuple(x.shape)}"
            )
        if self.timm_dynamic and not self.adapted_for_timm:
            raise ValueError(
                "this PatchEmbed3d belongs to a timm VisionTransformer built with "
                "dynamic_img_size=True, which would resample its position embedding as a 2D "
                "image; call mrissl.nn.adapt_timm_vit(vit) once after building the model to "
                "resample it in 3D"
            )
        size = tuple(x.shape[2:])
        if self.img_size is not None and self.strict_img_size and size != self.img_size:
            raise ValueError(
                f"x has spatial size {size} but the layer was built for img_size "
                f"{self.img_size}; to accept other sizes, build the layer with "
                f"strict_img_size=False, or, inside a timm VisionTransformer, build the model "
                f"with dynamic_img_size=True and call mrissl.nn.adapt_timm_vit(vit) (timm's "
                f"VisionTransformer does not take strict_img_size)"
            )
        if not self.dynamic_img_pad:
            grid_size(size, self.patch_size)
        weight = self.proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's weights are {weight.dtype}; run it under "
                f"torch.autocast or convert the layer with .to({x.dtype})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed ``x: (B, C, D, H, W)``; see the class docstring for the output shapes."""
        self._check_input(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # the matrix product runs in the autocast dtype anyway; casting before the patch
            # copy halves that copy instead of holding it in float32 and in half precision
            x = x.to(torch.get_autocast_dtype(device_type))
        if self.dynamic_img_pad:
            pads = [(-s) % p for s, p in zip(x.shape[2:], self.patch_size, strict=True)]
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        gd, gh, gw = (s // p for s, p in zip(x.shape[2:], self.patch_size, strict=True))
        if torch.is_grad_enabled() or gd == 1:
            tokens = self._project(patchify(x, self.patch_size, layout=self.layout))
        else:
            tokens = self._project_by_slab(x, (gd, gh, gw))
        if self.modality_embed is not None:  # per-modality layout only
            tokens = tokens + self.modality_embed[:, None, :].to(tokens.dtype)
        tokens = cast(torch.Tensor, self.norm(tokens))
        if self.flatten:
            return tokens.flatten(-3, -2) if self.layout == "per_modality" else tokens
        # (..., N, E) -> (..., gd, gh, gw, E)
        grid = tokens.reshape(*tokens.shape[:-2], gd, gh, gw, tokens.shape[-1])
        if self.output_fmt == "NDHWC":
            return grid
        return grid.movedim(-1, -4)

    def _project(self, patches: torch.Tensor) -> torch.Tensor:
        """Tokens of ``(B, N, C·P)`` stacked or ``(B, C, N, P)`` per-modality patches."""
        weight = self.proj.weight.flatten(1)  # (E_out, C_in·p0·p1·p2)
        bias = self.proj.bias
        if self.layout == "stacked" or self.shared_proj:
            return F.linear(patches, weight, bias)
        w = weight.view(self.in_chans, self.embed_dim, -1)
        tokens = torch.einsum("bcnp,cep->bcne", patches, w.to(patches.dtype))
        if bias is not None:
            tokens = tokens + bias.view(self.in_chans, 1, self.embed_dim).to(tokens.dtype)
        return tokens

    def _project_by_slab(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``_project`` one slab of ``p0`` slices at a time, through one reused patch buffer.

        Without autograd nothing has to keep the patch copy, so only ``1/gd`` of it exists at
        once. The tokens are those of the one-shot path, in the same (raster) order.
        """
        B, C = x.shape[:2]
        gd, gh, gw = grid
        p0, p1, p2 = self.patch_size
        # splitting each axis is a view for any strides (channels-last input included)
        v = x
        for axis, split in ((4, (gw, p2)), (3, (gh, p1)), (2, (gd, p0))):
            v = torch.unflatten(v, axis, split)  # (B, C, gd, p0, gh, p1, gw, p2) at the end
        if self.layout == "stacked":
            # slab i: (B, gh, gw, C, p0, p1, p2) -> (B, gh·gw, C·P)
            slabs = v.permute(2, 0, 4, 6, 1, 3, 5, 7)
            flat: tuple[int, ...] = (B, gh * gw, C * p0 * p1 * p2)  # no -1: B may be 0
        else:
            # slab i: (B, C, gh, gw, p0, p1, p2) -> (B, C, gh·gw, P)
            slabs = v.permute(2, 0, 1, 4, 6, 3, 5, 7)
            flat = (B, C, gh * gw, p0 * p1 * p2)
        buffer = torch.empty(slabs.shape[1:], dtype=x.dtype, device=x.device)
        parts = []
        for i in range(gd):
            buffer.copy_(slabs[i])
            parts.append(self._project(buffer.view(flat)))
        return torch.cat(parts, dim=-2)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``print(module)``."""
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, in_chans={self.in_chans}, "
            f"embed_dim={self.embed_dim}, layout={self.layout!r}, num_patches={self.num_patches}"
        )


_FOR_TIMM = "embed_layer=PatchEmbed3d.for_timm((D, H, W))"


def _in_timm_create_model(caller: FrameType | None) -> bool:
    """True when ``caller`` is timm code running inside ``timm.create_model``."""
    if caller is None or not str(caller.f_globals.get("__name__", "")).startswith("timm."):
        return False
    frame: FrameType | None = caller
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if frame.f_code.co_name == "build_model_with_cfg" and module.startswith("timm."):
            return True
        frame = frame.f_back
    return False


def _timm_rejects_img_size(img_size: Any) -> bool:
    """True when timm's record of the model's input size would reject ``img_size``.

    ``timm.create_model`` builds the model and then stores ``img_size`` with timm's own 2D
    check (``(H, W)`` or one int, timm >= 1.0.20); that same check is asked here, so an older
    timm that stores any size is not refused.
    """
    spatial_size = getattr(sys.modules.get("timm.models._input"), "_spatial_size", None)
    if spatial_size is None:
        return False
    try:
        spatial_size(img_size)
    except (TypeError, ValueError):
        return True
    return False


def _check_img_size_from_timm(img_size: Any, caller: FrameType | None) -> None:
    """Errors that name the working call when timm builds the layer with a size it cannot use.

    ``caller`` is the frame that called ``PatchEmbed3d(...)``: timm's ``VisionTransformer``
    when the layer is its ``embed_layer``. Only the frames are read; timm is not changed.
    """
    if not isinstance(img_size, Sequence) or isinstance(img_size, str):
        return
    if caller is None or not str(caller.f_globals.get("__name__", "")).startswith("timm."):
        return
    size = tuple(img_size)
    if len(size) == 2:  # timm's default (H, W) of the model, or one given as (H, W)
        raise ValueError(
            f"img_size must be (D, H, W) or one int, got the 2D size {size} from timm (the "
            f"img_size given to create_model, or the model's default 2D size when none is "
            f"given); give the volume size through the layer, {_FOR_TIMM}, or img_size=<int> "
            "for a cube"
        )
    if len(size) == 3 and _in_timm_create_model(caller) and _timm_rejects_img_size(size):
        raise ValueError(
            f"timm.create_model(img_size={size}) would build this layer and then reject the "
            f"size, because timm records img_size as a 2D (H, W) size; give the volume size "
            f"through the layer instead, {_FOR_TIMM} with no img_size for create_model "
            f"(here PatchEmbed3d.for_timm({size})), or img_size=<int> for a cube"
        )

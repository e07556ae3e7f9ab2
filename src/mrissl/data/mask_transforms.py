"""MONAI dictionary transforms that draw and apply the masks of [`mrissl.masking`][mrissl.masking].

Masking can run in the data-loader workers instead of the training step: each transform draws
one mask per case, writes it under a key of your choice, and (optionally) writes the masked
image next to the original, which stays untouched as the reconstruction target.

The transforms work on single cases, ``(C, D, H, W)`` images, as MONAI transforms do; the
mask is ``(C, N)`` bool, True = masked. Randomness comes from MONAI's per-transform
``RandomState`` (``set_random_state``, ``monai.utils.set_determinism``), from which every call
seeds a ``torch.Generator``, so a seeded pipeline gives the same masks on every run. In any
data loader, MONAI's or a plain ``torch.utils.data.DataLoader``, every worker and every epoch
draws its own masks: where no ``worker_init_fn`` set the state in the worker, the transform
derives it from PyTorch's seed of that worker.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import torch
from monai.config.type_definitions import KeysCollection
from monai.transforms.transform import MapTransform
from monai.utils.type_conversion import convert_to_tensor

from mrissl.data._worker_seed import WorkerSeeded
from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    MaskGenerator,
    ModalMask,
    PatchMask,
    PositionMask,
    RandomTokenMask,
    apply_mask,
    cross_modal_fill,
)
from mrissl.masking.fill import Fill

__all__ = ["RandBlockMaskd", "RandHybridMaskd", "RandMaskd", "RandTokenMaskd"]


class RandMaskd(WorkerSeeded, MapTransform):
    """Draw a token mask with any [`MaskGenerator`][mrissl.masking.MaskGenerator] and apply it.

    One mask is drawn per call from the first key's image and shared by every key (use one
    key per view that needs its own mask, in separate transforms).

    Args:
        keys: the images to mask, each ``(C, D, H, W)``.
        mask_generator: the generator, for example ``HybridMaskPattern()``.
        patch_size: the token size; ``None`` is allowed for a ``BlockMask`` (its block size).
        mask_key: where the ``(C, N)`` bool mask is written.
        masked_postfix: the masked image of ``key`` is written to ``key + masked_postfix``;
            ``None`` writes the mask only.
        fill: the fill of [`apply_mask`][mrissl.masking.apply_mask] (a number, ``"mean"``,
            ``"noise"`` or a tensor of the image's shape).
        available_key: a key holding a ``(C,)`` bool tensor, True = modality present;
            ``None`` means all present.
        allow_missing_keys: do not raise for keys missing from the data.

    Examples:
        >>> from mrissl.masking import RandomTokenMask
        >>> t = RandMaskd("image", mask_generator=RandomTokenMask(0.5), patch_size=8)
        >>> t = t.set_random_state(0)
        >>> out = t({"image": torch.rand(2, 16, 16, 16)})
        >>> out["mask"].shape, out["image_masked"].shape, int(out["mask"].sum())
        (torch.Size([2, 8]), torch.Size([2, 16, 16, 16]), 8)
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        mask_generator: MaskGenerator,
        patch_size: int | Sequence[int] | None = None,
        mask_key: str = "mask",
        masked_postfix: str | None = "_masked",
        fill: Fill = 0.0,
        available_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not isinstance(mask_generator, MaskGenerator):
            raise TypeError(
                f"mask_generator must be a mrissl.masking.MaskGenerator, got "
                f"{type(mask_generator).__name__}"
            )
        self.mask_generator = mask_generator
        self.patch_size = patch_size
        self.mask_key = mask_key
        self.masked_postfix = masked_postfix
        self.fill = fill
        self.available_key = available_key

    def _available(self, d: Mapping[Hashable, Any]) -> torch.Tensor | None:
        if self.available_key is None:
            return None
        avail = convert_to_tensor(d[self.available_key], track_meta=False)
        if not isinstance(avail, torch.Tensor) or avail.ndim != 1:
            raise ValueError(
                f"data[{self.available_key!r}] must be a (C,) bool tensor, got "
                f"{getattr(avail, 'shape', type(avail))}"
            )
        return avail.to(torch.bool)[None]

    def _fill_volume(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        available: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The masked ``(1, C, D, H, W)`` image and any extra outputs to store."""
        patch = self.patch_size if self.patch_size is not None else _default_patch(self)
        return apply_mask(image, mask, patch, self.fill, generator=generator), {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Draw one mask, store it and the masked images."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize()
        generator = torch.Generator().manual_seed(self._seed)
        available = self._available(d)
        first = convert_to_tensor(d[keys[0]], track_meta=False)
        if not isinstance(first, torch.Tensor) or first.ndim != 4:
            raise ValueError(
                f"data[{keys[0]!r}] must be a (C, D, H, W) image, got "
                f"{getattr(first, 'shape', type(first))}"
            )
        mask = self.mask_generator(
            first[None], self.patch_size, available=available, generator=generator
        )
        d[self.mask_key] = mask[0]
        if self.masked_postfix is None:
            return d
        for key in keys:
            image = convert_to_tensor(d[key], track_meta=False)
            if not image.is_floating_point():
                image = image.float()
            masked, extra = self._fill_volume(image[None], mask, available, generator)
            d[f"{key}{self.masked_postfix}"] = masked[0]
            d.update(extra)
        return d


def _default_patch(t: RandMaskd) -> Any:
    gen = t.mask_generator
    return gen.block_size if isinstance(gen, BlockMask) else None


class RandHybridMaskd(RandMaskd):
    """E-MIM's hybrid mask pattern as a MONAI dictionary transform.

    The step arguments are those of [`HybridMaskPattern`][mrissl.masking.HybridMaskPattern]
    (``None`` switches a step off); the other arguments are those of
    [`RandMaskd`][mrissl.data.mask_transforms.RandMaskd].

    Examples:
        >>> t = RandHybridMaskd("image", patch_size=8, mask_key="hmp").set_random_state(0)
        >>> out = t({"image": torch.rand(4, 16, 16, 16)})
        >>> out["hmp"].shape, out["hmp"].float().mean().item()
        (torch.Size([4, 8]), 0.8125)
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        patch_size: int | Sequence[int] = 16,
        modal: ModalMask | int | None = 1,
        position: PositionMask | float | None = 0.5,
        patch: PatchMask | float | None = 0.5,
        **kwargs: Any,
    ) -> None:
        gen = HybridMaskPattern(modal, position=position, patch=patch)
        super().__init__(keys, mask_generator=gen, patch_size=patch_size, **kwargs)


class RandTokenMaskd(RandMaskd):
    """MAE masking ([`RandomTokenMask`][mrissl.masking.RandomTokenMask]) as a MONAI transform.

    Examples:
        >>> t = RandTokenMaskd("image", patch_size=8, mask_ratio=0.75).set_random_state(0)
        >>> int(t({"image": torch.rand(1, 16, 16, 16)})["mask"].sum())
        6
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        patch_size: int | Sequence[int] = 16,
        mask_ratio: float = 0.75,
        shared_across_modalities: bool = True,
        **kwargs: Any,
    ) -> None:
        gen = RandomTokenMask(mask_ratio, shared_across_modalities=shared_across_modalities)
        super().__init__(keys, mask_generator=gen, patch_size=patch_size, **kwargs)


class RandBlockMaskd(RandMaskd):
    """BrainMVP block masking with cross-modal fill as a MONAI dictionary transform.

    Draws a [`BlockMask`][mrissl.masking.BlockMask] (``(C, N)`` over the r³ blocks) and, with
    the default ``fill="cross_modal"``, fills the masked blocks of each modality from another
    present modality of the case ([`cross_modal_fill`][mrissl.masking.cross_modal_fill]),
    writing the ``(C,)`` source indices under ``source_key``. Any fill of
    [`apply_mask`][mrissl.masking.apply_mask] may be given instead.

    Examples:
        >>> t = RandBlockMaskd("image", block_size=8, mask_ratio=0.5).set_random_state(0)
        >>> out = t({"image": torch.rand(3, 16, 16, 16)})
        >>> out["mask"].sum(dim=1).tolist(), out["mask_source"].shape
        ([4, 4, 4], torch.Size([3]))
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        block_size: int | Sequence[int] = 8,
        mask_ratio: float = 0.875,
        fill: Fill | Literal["cross_modal"] = "cross_modal",
        source_key: str = "mask_source",
        shared_across_modalities: bool = False,
        **kwargs: Any,
    ) -> None:
        gen = BlockMask(
            block_size, mask_ratio=mask_ratio, shared_across_modalities=shared_across_modalities
        )
        plain: Fill = 0.0 if isinstance(fill, str) and fill == "cross_modal" else fill
        super().__init__(keys, mask_generator=gen, patch_size=gen.block_size, fill=plain, **kwargs)
        self.cross_modal = isinstance(fill, str) and fill == "cross_modal"
        self.source_key = source_key

    def _fill_volume(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        available: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.cross_modal:
            return super()._fill_volume(image, mask, available, generator)
        filled, source = cross_modal_fill(
            image, mask, self.patch_size, available=available, generator=generator
        )
        return filled, {self.source_key: source[0]}

"""BrainMVP's downstream template mix as a MONAI dictionary transform.

[`TemplateMixd`][mrissl.data.template_transforms.TemplateMixd] runs
[`TemplateMix`][mrissl.templates.TemplateMix] on one case ``(C, D, H, W)`` in the data-loader
workers and writes the two copies next to the original. Randomness comes from MONAI's
per-transform ``RandomState`` (``set_random_state``, ``monai.utils.set_determinism``), from
which every call seeds a ``torch.Generator``; in a plain ``torch.utils.data.DataLoader`` each
worker derives its own state from PyTorch's seed of that worker, so workers and epochs differ.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import torch
from monai.config.type_definitions import KeysCollection
from monai.transforms.transform import MapTransform
from monai.utils.type_conversion import convert_to_tensor

from mrissl.data._worker_seed import WorkerSeeded
from mrissl.masking import BlockMask
from mrissl.templates import ModalityTemplates, TemplateMix

__all__ = ["TemplateMixd"]


class TemplateMixd(WorkerSeeded, MapTransform):
    """Two copies of a case with some modalities replaced by frozen templates (BrainMVP supp. A).

    For each key, ``key + postfixes[0]`` and ``key + postfixes[1]`` receive the copies
    ``X'`` and ``X''`` (each ``(C, D, H, W)``, like the image); ``replaced_key`` receives the
    ``(2, C)`` bool choice (row 0: ``X'``). One draw per call is shared by all keys.

    Args:
        keys: the images, each ``(C, D, H, W)`` with channels in ``modalities`` order.
        templates: the learned [`ModalityTemplates`][mrissl.templates.ModalityTemplates].
        modalities: the modality of each channel (any known spelling).
        max_replaced: see [`TemplateMix`][mrissl.templates.TemplateMix].
        min_replaced: see [`TemplateMix`][mrissl.templates.TemplateMix].
        counts: ``"different"`` (default, BrainMVP supplement A: the two copies replace
            different numbers of modalities) or ``"independent"``; see
            [`TemplateMix`][mrissl.templates.TemplateMix].
        block_mask: the single-modality variant's [`BlockMask`][mrissl.masking.BlockMask].
        postfixes: where the two copies go.
        replaced_key: where the ``(2, C)`` choice goes.
        available_key: a key holding a ``(C,)`` bool tensor, True = modality present.
        offset_key: a key holding the ``(3,)`` start of the image in the template canvas;
            ``None`` centres it.
        allow_missing_keys: do not raise for keys missing from the data.

    Examples:
        >>> t = ModalityTemplates(["t1", "t2", "flair"], shape=24, init=-1.0)
        >>> mix = TemplateMixd("image", templates=t, modalities=["t1", "t2", "flair"])
        >>> mix = mix.set_random_state(0)
        >>> out = mix({"image": torch.rand(3, 16, 16, 16)})
        >>> out["image_view1"].shape, out["replaced"].shape
        (torch.Size([3, 16, 16, 16]), torch.Size([2, 3]))
        >>> bool((out["image_view1"][out["replaced"][0]] == -1).all())
        True
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        templates: ModalityTemplates,
        modalities: Sequence[str],
        max_replaced: int | None = None,
        min_replaced: int = 1,
        counts: Literal["different", "independent"] = "different",
        block_mask: BlockMask | None = None,
        postfixes: tuple[str, str] = ("_view1", "_view2"),
        replaced_key: str = "replaced",
        available_key: str | None = None,
        offset_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mix = TemplateMix(
            templates,
            modalities=modalities,
            max_replaced=max_replaced,
            min_replaced=min_replaced,
            counts=counts,
            block_mask=block_mask,
        )
        if len(postfixes) != 2 or postfixes[0] == postfixes[1]:
            raise ValueError(f"postfixes must be two different strings, got {postfixes!r}")
        self.postfixes = postfixes
        self.replaced_key = replaced_key
        self.available_key = available_key
        self.offset_key = offset_key

    def _optional(self, d: Mapping[Hashable, Any], key: str | None, shape: str) -> Any:
        if key is None:
            return None
        value = convert_to_tensor(d[key], track_meta=False)
        if not isinstance(value, torch.Tensor) or value.ndim != 1:
            raise ValueError(
                f"data[{key!r}] must be a {shape} tensor, got {getattr(value, 'shape', value)}"
            )
        return value

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Make the two copies of every key's image."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize()
        available = self._optional(d, self.available_key, "(C,) bool")
        offsets = self._optional(d, self.offset_key, "(3,) int")
        for key in keys:
            image = convert_to_tensor(d[key], track_meta=False)
            if not isinstance(image, torch.Tensor) or image.ndim != 4:
                raise ValueError(
                    f"data[{key!r}] must be a (C, D, H, W) image, got "
                    f"{getattr(image, 'shape', type(image))}"
                )
            if not image.is_floating_point():
                image = image.float()
            generator = torch.Generator().manual_seed(self._seed)  # the same draw for each key
            first, second = self.mix(
                image[None],
                available=None if available is None else available.to(torch.bool)[None],
                offsets=offsets,
                generator=generator,
            )
            d[f"{key}{self.postfixes[0]}"] = first.volume[0]
            d[f"{key}{self.postfixes[1]}"] = second.volume[0]
            d[self.replaced_key] = torch.stack([first.replaced[0], second.replaced[0]])
        return d

"""The papers' preprocessing as a MONAI dictionary pipeline.

BrainMVP (supplement B) prepares every pretraining case the same way: reorient to RAS, resample
to 1 mm isotropic voxels with bilinear interpolation, clip intensities at the 1st and 99th
percentiles and rescale them to [0, 1], then cut 96³ crops. Its downstream tasks (supplement,
implementation details) use the 5th and 95th percentiles and crop the foreground first.
[`preprocessing`][mrissl.data.preprocessing] builds that pipeline from stock MONAI transforms,
one argument per step, and [`LoadCased`][mrissl.data.LoadCased] puts
[`load_case`][mrissl.data.load_case] (with its checks) in front of it. The defaults mix the two
recipes: the percentiles are the pretraining ones, the foreground crop is the downstream one
(the function's docstring says which default comes from where).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import (
    CenterSpatialCropd,
    CropForegroundd,
    RandSpatialCropd,
    SpatialPadd,
)
from monai.transforms.spatial.dictionary import Orientationd, Spacingd
from monai.transforms.transform import MapTransform

from mrissl._checks import to_triple
from mrissl.data._percentiles import Percentiles, percentile_pair
from mrissl.data.nifti import load_case

__all__ = ["LoadCased", "Percentiles", "percentile_pair", "preprocessing"]


class LoadCased(MapTransform):
    """Replace a mapping of NIfTI paths by the loaded multi-modal ``MetaTensor``.

    For each key, ``data[key]`` is a mapping modality → NIfTI path (a
    [`CaseFiles`][mrissl.data.CaseFiles]'s ``paths``); it becomes a ``(C, D, H, W)``
    ``monai.data.MetaTensor`` carrying the affine, read by
    [`load_case`][mrissl.data.load_case] with all of its checks. The modality names are kept
    in the meta-data under ``"modalities"``.

    Args:
        keys: keys of the data dictionary to load.
        allow_missing_keys: skip keys absent from the dictionary instead of raising.
        **load_kwargs: keyword arguments of [`load_case`][mrissl.data.load_case]
            (``dtype``, ``affine_atol``, ``nan_policy``).

    Examples:
        >>> import nibabel as nib, numpy as np, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> vol = nib.Nifti1Image(np.ones((6, 7, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
        >>> nib.save(vol, folder / "t1.nii.gz"); nib.save(vol, folder / "t2.nii.gz")
        >>> item = LoadCased("image")({"image": {"t1": folder / "t1.nii.gz",
        ...                                      "t2": folder / "t2.nii.gz"}})
        >>> item["image"].shape, item["image"].pixdim.tolist(), item["image"].meta["modalities"]
        (torch.Size([2, 6, 7, 8]), [2.0, 2.0, 2.0], ['t1', 't2'])
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        *,
        allow_missing_keys: bool = False,
        **load_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.load_kwargs = load_kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load every key's files; the other entries are passed through unchanged."""
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key]
            if not isinstance(paths, Mapping):
                raise TypeError(
                    f"LoadCased expects data[{key!r}] to be a mapping of modality name to NIfTI "
                    f"path, got {type(paths).__name__}"
                )
            image, affine = load_case(paths, **self.load_kwargs)
            first = next(iter(paths.values()))
            d[key] = MetaTensor(
                image,
                affine=affine,
                meta={
                    "modalities": list(paths),
                    "filename_or_obj": os.fspath(first),
                },
            )
        return d


class _ScalePercentilesd(MapTransform):
    """Per channel: clip at two percentiles and map them to [0, 1].

    As MONAI's ``ScaleIntensityRangePercentilesd(lower, upper, b_min=0, b_max=1, clip=True,
    channel_wise=True)``, with both percentiles from one selection (no full sort).
    """

    def __init__(self, keys: Sequence[str], lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, torch.Tensor):
                img = torch.as_tensor(np.asarray(img))
            out = img.to(torch.float32).clone() if img.dtype != torch.float32 else img.clone()
            plain = out.as_tensor() if isinstance(out, MetaTensor) else out
            for c in range(plain.shape[0]):
                a_min, a_max = percentile_pair(img[c], self.lower, self.upper)
                channel = plain[c]
                if a_max - a_min == 0.0:  # MONAI's rule: shift only, no clip
                    channel.sub_(a_min)
                else:
                    channel.sub_(a_min).div_(a_max - a_min).clamp_(0.0, 1.0)
            d[key] = out
        return d


class _Compact(MapTransform):
    """Copy a crop that is a view of a larger tensor, so the uncropped volume can be freed."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, torch.Tensor) and (
                img.untyped_storage().nbytes() > img.numel() * img.element_size()
                or not img.is_contiguous()
            ):
                d[key] = img.clone(memory_format=torch.contiguous_format)
        return d


class _Pipeline(Compose):
    """MONAI's ``Compose`` that lets our own errors through.

    ``Compose`` wraps every exception of a transform in ``RuntimeError("applying transform
    <...>")``; the message the user needs (the file, what is wrong) is in the cause.
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause: BaseException = err
            while (
                isinstance(cause, RuntimeError)
                and str(cause).startswith("applying transform")
                and cause.__cause__ is not None
            ):
                cause = cause.__cause__
            if cause is err:
                raise
            raise cause from None


def _above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return x > threshold


def preprocessing(
    keys: str | Sequence[str] = "image",
    *,
    load: bool = False,
    orientation: str | None = "RAS",
    spacing: float | Sequence[float] | None = 1.0,
    interpolation: Literal["bilinear", "nearest"] = "bilinear",
    percentiles: tuple[float, float] | None = (1.0, 99.0),
    crop_foreground: bool = True,
    foreground_threshold: float = 0.0,
    roi_size: int | Sequence[int] | None = 96,
    crop: Literal["random", "center"] = "random",
) -> Compose:
    """Build the papers' preprocessing pipeline as a MONAI ``Compose`` of dictionary transforms.

    The steps, in order (each can be switched off with ``None`` or ``False``). Each default
    names the BrainMVP recipe it comes from; they are not all from the same one:

    * pretraining (supplement B): ``preprocessing(percentiles=(1, 99), crop_foreground=False)``;
    * downstream (supplement, implementation details):
      ``preprocessing(percentiles=(5, 95), crop_foreground=True)``.

    1. ``load``: [`LoadCased`][mrissl.data.LoadCased], from a mapping modality → NIfTI path
       to a ``(C, D, H, W)`` ``MetaTensor`` (off by default: the input may already be one).
    2. ``orientation``: ``Orientationd`` to these axis codes (both recipes: RAS).
    3. ``spacing``: ``Spacingd`` to this voxel size in mm with ``interpolation``
       (both recipes: 1 mm isotropic, bilinear).
    4. ``percentiles``: per channel, clip at the lower and upper percentiles of all voxels
       and map them to 0 and 1 (default ``(1, 99)``: the **pretraining** recipe; downstream
       uses ``(5, 95)``). The result equals MONAI's ``ScaleIntensityRangePercentilesd(lower,
       upper, b_min=0, b_max=1, clip=True, channel_wise=True)``; both percentiles come from one
       selection ([`percentile_pair`][mrissl.data.percentile_pair]) instead of two full sorts.
    5. ``crop_foreground``: ``CropForegroundd`` to the box of voxels above
       ``foreground_threshold`` in any channel (default on: the **downstream** recipe;
       pretraining crops around foreground or background voxels instead).
    6. ``roi_size``: ``SpatialPadd`` with zeros up to ``roi_size`` where the volume is smaller,
       then a ``roi_size`` crop, random (``RandSpatialCropd``, for training) or centred
       (``CenterSpatialCropd``, for evaluation). Default 96³: the **pretraining** crop (the
       downstream crop size is not legible in the supplement's text). The crop is copied out
       of the uncropped volume, so that volume is freed once the pipeline returns.

    An error in any step (an unreadable file, two modalities on different grids) is raised
    as itself, naming the file, not wrapped in MONAI's ``RuntimeError("applying transform
    ...")``.

    Every key in ``keys`` is an image and goes through every step; the random crop takes the
    same box in all of them. For reproducible random crops call ``set_random_state(seed)`` on
    the returned pipeline (MONAI keeps its own random state and never touches the global one).

    Args:
        keys: the data dictionary's image keys, each ``(C, D, H, W)`` (a ``MetaTensor`` with
            its affine, a tensor taken to have an identity affine, or with ``load=True`` a
            mapping modality → NIfTI path).
        load: put [`LoadCased`][mrissl.data.LoadCased] in front.
        orientation: axis codes such as ``"RAS"``, or ``None`` to keep the orientation.
        spacing: target voxel size in mm (one number or three), or ``None`` not to resample.
        interpolation: resampling mode.
        percentiles: ``(lower, upper)`` percentiles in [0, 100] for clipping and rescaling to
            [0, 1], or ``None`` to keep intensities.
        crop_foreground: crop to the foreground box first.
        foreground_threshold: intensity above which a voxel is foreground (after rescaling).
        roi_size: size of the final crop (one int or three), or ``None`` for no crop.
        crop: ``"random"`` or ``"center"``.

    Returns:
        A ``monai.transforms.Compose``; applied to ``{"image": ...}`` it returns the dictionary
        with ``image`` of shape ``(C, *roi_size)``.

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: for out-of-range percentiles, sizes or an unknown crop mode.

    Examples:
        >>> from monai.data import MetaTensor
        >>> volume = torch.rand(2, 60, 50, 40) * 1000  # (C, D, H, W), 2 mm voxels
        >>> item = {"image": MetaTensor(volume, affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))}
        >>> pipeline = preprocessing(roi_size=64)
        >>> _ = pipeline.set_random_state(seed=0)
        >>> out = pipeline(item)["image"]
        >>> out.shape, out.pixdim.tolist()  # resampled to 1 mm, then a 64³ crop
        (torch.Size([2, 64, 64, 64]), [1.0, 1.0, 1.0])
        >>> bool(out.min() >= 0.0) and bool(out.max() <= 1.0)
        True
    """
    key_list = [keys] if isinstance(keys, str) else list(keys)
    if not key_list or not all(isinstance(k, str) for k in key_list):
        raise TypeError(f"keys must be a string or a non-empty sequence of strings, got {keys!r}")
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    if crop not in ("random", "center"):
        raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
    if orientation is not None and (
        not isinstance(orientation, str)
        or len(orientation) != 3
        or sorted(orientation.upper().translate(str.maketrans("LPI", "RAS"))) != ["A", "R", "S"]
    ):
        raise ValueError(
            f"orientation must be three axis codes, one of R/L, A/P, S/I each, such as 'RAS', "
            f"got {orientation!r}"
        )

    transforms: list[Any] = []
    if load:
        transforms.append(LoadCased(key_list))
    if orientation is not None:
        # labels given explicitly: MONAI is changing their default to the MetaTensor's space
        labels = (("L", "R"), ("P", "A"), ("I", "S"))
        transforms.append(Orientationd(key_list, axcodes=orientation.upper(), labels=labels))
    if spacing is not None:
        pixdim = _spacing(spacing)
        transforms.append(Spacingd(key_list, pixdim=pixdim, mode=interpolation))
    if percentiles is not None:
        lower, upper = _percentiles(percentiles)
        # MONAI's ScaleIntensityRangePercentilesd(lower, upper, b_min=0, b_max=1, clip=True,
        # channel_wise=True), with both percentiles from one selection instead of two sorts
        transforms.append(_ScalePercentilesd(key_list, lower, upper))
    if crop_foreground:
        transforms.append(
            CropForegroundd(
                key_list,
                source_key=key_list[0],
                select_fn=functools.partial(_above, threshold=float(foreground_threshold)),
                allow_smaller=True,
            )
        )
    if roi_size is not None:
        roi = to_triple(roi_size, "roi_size")
        transforms.append(SpatialPadd(key_list, spatial_size=roi))
        if crop == "random":
            transforms.append(RandSpatialCropd(key_list, roi_size=roi, random_size=False))
        else:
            transforms.append(CenterSpatialCropd(key_list, roi_size=roi))
    if transforms:  # a crop must not keep its uncropped volume alive
        transforms.append(_Compact(key_list))
    return _Pipeline(transforms)


def _spacing(spacing: Any) -> tuple[float, float, float]:
    if isinstance(spacing, bool):
        raise TypeError(f"spacing must be a number or three numbers, got {spacing!r}")
    values = (
        (spacing, spacing, spacing)
        if isinstance(spacing, int | float)
        else tuple(spacing)
        if isinstance(spacing, Sequence)
        else None
    )
    if values is None or len(values) != 3:
        raise TypeError(f"spacing must be a number or three numbers (mm), got {spacing!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"spacing must be positive (mm), got {spacing!r}")
    return float(values[0]), float(values[1]), float(values[2])


def _percentiles(percentiles: Any) -> tuple[float, float]:
    if not isinstance(percentiles, Sequence) or len(percentiles) != 2:
        raise TypeError(f"percentiles must be a (lower, upper) pair, got {percentiles!r}")
    lower, upper = percentiles
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lower, upper)):
        raise TypeError(f"percentiles must be numbers, got {percentiles!r}")
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {percentiles!r}")
    return float(lower), float(upper)

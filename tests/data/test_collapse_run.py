from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from mrissl.data import CaseFiles, preprocessing
from mrissl.data.collapse_run import CaseCrops, _center_crop_fast


def _case(tmp_path, shape, affine, dtype, seed, box):
    rng = np.random.default_rng(seed)
    paths = {}
    for name in ("t1", "flair"):
        data = np.zeros(shape, dtype=np.float32)
        region = tuple(slice(lo, hi) for lo, hi in box)
        data[region] = rng.random(tuple(hi - lo for lo, hi in box)) * 900 + 50
        data[region][::3] = 7.0  # ties
        paths[name] = tmp_path / f"s{seed}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.rint(data).astype(dtype), affine), paths[name])
    return paths


@pytest.mark.parametrize(
    ("shape", "signs", "dtype", "box", "crop"),
    [
        ((40, 36, 30), (-1, -1, 1), np.int16, ((3, 33), (5, 31), (2, 29)), 16),  # BraTS-like
        ((40, 36, 30), (1, 1, 1), np.int16, ((0, 40), (9, 20), (1, 30)), 24),  # pads one axis
        ((21, 30, 26), (1, -1, -1), np.float32, ((4, 17), (2, 29), (6, 21)), 20),  # odd sizes
        ((20, 20, 20), (-1, 1, -1), np.uint8, ((0, 0), (0, 0), (0, 0)), 8),  # no foreground
    ],
)
def test_fast_centre_crop_equals_the_pipeline(tmp_path, shape, signs, dtype, box, crop):
    affine = np.diag([*map(float, signs), 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.0]
    paths = _case(tmp_path, shape, affine, dtype, 1, box)
    fast = _center_crop_fast(paths, crop)
    assert fast is not None
    reference = preprocessing(load=True, crop="center", roi_size=crop)({"image": paths})["image"]
    assert fast.shape == reference.shape
    assert float((fast - reference.as_tensor()).abs().max()) == 0.0


def test_fast_path_declines_resampling(tmp_path):
    paths = _case(tmp_path, (20, 20, 20), np.diag([2.0, 1.0, 1.0, 1.0]), np.int16, 2,
                  ((2, 18), (2, 18), (2, 18)))  # fmt: skip
    assert _center_crop_fast(paths, 8) is None
    item = CaseCrops([CaseFiles("s2", paths)], modalities=["t1", "flair"], crop=8)[0]
    reference = preprocessing(load=True, crop="center", roi_size=8)({"image": paths})["image"]
    torch.testing.assert_close(item["image"], reference.as_tensor(), rtol=0, atol=0)


def test_fast_centre_crop_uses_the_union_of_the_modalities_foregrounds(tmp_path):
    # t1's head sits low on every axis, flair's high: the box is the hull of both
    rng = np.random.default_rng(5)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    paths = {}
    for name, box in (
        ("t1", ((2, 20), (4, 15), (1, 12))),
        ("flair", ((10, 37), (12, 33), (9, 28))),
    ):
        data = np.zeros((40, 36, 30), dtype=np.int16)
        region = tuple(slice(lo, hi) for lo, hi in box)
        data[region] = rng.integers(30, 900, tuple(hi - lo for lo, hi in box))
        paths[name] = tmp_path / f"u_{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), paths[name])
    fast = _center_crop_fast(paths, 24)
    assert fast is not None
    reference = preprocessing(load=True, crop="center", roi_size=24)({"image": paths})["image"]
    assert float((fast - reference.as_tensor()).abs().max()) == 0.0

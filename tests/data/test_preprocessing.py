from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from mrissl.data import LoadCased, preprocessing


def _write_case(folder, data, affine):
    paths = {}
    for c, name in enumerate(("t1", "flair")):
        paths[name] = folder / f"case_{name}.nii.gz"
        nib.save(nib.Nifti1Image(data[c], affine), paths[name])
    return paths


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    data = np.zeros((2, 30, 26, 22), np.float32)
    data[:, 5:25, 4:22, 3:19] = rng.random((2, 20, 18, 16)) * 500 + 100  # head in air
    return data


def test_nifti_to_ras_1mm_unit_range_fixed_crop(tmp_path, volume):
    # LPS-like storage with 2 mm voxels: x and y axes flipped
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    paths = _write_case(tmp_path, volume, affine)
    pipeline = preprocessing(load=True, roi_size=24)
    pipeline.set_random_state(seed=0)
    out = pipeline({"image": paths})["image"]
    assert isinstance(out, MetaTensor)
    assert out.shape == (2, 24, 24, 24)
    np.testing.assert_allclose(out.pixdim.numpy(), [1.0, 1.0, 1.0])
    assert np.all(np.diag(out.affine.numpy())[:3] > 0)  # RAS: all axes increasing
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0
    assert out.meta["modalities"] == ["t1", "flair"]


def test_percentile_scaling_matches_numpy(volume):
    pipeline = preprocessing(
        orientation=None, spacing=None, crop_foreground=False, roi_size=None, percentiles=(5, 95)
    )
    out = pipeline({"image": torch.from_numpy(volume)})["image"]
    for c in range(2):
        lo, hi = np.percentile(volume[c], [5, 95])
        expected = np.clip((volume[c] - lo) / (hi - lo), 0.0, 1.0)
        np.testing.assert_allclose(np.asarray(out[c]), expected, atol=1e-5)


def test_orientation_flips_to_ras(volume):
    image = MetaTensor(torch.from_numpy(volume), affine=torch.diag(torch.tensor([-1.0, 1, 1, 1])))
    pipeline = preprocessing(spacing=None, percentiles=None, crop_foreground=False, roi_size=None)
    out = pipeline({"image": image})["image"]
    np.testing.assert_array_equal(np.asarray(out), volume[:, ::-1])


def test_foreground_crop_then_pad_and_centre_crop(volume):
    common = dict(orientation=None, spacing=None, percentiles=None)
    out = preprocessing(**common, roi_size=None)({"image": torch.from_numpy(volume)})["image"]
    assert out.shape == (2, 20, 18, 16)  # the box around the non-zero voxels
    out = preprocessing(**common, roi_size=(24, 10, 16), crop="center")(
        {"image": torch.from_numpy(volume)}
    )["image"]
    assert out.shape == (2, 24, 10, 16)
    # padded with zeros along depth (20 -> 24), centre 10 of 18 along height
    np.testing.assert_array_equal(np.asarray(out[:, 2:22]), volume[:, 5:25, 8:18, 3:19])
    assert float(out[:, :2].abs().max()) == 0.0


def test_random_crop_is_reproducible_and_shared_by_keys(volume):
    def run(seed):
        pipeline = preprocessing(("a", "b"), orientation=None, spacing=None, roi_size=8)
        pipeline.set_random_state(seed=seed)
        x = torch.from_numpy(volume)
        return pipeline({"a": x, "b": x.clone()})

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first["a"].as_tensor(), again["a"].as_tensor())
    assert torch.equal(first["a"].as_tensor(), first["b"].as_tensor())
    assert not torch.equal(first["a"].as_tensor(), other["a"].as_tensor())


def test_pipeline_is_a_compose_of_the_requested_steps():
    names = [type(t).__name__ for t in preprocessing(load=True).transforms]
    assert names == [
        "LoadCased",
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRangePercentilesd",
        "CropForegroundd",
        "SpatialPadd",
        "RandSpatialCropd",
    ]
    assert isinstance(preprocessing(), Compose)
    bare = preprocessing(
        orientation=None, spacing=None, percentiles=None, crop_foreground=False, roi_size=None
    )
    assert bare.transforms == ()


def test_load_cased_reports_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_t1"):
        LoadCased("image")({"image": {"t1": tmp_path / "missing_t1.nii.gz"}})
    with pytest.raises(TypeError, match="mapping of modality name"):
        LoadCased("image")({"image": str(tmp_path / "x.nii.gz")})


def test_argument_validation():
    with pytest.raises(ValueError, match="percentiles"):
        preprocessing(percentiles=(99, 1))
    with pytest.raises(ValueError, match="crop"):
        preprocessing(crop="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="orientation"):
        preprocessing(orientation="RAR")
    with pytest.raises(ValueError, match="spacing"):
        preprocessing(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="roi_size"):
        preprocessing(roi_size=0)
    with pytest.raises(TypeError, match="keys"):
        preprocessing(keys=[])

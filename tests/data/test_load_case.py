from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from mrissl.data import CaseImage, load_case

AFFINE = np.array(
    [[1.0, 0.0, 0.0, -90.0], [0.0, 1.2, 0.0, -120.0], [0.0, 0.0, 1.5, -60.0], [0, 0, 0, 1]]
)


def _save(path, data, affine=AFFINE, cls=nib.Nifti1Image):
    nib.save(cls(np.asarray(data), affine), path)
    return path


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    return {m: rng.random((5, 6, 7), dtype=np.float32) for m in ("t1", "t2", "flair")}


def test_stacks_modalities_in_the_given_order_with_values_unchanged(tmp_path, volumes):
    paths = {m: _save(tmp_path / f"s_{m}.nii.gz", v) for m, v in volumes.items()}
    order = ["flair", "t1", "t2"]
    image, affine = load_case({m: paths[m] for m in order})
    assert image.shape == (3, 5, 6, 7)
    assert image.dtype == torch.float32
    for c, m in enumerate(order):
        np.testing.assert_array_equal(image[c].numpy(), volumes[m])
    np.testing.assert_allclose(affine.numpy(), AFFINE)
    assert affine.dtype == torch.float64


def test_returns_a_named_tuple(tmp_path, volumes):
    case = load_case({"t1": _save(tmp_path / "a.nii", volumes["t1"])})
    assert isinstance(case, CaseImage)
    assert case.image.shape == (1, 5, 6, 7)


def test_header_scaling_and_integer_data_are_applied(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "t1.nii.gz")
    image, _ = load_case({"t1": tmp_path / "t1.nii.gz"})
    np.testing.assert_allclose(image[0].numpy(), data * 0.5 + 10.0)


def test_nifti2_and_dtype_argument(tmp_path, volumes):
    path = _save(tmp_path / "t1.nii.gz", volumes["t1"], cls=nib.Nifti2Image)
    image, _ = load_case({"t1": path}, dtype=torch.float64)
    assert image.dtype == torch.float64
    np.testing.assert_allclose(image[0].numpy(), volumes["t1"])


def test_trailing_singleton_axis_is_accepted(tmp_path, volumes):
    path = _save(tmp_path / "t1.nii.gz", volumes["t1"][..., None])
    assert load_case({"t1": path}).image.shape == (1, 5, 6, 7)


def test_mismatched_affine_names_the_file(tmp_path, volumes):
    moved = AFFINE.copy()
    moved[0, 3] += 2.0
    paths = {
        "t1": _save(tmp_path / "t1.nii.gz", volumes["t1"]),
        "t2": _save(tmp_path / "t2.nii.gz", volumes["t2"], affine=moved),
    }
    with pytest.raises(ValueError, match=r"t2\.nii\.gz.*affine.*differs.*t1\.nii\.gz"):
        load_case(paths)


def test_affine_within_tolerance_is_accepted(tmp_path, volumes):
    close = AFFINE.copy()
    close[0, 3] += 1e-4
    paths = {
        "t1": _save(tmp_path / "t1.nii.gz", volumes["t1"]),
        "t2": _save(tmp_path / "t2.nii.gz", volumes["t2"], affine=close),
    }
    assert load_case(paths).image.shape[0] == 2
    with pytest.raises(ValueError, match="affine"):
        load_case(paths, affine_atol=1e-6)


def test_mismatched_shape_names_the_file(tmp_path, volumes):
    paths = {
        "t1": _save(tmp_path / "t1.nii.gz", volumes["t1"]),
        "t2": _save(tmp_path / "t2.nii.gz", volumes["t2"][:4]),
    }
    with pytest.raises(ValueError, match=r"t2\.nii\.gz.*shape \(4, 6, 7\).*\(5, 6, 7\)"):
        load_case(paths)


def test_4d_file_is_rejected(tmp_path, volumes):
    path = _save(tmp_path / "dwi.nii.gz", np.stack([volumes["t1"]] * 3, axis=-1))
    with pytest.raises(ValueError, match=r"dwi\.nii\.gz.*expected a 3D volume.*\(5, 6, 7, 3\)"):
        load_case({"dwi": path})


def test_2d_file_is_rejected(tmp_path, volumes):
    path = _save(tmp_path / "t1.nii.gz", volumes["t1"][:, :, 0])
    with pytest.raises(ValueError, match="expected a 3D volume"):
        load_case({"t1": path})


def test_nan_volume_is_rejected(tmp_path):
    path = _save(tmp_path / "t1.nii.gz", np.full((4, 4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"t1\.nii\.gz.*every voxel is NaN"):
        load_case({"t1": path})
    with pytest.raises(ValueError, match="every voxel is NaN"):
        load_case({"t1": path}, nan_policy="zero")


def test_partial_nan_raises_or_is_zeroed_with_a_warning(tmp_path, volumes):
    data = volumes["t1"].copy()
    data[0, 0, :3] = np.nan
    path = _save(tmp_path / "t1.nii.gz", data)
    with pytest.raises(ValueError, match="3 of 210 voxels are NaN"):
        load_case({"t1": path})
    with pytest.warns(UserWarning, match="replaced 3 NaN"):
        image, _ = load_case({"t1": path}, nan_policy="zero")
    assert torch.isfinite(image).all()
    assert float(image[0, 0, 0, 0]) == 0.0
    assert float(image[0, 1, 1, 1]) == pytest.approx(float(data[1, 1, 1]))


def test_truncated_gzip_is_reported_as_unreadable(tmp_path):
    noise = np.random.default_rng(1).random((20, 20, 20), dtype=np.float32)
    raw = _save(tmp_path / "good.nii.gz", noise).read_bytes()
    bad = tmp_path / "bad_t1.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])  # the header survives, the voxel data do not
    with pytest.raises(ValueError, match=r"bad_t1\.nii\.gz.*cannot be read"):
        load_case({"t1": bad})


@pytest.mark.parametrize("name", ["junk.nii", "junk.nii.gz"])
def test_garbage_file_is_not_nifti(tmp_path, name):
    path = tmp_path / name
    payload = b"definitely not an image " * 40
    path.write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*not a readable NIfTI"):
        load_case({"t1": path})


def test_pickle_or_other_extensions_are_refused_before_reading(tmp_path):
    path = tmp_path / "volume.pkl"
    path.write_bytes(b"\x80\x04K\x01.")  # a pickle, never to be loaded
    with pytest.raises(ValueError, match=r"volume\.pkl.*not a NIfTI file"):
        load_case({"t1": path})


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.nii\.gz"):
        load_case({"t1": tmp_path / "absent.nii.gz"})


def test_argument_validation(tmp_path, volumes):
    path = _save(tmp_path / "t1.nii.gz", volumes["t1"])
    with pytest.raises(TypeError, match="mapping"):
        load_case([path])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        load_case({})
    with pytest.raises(TypeError, match="floating"):
        load_case({"t1": path}, dtype=torch.int64)
    with pytest.raises(ValueError, match="nan_policy"):
        load_case({"t1": path}, nan_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"affine_atol must be a finite number >= 0, got -0\.1"):
        load_case({"t1": path}, affine_atol=-0.1)
    with pytest.raises(ValueError, match="affine_atol"):
        load_case({"t1": path}, affine_atol=float("nan"))
    with pytest.raises(TypeError, match="affine_atol must be a number, got str"):
        load_case({"t1": path}, affine_atol="1e-3")  # type: ignore[arg-type]


@pytest.mark.parametrize("scaled", [False, True])
def test_integer_files_read_as_nibabel_scales_them(tmp_path, scaled):
    rng = np.random.default_rng(0)
    raw = rng.integers(-300, 3000, (6, 5, 4)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    if scaled:
        img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "case_t1.nii.gz"
    nib.save(img, path)
    image, _ = load_case({"t1": path})
    expected = nib.load(path).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(image[0].numpy(), expected)
    assert image.dtype == torch.float32

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from mrissl.data import LoadCased, percentile_pair, preprocessing


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
        "_ScalePercentilesd",
        "CropForegroundd",
        "SpatialPadd",
        "RandSpatialCropd",
        "_Compact",
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


def _reference_pipeline(load, crop_foreground, roi_size, crop, percentiles):
    """The definition before the fast path: stock MONAI transforms only (a plain reference)."""
    import functools

    from monai.transforms import (
        CenterSpatialCropd,
        CropForegroundd,
        Orientationd,
        RandSpatialCropd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
        SpatialPadd,
    )

    keys = ["image"]
    steps = [LoadCased(keys)] if load else []
    steps += [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=(1.0, 1.0, 1.0), mode="bilinear"),
        ScaleIntensityRangePercentilesd(
            keys, lower=percentiles[0], upper=percentiles[1], b_min=0.0, b_max=1.0, clip=True,
            channel_wise=True,
        ),
    ]  # fmt: skip
    if crop_foreground:
        steps.append(
            CropForegroundd(
                keys, source_key="image", allow_smaller=True,
                select_fn=functools.partial(torch.gt, other=0.0),
            )
        )  # fmt: skip
    if roi_size is not None:
        steps.append(SpatialPadd(keys, spatial_size=(roi_size,) * 3))
        cls = RandSpatialCropd if crop == "random" else CenterSpatialCropd
        kw = {"random_size": False} if crop == "random" else {}
        steps.append(cls(keys, roi_size=(roi_size,) * 3, **kw))
    return Compose(steps)


@pytest.mark.parametrize(
    ("crop_foreground", "roi_size", "crop", "percentiles"),
    [
        (True, 24, "random", (1.0, 99.0)),
        (True, 16, "center", (5.0, 95.0)),
        (False, 40, "center", (1.0, 99.0)),
        (False, None, "random", (0.0, 100.0)),
    ],
)
def test_fast_pipeline_equals_the_monai_definition(
    tmp_path, volume, crop_foreground, roi_size, crop, percentiles
):
    volume = volume.copy()
    volume[1, :3] = 7.0  # ties
    paths = _write_case(tmp_path, volume, np.diag([-1.5, -2.0, 1.0, 1.0]))
    ours = preprocessing(
        load=True, crop_foreground=crop_foreground, roi_size=roi_size, crop=crop,
        percentiles=percentiles,
    )  # fmt: skip
    theirs = _reference_pipeline(True, crop_foreground, roi_size, crop, percentiles)
    ours.set_random_state(seed=3)
    theirs.set_random_state(seed=3)
    a = ours({"image": paths})["image"]
    b = theirs({"image": paths})["image"]
    assert a.shape == b.shape
    assert float((a.as_tensor() - b.as_tensor()).abs().max()) < 1e-6
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy())


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentile_pair_equals_numpy(n):
    rng = np.random.default_rng(n)
    for values in (rng.random(n).astype(np.float32), rng.integers(0, 5, n).astype(np.float32)):
        for q in ((1.0, 99.0), (0.0, 100.0), (5.0, 95.0), (33.3, 66.6)):
            got = percentile_pair(torch.from_numpy(values), *q)
            np.testing.assert_allclose(got, np.percentile(values.astype(np.float64), q), rtol=1e-7)


def test_crop_does_not_keep_the_uncropped_volume_alive(volume):
    pipeline = preprocessing(orientation=None, spacing=None, percentiles=None, roi_size=8)
    out = pipeline({"image": torch.from_numpy(volume)})["image"]
    assert out.shape == (2, 8, 8, 8)
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()


def test_errors_inside_the_pipeline_name_the_file_not_the_transform(tmp_path, volume):
    paths = _write_case(tmp_path, volume, np.eye(4))
    nib.save(nib.Nifti1Image(volume[1], np.diag([2.0, 1.0, 1.0, 1.0])), paths["flair"])
    with pytest.raises(ValueError, match=r"case_flair\.nii\.gz") as info:
        preprocessing(load=True)({"image": paths})
    assert "applying transform" not in str(info.value)


@pytest.mark.parametrize("kind", ["uniform", "zeros", "integers", "strided", "brats"])
def test_percentile_pair_on_large_volumes_equals_numpy(kind):
    rng = np.random.default_rng(1)
    n = 300_007  # above the size where a sample brackets the order statistics
    values = rng.random(n).astype(np.float32)
    if kind == "zeros":
        values[: n * 3 // 4] = 0.0  # a background of ties
    elif kind == "integers":
        values = rng.integers(0, 40, n).astype(np.float32)
    elif kind == "brats":  # int16 head in a background of zeros, spatially smooth
        values = np.zeros(n, np.float32)
        values[n // 3 :] = np.sort(rng.normal(500.0, 120.0, n - n // 3)).round()
    elif kind == "strided":  # the strided sample sees only zeros: the bracket must fail safely
        values = np.ones(n, np.float32) * rng.random(n).astype(np.float32)
        values[:: n // 65536] = 0.0
    for q in ((1.0, 99.0), (5.0, 95.0), (0.0, 100.0), (0.5, 99.5)):
        got = percentile_pair(torch.from_numpy(values), *q)
        np.testing.assert_allclose(got, np.percentile(values.astype(np.float64), q), rtol=1e-7)

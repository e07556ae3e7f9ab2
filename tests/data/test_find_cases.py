from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mrissl.data import find_cases, load_case

MODS = ["t1", "t1ce", "t2", "flair"]


def _touch(path, value=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), value, np.float32), np.eye(4)), path)


def test_brats2023_layout_with_dataset_spellings(tmp_path):
    for case in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"):
        for suffix in ("t1n", "t1c", "t2w", "t2f"):
            _touch(tmp_path / case / f"{case}-{suffix}.nii.gz")
        _touch(tmp_path / case / f"{case}-seg.nii.gz")  # labels are not a modality
    found = find_cases(tmp_path, MODS)
    assert [c.name for c in found.cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    first = found.cases[0]
    assert list(first.paths) == MODS
    assert first.paths["flair"].name == "BraTS-GLI-00000-000-t2f.nii.gz"
    assert first.complete
    assert not found.incomplete


def test_brats2021_layout_nested_and_aliases_in_the_request(tmp_path):
    root = tmp_path / "BraTS2021_Training_Data"
    for suffix in ("t1", "t1ce", "t2", "flair"):
        _touch(root / "BraTS2021_00000" / f"BraTS2021_00000_{suffix}.nii.gz")
    found = find_cases(tmp_path, ["T1n", "t1-gd", "T2w", "T2-FLAIR"])
    assert found.modalities == tuple(MODS)
    assert [c.name for c in found.cases] == ["BraTS2021_Training_Data/BraTS2021_00000"]


def test_flat_layout_names_cases_by_prefix(tmp_path):
    for case in ("IXI002-Guys-0828", "IXI012-HH-1211"):
        for suffix in ("T1", "T2", "PD"):
            _touch(tmp_path / f"{case}-{suffix}.nii.gz")
    found = find_cases(tmp_path, ["t1", "t2", "pd"])
    assert [c.name for c in found.cases] == ["IXI002-Guys-0828", "IXI012-HH-1211"]
    assert found.cases[1].paths["pd"].name == "IXI012-HH-1211-PD.nii.gz"


def test_plain_files_in_subject_folders(tmp_path):
    for case in ("sub-01", "sub-02"):
        for m in ("t1", "flair"):
            _touch(tmp_path / case / f"{m}.nii")
    assert [c.name for c in find_cases(tmp_path, ["t1", "flair"]).cases] == ["sub-01", "sub-02"]


def test_missing_modality_is_reported_not_dropped(tmp_path):
    for m in MODS:
        _touch(tmp_path / "a" / f"a_{m}.nii.gz")
    for m in ("t1", "t2"):
        _touch(tmp_path / "b" / f"b_{m}.nii.gz")
    with pytest.warns(UserWarning, match=r"1 case\(s\).*b lacks t1ce, flair"):
        found = find_cases(tmp_path, MODS)
    assert [c.name for c in found.cases] == ["a"]
    (incomplete,) = found.incomplete
    assert incomplete.name == "b"
    assert incomplete.missing == ("t1ce", "flair")
    assert list(incomplete.paths) == ["t1", "t2"]
    assert not incomplete.complete
    with pytest.raises(ValueError, match="b lacks t1ce, flair"):
        find_cases(tmp_path, MODS, incomplete="raise")


def test_unrequested_modalities_and_hidden_files_are_ignored(tmp_path):
    _touch(tmp_path / "a" / "a_t1.nii.gz")
    _touch(tmp_path / "a" / "a_dwi.nii.gz")
    _touch(tmp_path / "a" / "._a_t1.nii.gz")  # macOS resource fork
    _touch(tmp_path / ".cache" / "x_t1.nii.gz")
    found = find_cases(tmp_path, ["t1"])
    assert [c.name for c in found.cases] == ["a"]
    assert found.cases[0].paths["t1"].name == "a_t1.nii.gz"


def test_two_files_for_one_modality_is_an_error_naming_both(tmp_path):
    _touch(tmp_path / "a" / "a_flair.nii.gz")
    _touch(tmp_path / "a" / "a_t2-flair.nii.gz")
    with pytest.raises(ValueError, match=r"a_flair\.nii\.gz and .*a_t2-flair\.nii\.gz"):
        find_cases(tmp_path, ["flair"])


def test_found_cases_load(tmp_path):
    for i, m in enumerate(MODS):
        _touch(tmp_path / "case" / f"case_{m}.nii.gz", value=float(i))
    (case,) = find_cases(tmp_path, MODS).cases
    image, _ = load_case(case.paths)
    assert image[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_empty_folder_gives_no_cases(tmp_path):
    found = find_cases(tmp_path, MODS)
    assert len(found.cases) == 0
    assert found.incomplete == ()


def test_bad_folder_and_modalities(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cases(tmp_path / "nope", MODS)
    _touch(tmp_path / "file_t1.nii.gz")
    with pytest.raises(NotADirectoryError):
        find_cases(tmp_path / "file_t1.nii.gz", MODS)
    with pytest.raises(ValueError, match="unknown modality 'swi'"):
        find_cases(tmp_path, ["t1", "swi"])
    with pytest.raises(ValueError, match="incomplete"):
        find_cases(tmp_path, MODS, incomplete="skip")  # type: ignore[arg-type]

"""One checked reading path for users' files: every bad file is one line naming it.

``load_case`` and ``ModalityTemplates.from_nifti`` read NIfTI through ``mrissl._io``;
``mrissl rank`` and ``mrissl templates export`` read ``torch.save`` files through it. Each bad
file below must give one ``ValueError`` line (or ``FileNotFoundError``) that names the file,
never an exception from nibabel, gzip, zlib or pickle, and never an allocation the size a
forged header asks for. Nothing user-supplied is unpickled.
"""

from __future__ import annotations

import gzip
import pickle
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mrissl._io import load_tensors, read_nifti
from mrissl.cli import main
from mrissl.data import load_case
from mrissl.templates import ModalityTemplates


def _nifti_bytes(data: np.ndarray) -> bytes:
    return bytes(nib.Nifti1Image(data, np.eye(4)).to_bytes())


def _forged_dims(dims: tuple[int, ...]) -> bytes:
    """A valid 2³ float32 .nii whose header then claims ``dims`` (voxel data left at 32 bytes)."""
    raw = bytearray(_nifti_bytes(np.zeros((2, 2, 2), np.float32)))
    struct.pack_into("<8h", raw, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    return bytes(raw)


def _good() -> np.ndarray:
    return np.random.default_rng(0).random((4, 5, 6), dtype=np.float32)


def _with_nan() -> np.ndarray:
    data = _good()
    data[1, 2, 3] = np.nan
    return data


def _with_inf() -> np.ndarray:
    data = _good()
    data[0, 0, 0] = np.inf
    return data


# name -> (file name suffix, bytes of the file, what the message must say)
BAD_NIFTI = {
    "corrupt": (".nii.gz", b"this is not a nifti file at all", "not a readable NIfTI"),
    "corrupt-gzip-stream": (".nii.gz", b"\x1f\x8b\x08\x00garbage", "not a readable NIfTI"),
    "empty": (".nii.gz", b"", "empty"),
    "empty-nii": (".nii", b"", "empty"),
    "truncated-gz": (
        ".nii.gz",
        gzip.compress(_nifti_bytes(np.random.default_rng(1).random((32,) * 3, np.float32)))[:-4096],
        "cannot be read",
    ),
    "truncated-gz-header": (
        ".nii.gz",
        gzip.compress(_nifti_bytes(_good()))[:100],
        "not a readable NIfTI",
    ),
    "truncated-nii": (".nii", _nifti_bytes(_good())[:500], "truncated"),
    "2d": (".nii.gz", gzip.compress(_nifti_bytes(np.zeros((4, 5), np.float32))), "3D"),
    "4d": (".nii.gz", gzip.compress(_nifti_bytes(np.zeros((4, 4, 4, 3), np.float32))), "3D"),
    "nan": (".nii.gz", gzip.compress(_nifti_bytes(_with_nan())), "NaN"),
    "inf": (".nii.gz", gzip.compress(_nifti_bytes(_with_inf())), "NaN or infinite"),
    "all-nan": (
        ".nii.gz",
        gzip.compress(_nifti_bytes(np.full((3, 3, 3), np.nan, np.float32))),
        "every voxel",
    ),
    "complex": (
        ".nii.gz",
        gzip.compress(_nifti_bytes(np.zeros((3, 3, 3), np.complex64))),
        "data type",
    ),
    "huge-header-nii": (".nii", _forged_dims((1000, 1000, 1000)), "promises"),
    "huge-header-gz": (".nii.gz", gzip.compress(_forged_dims((1000, 1000, 1000))), "promises"),
    "absurd-dims": (".nii", _forged_dims((30000, 30000, 30000)), "implausible"),
    "negative-dim": (".nii", _forged_dims((-4, 2, 2)), "implausible"),
    "zero-dim": (".nii", _forged_dims((0, 2, 2)), "implausible"),
    "pickle-named-nii": (".nii", pickle.dumps({"a": 1}, protocol=2), "not a readable NIfTI"),
}


def _write(folder: Path, name: str, suffix: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{suffix}"
    path.write_bytes(content)
    return path


def _assert_one_line_naming(err: BaseException, path: Path, says: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text or path.name in text, text
    assert says in text, text


@pytest.mark.parametrize("case", sorted(BAD_NIFTI))
def test_read_nifti_rejects_bad_file_in_one_line(tmp_path, case):
    suffix, content, says = BAD_NIFTI[case]
    path = _write(tmp_path, "t1", suffix, content)
    with pytest.raises(ValueError, match=re.escape(says)) as info:
        read_nifti(path)
    _assert_one_line_naming(info.value, path, says)


@pytest.mark.parametrize("case", sorted(BAD_NIFTI))
def test_load_case_rejects_bad_file_in_one_line(tmp_path, case):
    suffix, content, says = BAD_NIFTI[case]
    path = _write(tmp_path, "sub1_t1", suffix, content)
    with pytest.raises(ValueError, match=re.escape(says)) as info:
        load_case({"t1": path})
    _assert_one_line_naming(info.value, path, says)


@pytest.mark.parametrize("case", sorted(BAD_NIFTI))
def test_from_nifti_rejects_bad_file_in_one_line(tmp_path, case):
    suffix, content, says = BAD_NIFTI[case]
    path = _write(tmp_path, "t1", suffix, content)
    with pytest.raises(ValueError, match=re.escape(says)) as info:
        ModalityTemplates.from_nifti(tmp_path)
    _assert_one_line_naming(info.value, path, says)


def test_a_good_file_reads_back_exactly(tmp_path):
    data = _good()
    path = _write(tmp_path, "t1", ".nii.gz", gzip.compress(_nifti_bytes(data)))
    read, affine, _ = read_nifti(path)
    np.testing.assert_array_equal(read, data)
    np.testing.assert_array_equal(affine, np.eye(4))


def test_missing_files_are_file_not_found_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.nii\.gz"):
        read_nifti(tmp_path / "nope.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_tensors(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="does not exist"):
        ModalityTemplates.from_nifti(tmp_path / "no-folder")


# ---------------------------------------------------------------------------- torch.save files


class _Payload:
    """Unpickling this object writes a marker file: proof that the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_tensor_files(folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, content: bytes, says: str) -> None:
        path = folder / f"{name}.pt"
        path.write_bytes(content)
        files[name] = (path, says)

    put("empty", b"", "empty")
    put("text", b"just some text\n", "not a torch.save file")
    put("raw-pickle", pickle.dumps(_Payload(marker), protocol=2), "pickles Python objects")
    put("random-bytes", bytes(range(256)) * 4, "not a torch.save file")
    good = folder / "good.bin"
    torch.save({"weight": torch.zeros(3)}, good)
    put("truncated-zip", good.read_bytes()[:200], "not a readable torch.save file")
    evil = folder / "evil.pt"
    torch.save(_Payload(marker), evil)
    files["torch-saved-object"] = (evil, "pickles Python objects")
    return files


def test_the_payload_is_live_so_the_tests_below_can_fail(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker), protocol=2)).close()
    assert marker.exists()


@pytest.mark.parametrize(
    "case", ["empty", "text", "raw-pickle", "random-bytes", "truncated-zip", "torch-saved-object"]
)
def test_load_tensors_rejects_bad_file_in_one_line_and_never_unpickles(tmp_path, case):
    marker = tmp_path / "ran"
    path, says = _bad_tensor_files(tmp_path / "files", marker)[case]
    with pytest.raises(ValueError, match=re.escape(says)) as info:
        load_tensors(path)
    _assert_one_line_naming(info.value, path, says)
    assert not marker.exists()


@pytest.mark.parametrize(
    "case", ["empty", "text", "raw-pickle", "random-bytes", "truncated-zip", "torch-saved-object"]
)
@pytest.mark.parametrize("command", ["rank", "templates export"])
def test_commands_reject_bad_tensor_file_with_exit_2(tmp_path, capsys, case, command):
    marker = tmp_path / "ran"
    path, says = _bad_tensor_files(tmp_path / "files", marker)[case]
    argv = ["rank", str(path)] if command == "rank" else ["templates", "export", str(path)]
    if command != "rank":
        argv.append(str(tmp_path / "out"))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert path.name in lines[0]
    assert says in lines[0]
    assert not marker.exists()


def test_load_tensors_reads_tensors_and_containers(tmp_path):
    state = {"a": torch.arange(4), "nested": {"b": [torch.ones(2), 3, "x"]}}
    torch.save(state, tmp_path / "s.pt")
    back = load_tensors(tmp_path / "s.pt")
    assert torch.equal(back["a"], state["a"])
    assert torch.equal(back["nested"]["b"][0], torch.ones(2))
    assert back["nested"]["b"][1:] == [3, "x"]

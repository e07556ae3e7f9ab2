"""Read the NIfTI files of multi-modal MRI cases, with checks before anything is trusted.

[`load_case`][mrissl.data.load_case] reads the files of one subject (one per modality) into a
``(C, D, H, W)`` tensor and the voxel-to-world affine. [`find_cases`][mrissl.data.find_cases]
discovers the cases of a dataset folder by the modality suffix of each file name, and reports
the cases that lack a requested modality instead of dropping them.

Files are read with nibabel and only as NIfTI-1 or NIfTI-2 (``.nii`` or ``.nii.gz``); nothing
is ever unpickled. The header (dimensions, data type, affine) is checked before the voxel data
are read, and every error names the file it is about.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from mrissl._checks import check_choice, check_number
from mrissl._io import check_one_grid, open_nifti, read_voxels
from mrissl.modalities import MODALITY_ALIASES, canonical_modalities

__all__ = ["CaseFiles", "CaseImage", "FoundCases", "find_cases", "load_case"]

PathLike = str | os.PathLike[str]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SEPARATORS = "-_. "
# the longest alias (e.g. "t1-pre-contrast") spans at most this many separated words
_MAX_ALIAS_WORDS = 3


class CaseImage(NamedTuple):
    """The loaded image of one case: its modalities on one grid, and the grid's affine.

    What [`load_case`][mrissl.data.load_case] returns for the files of a
    [`CaseFiles`][mrissl.data.CaseFiles]; like a nibabel image, voxel data plus affine.

    Attributes:
        image: ``(C, D, H, W)`` floating tensor, the modalities in the order they were given.
            The spatial axes are the voxel axes ``i, j, k`` of the files, in that order.
        affine: ``(4, 4)`` float64 tensor mapping voxel indices ``(i, j, k, 1)`` to world
            coordinates in millimetres (the files' qform/sform as nibabel resolves it).
    """

    image: torch.Tensor
    affine: torch.Tensor


def _is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _open_nifti(path: Path, modality: str) -> Any:
    """Open a NIfTI image and check its header; the voxel data are not read yet."""
    return open_nifti(path, where=f"{path} (modality {modality!r})")


def _read_voxels(img: Any, path: Path, modality: str, nan_policy: str) -> np.ndarray:
    where = f"{path} (modality {modality!r})"
    data: np.ndarray = read_voxels(
        img,
        where=where,
        nan_policy=nan_policy,  # type: ignore[arg-type]
        stacklevel=4,
        raw_integers=True,
    )
    return data


def load_case(
    paths: Mapping[str, PathLike],
    *,
    dtype: torch.dtype = torch.float32,
    affine_atol: float = 1e-3,
    nan_policy: Literal["raise", "zero"] = "raise",
) -> CaseImage:
    """Read the NIfTI files of one subject into one multi-modal tensor and its affine.

    Every file must hold one 3D volume (trailing axes of length 1 are dropped) on the same
    voxel grid: the same shape, and affines that agree within ``affine_atol``. The headers of
    all files are checked before any voxel data are read, so a mismatch is reported quickly.
    The voxel values are scaled by the header's ``scl_slope`` / ``scl_inter`` as nibabel does.

    The spatial axes are kept in the files' voxel order ``(i, j, k)``; no reorientation or
    resampling happens here (that is [`preprocessing`][mrissl.data.preprocessing]'s job).

    Args:
        paths: modality name → NIfTI file (``.nii`` or ``.nii.gz``), in the channel order
            wanted, for example ``{"t1": "sub1_t1.nii.gz", "flair": "sub1_flair.nii.gz"}``.
            The names are not interpreted; [`find_cases`][mrissl.data.find_cases] gives
            canonical ones.
        dtype: floating dtype of the returned image.
        affine_atol: largest allowed absolute difference between the affines' entries
            (millimetres for the translation column).
        nan_policy: ``"raise"`` rejects a volume with any NaN or infinite voxel;
            ``"zero"`` replaces them with 0 and warns. A volume with no finite voxel is
            always rejected.

    Returns:
        A [`CaseImage`][mrissl.data.CaseImage] ``(image, affine)``: ``image`` is
        ``(C, D, H, W)`` with ``C = len(paths)``, ``affine`` is ``(4, 4)`` float64, taken from
        the first file.

    Raises:
        TypeError: if ``paths`` is not a mapping of names to paths, ``dtype`` is not
            floating or ``affine_atol`` is not a number.
        FileNotFoundError: if a file does not exist.
        ValueError: naming the file, if it is not NIfTI, cannot be read, is not 3D, holds NaN,
            or differs in shape or affine from the first file; for a negative or non-finite
            ``affine_atol`` or an unknown ``nan_policy``.

    Examples:
        >>> import nibabel as nib, numpy as np, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> affine = np.diag([1.0, 1.0, 1.0, 1.0])
        >>> for name in ("t1", "flair"):
        ...     vol = np.random.default_rng(0).random((8, 9, 10), dtype=np.float32)
        ...     nib.save(nib.Nifti1Image(vol, affine), folder / f"sub1_{name}.nii.gz")
        >>> image, affine = load_case({m: folder / f"sub1_{m}.nii.gz" for m in ("t1", "flair")})
        >>> image.shape, image.dtype, affine.shape
        (torch.Size([2, 8, 9, 10]), torch.float32, torch.Size([4, 4]))
    """
    if not isinstance(paths, Mapping):
        raise TypeError(
            f"paths must be a mapping of modality name to NIfTI path, got {type(paths).__name__}"
        )
    if not paths:
        raise ValueError("paths must name at least one file, got an empty mapping")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    affine_atol = check_number(affine_atol, "affine_atol", low=0)
    check_choice(nan_policy, "nan_policy", ("raise", "zero"))

    files, images, ref_affine = _open_case(paths, affine_atol)
    # filled one modality at a time, so at most one decoded volume exists besides the result
    image = torch.empty((len(files), *images[0].shape[:3]), dtype=dtype)
    for c, ((name, path), img) in enumerate(zip(files, images, strict=True)):
        image[c] = torch.from_numpy(_read_voxels(img, path, name, nan_policy))
    return CaseImage(image=image, affine=torch.from_numpy(ref_affine.copy()))


def _open_case(
    paths: Mapping[str, PathLike], affine_atol: float
) -> tuple[list[tuple[str, Path]], list[Any], np.ndarray]:
    """Open every file of a case and check that they share one grid; no voxel data read."""
    files: list[tuple[str, Path]] = []
    for name, p in paths.items():
        if not isinstance(name, str):
            raise TypeError(f"paths keys must be modality names (str), got {name!r}")
        if not isinstance(p, str | os.PathLike):
            raise TypeError(f"paths[{name!r}] must be a str or path, got {type(p).__name__}")
        files.append((name, Path(p)))

    images = [_open_nifti(path, name) for name, path in files]
    ref_affine = check_one_grid(
        [(name, path, img) for (name, path), img in zip(files, images, strict=True)],
        affine_atol=affine_atol,
        what="all modalities of a case",
    )
    return files, images, ref_affine


def read_case_arrays(
    paths: Mapping[str, PathLike], *, affine_atol: float = 1e-3
) -> tuple[list[np.ndarray], np.ndarray]:
    """The voxel arrays of a case as stored (integers stay integers), with ``load_case``'s checks.

    For a fast path that works on the files' own layout (``(I, J, K)`` NumPy arrays, often
    column-major) and casts only what it keeps. NaN or infinite voxels are rejected.

    Returns:
        One array per modality and the ``(4, 4)`` float64 affine.
    """
    files, images, ref_affine = _open_case(paths, affine_atol)
    arrays = [
        _read_voxels(img, path, name, "raise")
        for (name, path), img in zip(files, images, strict=True)
    ]
    return arrays, ref_affine


class CaseFiles(NamedTuple):
    """The files of one case (subject), as found by [`find_cases`][mrissl.data.find_cases].

    [`load_case(case.paths)`][mrissl.data.load_case] reads them into a
    [`CaseImage`][mrissl.data.CaseImage].

    Attributes:
        name: the case's name: its folder relative to the searched folder, or the file-name
            prefix shared by its files when several cases share a folder.
        paths: canonical modality name → file, in the order of the requested modalities;
            pass it to [`load_case`][mrissl.data.load_case]. Only the modalities found.
        missing: the requested modalities that were not found (empty for a complete case).
    """

    name: str
    paths: Mapping[str, Path]
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every requested modality was found."""
        return not self.missing


class FoundCases(NamedTuple):
    """The result of [`find_cases`][mrissl.data.find_cases].

    A NamedTuple ``(modalities, cases, incomplete)``: iterate over ``found.cases`` for the
    complete cases.

    Attributes:
        modalities: the requested modalities, canonical names.
        cases: the complete cases, sorted by name.
        incomplete: the cases lacking at least one requested modality, sorted by name.
    """

    modalities: tuple[str, ...]
    cases: tuple[CaseFiles, ...]
    incomplete: tuple[CaseFiles, ...] = ()


def _split_modality(stem: str) -> tuple[str, str] | None:
    """Split a file stem into (prefix, canonical modality) by its longest known suffix."""
    # positions where a word starts: the start, and after every separator
    starts = [0] + [i + 1 for i, ch in enumerate(stem) if ch in _SEPARATORS]
    best: tuple[str, str] | None = None
    for start in starts[::-1][:_MAX_ALIAS_WORDS]:
        tail = "".join(ch for ch in stem[start:] if ch not in _SEPARATORS).lower()
        canonical = MODALITY_ALIASES.get(tail)
        if canonical is not None:
            best = (stem[:start].rstrip(_SEPARATORS), canonical)
    return best


def find_cases(
    folder: PathLike,
    modalities: Sequence[str],
    *,
    incomplete: Literal["warn", "raise", "ignore"] = "warn",
) -> FoundCases:
    """Discover the multi-modal cases in a dataset folder by the modality suffix of each file.

    Every ``.nii`` / ``.nii.gz`` file below ``folder`` (hidden files and folders, such as
    macOS ``._*`` files, are skipped) whose name ends in a known modality spelling, after a
    ``-``, ``_``, ``.`` or at the start of the name, belongs to a case; other files (labels,
    masks) are ignored. Spellings are those of [`mrissl.modalities`][mrissl.modalities], so
    these layouts all work:

    * one folder per subject, as BraTS 2023 ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz``
      or BraTS 2021 ``BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz``, or plain ``sub1/t1.nii.gz``;
    * all files in one folder, as IXI ``IXI002-Guys-0828-T2.nii.gz``: the prefix before the
      modality names the case.

    Files are grouped by folder and prefix. The name of a case is its folder relative to
    ``folder``, or ``folder/prefix`` when one folder holds several cases.

    Args:
        folder: the dataset folder, searched recursively (symbolic links to folders are not
            followed).
        modalities: the modalities wanted, in channel order, in any known spelling
            (``["t1n", "t1c", "t2w", "t2f"]`` equals ``["t1", "t1ce", "t2", "flair"]``).
        incomplete: what to do about cases lacking a requested modality: ``"warn"`` (one
            warning naming them), ``"raise"`` (``ValueError``) or ``"ignore"``. They are listed
            in ``FoundCases.incomplete`` in every case.

    Returns:
        [`FoundCases`][mrissl.data.FoundCases] with the complete and the incomplete cases.

    Raises:
        FileNotFoundError: if ``folder`` does not exist.
        NotADirectoryError: if ``folder`` is not a folder.
        ValueError: for an unknown modality, for two files of the same case and modality
            (naming both), or for incomplete cases when ``incomplete="raise"``.

    Examples:
        >>> import nibabel as nib, numpy as np, tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> vol = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
        >>> for case, mods in {"BraTS-0001": ["t1n", "t2f"], "BraTS-0002": ["t1n"]}.items():
        ...     (root / case).mkdir()
        ...     for m in mods:
        ...         nib.save(vol, root / case / f"{case}-{m}.nii.gz")
        >>> found = find_cases(root, ["t1", "flair"], incomplete="ignore")
        >>> [c.name for c in found.cases], [(c.name, c.missing) for c in found.incomplete]
        (['BraTS-0001'], [('BraTS-0002', ('flair',))])
        >>> sorted(found.cases[0].paths)
        ['flair', 't1']
    """
    wanted = canonical_modalities(modalities)
    check_choice(incomplete, "incomplete", ("warn", "raise", "ignore"))
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"folder must be a str or path, got {type(folder).__name__}")
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"folder {str(root)!r} is not a folder")

    # (folder relative to root, prefix) -> {modality: path}
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root).as_posix()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if filename.startswith(".") or not _is_nifti_name(path):
                continue
            split = _split_modality(_stem(path))
            if split is None or split[1] not in wanted:
                continue
            prefix, modality = split
            group = groups.setdefault((rel, prefix), {})
            if modality in group:
                raise ValueError(
                    f"two files of case {prefix or rel!r} are modality {modality!r}: "
                    f"{group[modality]} and {path}; rename or remove one"
                )
            group[modality] = path

    prefixes_per_dir: dict[str, int] = {}
    for rel, _ in groups:
        prefixes_per_dir[rel] = prefixes_per_dir.get(rel, 0) + 1
    complete: list[CaseFiles] = []
    lacking: list[CaseFiles] = []
    for (rel, prefix), found in groups.items():
        if prefixes_per_dir[rel] == 1 and rel != ".":
            name = rel
        elif rel == ".":
            name = prefix or root.name
        else:
            name = f"{rel}/{prefix}" if prefix else rel
        paths = {m: found[m] for m in wanted if m in found}
        missing = tuple(m for m in wanted if m not in found)
        (lacking if missing else complete).append(CaseFiles(name, paths, missing))
    complete.sort(key=lambda c: c.name)
    lacking.sort(key=lambda c: c.name)

    if lacking and incomplete != "ignore":
        shown = "; ".join(f"{c.name} lacks {', '.join(c.missing)}" for c in lacking[:5])
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        message = (
            f"{len(lacking)} case(s) under {str(root)!r} lack requested modalities: {shown}{more}"
        )
        if incomplete == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return FoundCases(modalities=wanted, cases=tuple(complete), incomplete=tuple(lacking))

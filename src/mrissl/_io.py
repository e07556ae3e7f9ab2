"""Reading users' files: one checked path for NIfTI volumes and one for saved tensors (private).

Writing NIfTI volumes goes through here too (``write_nifti``), and so does the format of a
folder of templates (``write_template_files`` and ``open_template_files``, used by
[`ModalityTemplates.to_nifti`][mrissl.templates.ModalityTemplates.to_nifti] and
[`from_nifti`][mrissl.templates.ModalityTemplates.from_nifti]).

Every reader of a file the user supplies goes through here: [`load_case`][mrissl.data.load_case],
[`ModalityTemplates.from_nifti`][mrissl.templates.ModalityTemplates.from_nifti], ``mrissl rank``
and ``mrissl templates export``. The contract:

* a NIfTI header is checked before any voxel is read: a 3-D volume (trailing axes of length 1
  dropped), a plausible number of voxels for the size of the file (a forged header cannot make
  us allocate), a real numeric data type (complex and structured types are rejected) and a
  finite affine;
* the voxels are read as float32 and NaN or infinite ones are rejected (or zeroed on request);
* a saved tensor file is read with ``torch.load(weights_only=True)``, so nothing user-supplied
  is ever unpickled beyond tensors, containers and numbers;
* every failure, whatever nibabel, gzip, zlib or the OS raised, becomes one ``ValueError`` line
  (``FileNotFoundError`` for a missing file) that names the file and the reason.

nibabel and NumPy are imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

__all__: list[str] = []

PathLike = str | os.PathLike[str]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# 1024³ voxels in one volume (4 GiB as float32) is far beyond any MRI scan; a header claiming
# more is corrupt or hostile, and reading it would exhaust memory.
MAX_VOXELS = 1024**3
# deflate cannot compress by more than 1032:1, so a .nii.gz of n bytes holds at most ~1032 n.
_MAX_GZIP_RATIO = 1100


class UnreadableFileError(ValueError):
    """A user's file that cannot be read as what it should be; the message names the file."""


def one_line(err: BaseException) -> str:
    """``Type: message`` of an exception, on one line (the first line of its message)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _check_path(path: Any, where: str | None, what: str) -> tuple[Path, str]:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{what} must be a str or path, got {type(path).__name__}")
    p = Path(path)
    place = where or str(p)
    if not p.exists():
        raise FileNotFoundError(f"{place}: no such file")
    if not p.is_file():
        raise ValueError(f"{place}: not a regular file")
    return p, place


def open_nifti(path: PathLike, *, where: str | None = None, ndim: int = 3) -> Any:
    """Open a NIfTI image and check its header; the voxel data are not read yet.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        where: how error messages name the file (default: the path).
        ndim: the number of dimensions the image must have after dropping trailing axes of
            length 1.

    Returns:
        The ``nibabel.Nifti1Image`` (or ``Nifti2Image``), its data still on disk.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, for anything else wrong with it.
    """
    import nibabel as nib
    import numpy as np

    p, place = _check_path(path, where, "path")
    if not p.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{place}: not a NIfTI file; expected a name ending in .nii or .nii.gz")
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"{place}: the file is empty")
    try:
        img: Any = nib.load(p)
        shape = tuple(int(s) for s in img.shape)
        header: Any = img.header
        dtype = header.get_data_dtype()
        offset = int(getattr(img.dataobj, "offset", 0))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel, gzip and zlib raise many types; report them alike
        raise ValueError(f"{place}: not a readable NIfTI file ({one_line(err)})") from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise ValueError(
            f"{place}: nibabel read it as {type(img).__name__}, expected a NIfTI-1 or NIfTI-2 image"
        )
    kept = shape
    # Trailing axes of length 1 (written by some tools as (X, Y, Z, 1)) carry no data.
    while len(kept) > ndim and kept[-1] == 1:
        kept = kept[:-1]
    if len(kept) != ndim:
        hint = "; split 4D series into one file per volume" if len(kept) > ndim else ""
        raise ValueError(
            f"{place}: expected a {ndim}D volume, got an image of shape {shape} "
            f"({len(shape)}D){hint}"
        )
    voxels = math.prod(kept)
    if min(kept) < 1 or voxels > MAX_VOXELS:
        raise ValueError(f"{place}: implausible volume shape {shape} in the header")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise ValueError(f"{place}: unsupported voxel data type {dtype}; expected real numbers")
    nbytes = voxels * dtype.itemsize
    if p.name.lower().endswith(".gz"):
        if nbytes > _MAX_GZIP_RATIO * size:
            raise ValueError(
                f"{place}: the header promises {nbytes} bytes of voxel data, more than a "
                f"compressed file of {size} bytes can hold; the header is corrupt"
            )
    elif offset + nbytes > size:
        raise ValueError(
            f"{place}: the file is truncated: the header promises {nbytes} bytes of voxel data "
            f"after byte {offset}, the file has {size} bytes"
        )
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"{place}: the header's affine is missing or not finite")
    return img


def check_one_grid(
    images: Sequence[tuple[str, Path, Any]], *, affine_atol: float, what: str
) -> Any:
    """Check that opened NIfTI images share one voxel grid; no voxel data are read.

    The same shape and affines that agree within ``affine_atol`` (an absolute difference of
    entries, millimetres for the translation column) as the first image's.

    Args:
        images: ``(modality, path, image)`` for each file, the image from ``open_nifti``.
        affine_atol: largest allowed absolute difference of the affines' entries.
        what: what must share the grid, for the message (``"all modalities of a case"``).

    Returns:
        The first image's ``(4, 4)`` float64 affine.

    Raises:
        ValueError: naming both files, for a shape or an affine that differs.
    """
    import numpy as np

    ref_name, ref_path, ref_img = images[0]
    ref_shape = tuple(ref_img.shape[:3])
    ref_affine = np.asarray(ref_img.affine, dtype=np.float64)
    for name, path, img in images[1:]:
        shape = tuple(img.shape[:3])
        if shape != ref_shape:
            raise ValueError(
                f"{path} (modality {name!r}) has shape {shape}, but {ref_path} "
                f"(modality {ref_name!r}) has shape {ref_shape}; {what} must share one voxel "
                "grid"
            )
        diff = float(np.abs(np.asarray(img.affine, dtype=np.float64) - ref_affine).max())
        if diff > affine_atol:
            raise ValueError(
                f"{path} (modality {name!r}) has an affine that differs from that of {ref_path} "
                f"(modality {ref_name!r}) by up to {diff:.4g} (affine_atol={affine_atol}); "
                "register or resample the modalities onto one grid first\n"
                f"  {ref_name}: {ref_affine.round(4).tolist()}\n"
                f"  {name}: {np.asarray(img.affine).round(4).tolist()}"
            )
    return ref_affine


def read_voxels(
    img: Any,
    *,
    where: str,
    nan_policy: Literal["raise", "zero"] = "raise",
    stacklevel: int = 3,
    raw_integers: bool = False,
) -> Any:
    """The voxels of an image from [`open_nifti`][], float32, trailing unit axes dropped.

    With ``raw_integers=True``, integer data stored without scaling (slope 1, intercept 0) is
    returned as its raw integer array instead: it cannot hold NaN, and the caller casts it once
    into its own result, which saves a float32 copy and a NaN scan of every volume.

    Raises:
        ValueError: naming the file, if the data cannot be read (a truncated or corrupt
            stream), or holds NaN or infinite values (only all of them with ``"zero"``).
    """
    import numpy as np

    if raw_integers:
        proxy = img.dataobj
        slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
        if img.header.get_data_dtype().kind in "biu" and slope == 1.0 and inter == 0.0:
            try:
                raw: np.ndarray = np.asanyarray(proxy)
            except Exception as err:  # truncated gzip, short file: "unreadable"
                raise ValueError(
                    f"{where}: the voxel data cannot be read ({one_line(err)})"
                ) from None
            shape = raw.shape
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            return raw.reshape(shape)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except Exception as err:  # truncated gzip, short file, bad scaling: all "unreadable"
        raise ValueError(f"{where}: the voxel data cannot be read ({one_line(err)})") from None
    shape = data.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    data = data.reshape(shape)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        if bad == data.size:
            raise ValueError(f"{where}: every voxel is NaN or infinite")
        if nan_policy == "raise":
            raise ValueError(
                f"{where}: {bad} of {data.size} voxels are NaN or infinite; "
                "pass nan_policy='zero' to replace them with 0"
            )
        warnings.warn(
            f"{where}: replaced {bad} NaN or infinite voxels with 0", stacklevel=stacklevel
        )
        data = np.where(finite, data, np.float32(0.0))
    return data


def read_nifti(
    path: PathLike, *, where: str | None = None, nan_policy: Literal["raise", "zero"] = "raise"
) -> tuple[Any, Any, Any]:
    """Open, check and read one NIfTI volume: ``(data, affine, header)``.

    ``data`` is a float32 NumPy array of 3 dimensions, ``affine`` a ``(4, 4)`` float64 array.
    Raises ``FileNotFoundError`` or a one-line ``ValueError`` naming the file.
    """
    import numpy as np

    img = open_nifti(path, where=where)
    place = where or str(path)
    data = read_voxels(img, where=place, nan_policy=nan_policy, stacklevel=4)
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def write_nifti(path: PathLike, data: Any, affine: Any, *, descrip: str = "") -> Path:
    """Write one 3-D volume as a NIfTI-1 file (float32 voxels, float64 affine, millimetres).

    The writing counterpart of ``read_nifti``: ``data`` is a ``(D, H, W)`` array, ``affine``
    a ``(4, 4)`` array; ``descrip`` (at most 80 bytes) goes into the header's description.
    The suffix of ``path`` (``.nii`` or ``.nii.gz``) chooses the compression. Returns ``path``.
    """
    import nibabel
    import numpy as np

    nib: Any = nibabel  # nibabel's partial annotations would make every call "untyped"
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, np.float64))
    img.header["descrip"] = descrip.encode()
    img.header.set_xyzt_units("mm")
    out = Path(path)
    nib.save(img, str(out))
    return out


# ---- template folders (ModalityTemplates.to_nifti / from_nifti): one file per modality ----

_TEMPLATE_DESCRIP = re.compile(r"mrissl template (\S+) (\d+)/\d+ normali[sz]e=(\S+)")


class TemplateFile(NamedTuple):
    """One opened template file; ``name`` and ``order`` come from its header if it has them."""

    name: str  # the modality recorded in the header, else the file name without suffix
    order: int | None  # the 1-based place in the template order recorded in the header
    normalize: str  # the normalization recorded in the header ("none" without one)
    path: Path
    image: Any  # from open_nifti, voxels not read


def write_template_files(
    folder: PathLike, names: Sequence[str], volumes: Any, affine: Any, *, normalize: str
) -> list[Path]:
    """Write ``<folder>/<name>.nii.gz`` for each ``(D, H, W)`` volume of ``volumes: (S, ...)``.

    The header's description records the name, the place in the order and ``normalize``
    (``"mrissl template t1 1/4 normalize=none"``); ``folder`` is created if needed.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    S = len(names)
    return [
        write_nifti(
            out / f"{name}.nii.gz",
            volumes[i],
            affine,
            descrip=f"mrissl template {name} {i + 1}/{S} normalize={normalize}",
        )
        for i, name in enumerate(names)
    ]


def open_template_files(folder: PathLike) -> list[TemplateFile]:
    """Open (header checks only) every ``.nii``/``.nii.gz`` file of a folder, sorted by name.

    Raises:
        ValueError: if ``folder`` is not a folder or holds no NIfTI file, or, naming the file,
            for a file that ``open_nifti`` rejects.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r} does not exist or is not a folder")
    found = []
    for path in sorted(p for p in root.iterdir() if p.name.endswith(NIFTI_SUFFIXES)):
        image = open_nifti(path)
        descrip = bytes(image.header["descrip"]).split(b"\0")[0].decode(errors="replace")
        m = _TEMPLATE_DESCRIP.match(descrip)
        if m:
            found.append(TemplateFile(m.group(1), int(m.group(2)), m.group(3), path, image))
        else:
            stem = path.name.removesuffix(".gz").removesuffix(".nii")
            found.append(TemplateFile(stem, None, "none", path, image))
    if not found:
        raise ValueError(f"folder {str(root)!r} holds no .nii or .nii.gz template files")
    return found


def load_tensors(path: PathLike, *, what: str = "file") -> Any:
    """Read a ``torch.save`` file safely: ``torch.load(weights_only=True)`` onto the CPU.

    Only tensors, containers of them and plain numbers and strings are rebuilt; a file that
    pickles any other Python object is rejected and its code never runs.

    Args:
        path: the file.
        what: how messages name it (``"checkpoint"``, ``"features"``).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: one line naming the file, if it is empty, not a ``torch.save`` file, or
            holds pickled objects other than tensors.
    """
    import pickle

    p, place = _check_path(path, f"{what} {str(path)!r}", "path")
    if p.stat().st_size == 0:
        raise UnreadableFileError(f"{place}: the file is empty")
    with p.open("rb") as f:
        magic = f.read(2)
    # torch.save writes a zip archive ("PK"); its legacy format starts with a pickle protocol
    if magic not in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise UnreadableFileError(f"{place}: not a torch.save file (it starts with {magic!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnreadableFileError(
            f"{place}: it pickles Python objects other than tensors, containers and numbers; "
            "they are not loaded (torch.load(weights_only=True)). Save plain tensors or a "
            "state_dict instead"
        ) from None
    except Exception as err:
        raise UnreadableFileError(
            f"{place}: not a readable torch.save file ({one_line(err)})"
        ) from None

"""The data side of ``mrissl collapse-check``: one pass over a folder of cases, in parallel.

[`CaseCrops`][mrissl.data.collapse_run.CaseCrops] turns each case of a folder into one
preprocessed crop with its ``available`` modalities, or into a one-line reason why it cannot be
used; [`run_collapse_check`][mrissl.data.collapse_run.run_collapse_check] reads them once
through a ``torch.utils.data.DataLoader`` with worker processes, feeds every crop to one
[`CollapseFloorMeter`][mrissl.diagnostics.CollapseFloorMeter] per mask, and merges the meters
across ``torchrun`` processes. Peak memory does not depend on the number of cases.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from mrissl._progress import ProgressBar
from mrissl.data.nifti import CaseFiles
from mrissl.diagnostics._floor_pass import SharedFloorPass
from mrissl.diagnostics.floor import CollapseFloor, CollapseFloorMeter
from mrissl.distributed import all_reduce_, is_distributed, rank, world_size

__all__ = ["CaseCrops", "CollapseRun", "PhantomCrops", "Skipped", "run_collapse_check"]


class Skipped(NamedTuple):
    """A case that could not be used.

    Attributes:
        name: the case's name.
        reason: one line naming the file and what is wrong with it.
    """

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class CaseCrops(Dataset[dict[str, Any]]):
    """One preprocessed crop per case, with the modalities it has.

    Item ``i`` is ``{"image": (C, S, S, S) float32, "available": (C,) bool, "index": i,
    "name": str, "error": None}``, with the channels of missing modalities zero and
    ``available`` False there; or, for a case that cannot be read (corrupt, off-grid, 4D,
    unreadable), ``{"index": i, "name": str, "error": "file: reason"}``. Nothing random: a
    case gives the same crop in any worker.

    Args:
        cases: the cases, from [`find_cases`][mrissl.data.find_cases] (complete and
            incomplete ones alike).
        modalities: canonical modality names, the channel order.
        crop: the crop size ``S``.
        pipeline: a callable ``{"image": paths} -> {"image": (c, S, S, S)}`` for the
            modalities present; default: [`preprocessing`][mrissl.data.preprocessing] with
            ``load=True, crop="center", roi_size=crop``, computed without the pipeline when the
            files are on a 1 mm axis-aligned grid (the same values; only the crop is ever
            cast, flipped and scaled).

    Examples:
        >>> import nibabel as nib, numpy as np, tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> vol = nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), np.float32), np.eye(4))
        >>> nib.save(vol, root / "sub1_t1.nii.gz")
        >>> case = CaseFiles("sub1", {"t1": root / "sub1_t1.nii.gz"})
        >>> item = CaseCrops([case], modalities=["t1", "t2"], crop=8)[0]
        >>> item["image"].shape, item["available"].tolist(), item["error"]
        (torch.Size([2, 8, 8, 8]), [True, False], None)
    """

    def __init__(
        self,
        cases: Sequence[CaseFiles],
        *,
        modalities: Sequence[str],
        crop: int,
        pipeline: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.cases, self.modalities, self.crop = list(cases), list(modalities), crop
        self.pipeline = pipeline

    def _pipeline(self) -> Callable[[dict[str, Any]], Any]:
        # built on first use, in the loader worker: the main process need not import MONAI
        if self.pipeline is None:
            from mrissl.data.preprocessing import preprocessing

            self.pipeline = preprocessing(load=True, crop="center", roi_size=self.crop)
        return self.pipeline

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        case = self.cases[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fast = (
                    None if self.pipeline is not None else _center_crop_fast(case.paths, self.crop)
                )
                image = (
                    fast
                    if fast is not None
                    else torch.as_tensor(self._pipeline()({"image": dict(case.paths)})["image"])
                )
        except Exception as err:  # nibabel and MONAI raise many kinds; one line, the file named
            reason = _first_line(err)
            if not any(os.fspath(p) in reason for p in case.paths.values()):
                reason = f"{os.fspath(next(iter(case.paths.values())))}: {reason}"
            return {"index": i, "name": case.name, "error": reason}
        C, S = len(self.modalities), self.crop
        if fast is not None and list(case.paths) == self.modalities:
            # the shortcut's float32 crop of a complete case, in channel order: no copy
            out, available = fast, torch.ones(C, dtype=torch.bool)
        else:
            out = torch.zeros((C, S, S, S), dtype=torch.float32)
            available = torch.zeros(C, dtype=torch.bool)
            for j, modality in enumerate(case.paths):
                c = self.modalities.index(modality)
                out[c] = image[j]
                available[c] = True
        return {"image": out, "available": available, "index": i, "name": case.name, "error": None}


class CollapseRun(NamedTuple):
    """What [`run_collapse_check`][mrissl.data.collapse_run.run_collapse_check] found.

    Attributes:
        results: one [`CollapseFloor`][mrissl.diagnostics.CollapseFloor] per meter, in order.
        cases: the usable cases (over all processes).
        skipped: the cases that could not be used, in dataset order.
        per_modality_cases: how many usable cases had each modality.
        seconds: the wall time of the pass and the arithmetic.
        processes: the ``torch.distributed`` processes that shared the cases.
    """

    results: list[CollapseFloor]
    cases: int
    skipped: list[Skipped]
    per_modality_cases: list[int]
    seconds: float
    processes: int


def _trimmer() -> Callable[[], None]:
    """``malloc_trim(0)`` of glibc, or nothing elsewhere.

    Every case allocates and frees the same large temporaries; glibc keeps freed heap pages,
    and over hundreds of cases the resident set creeps up (1.31× from 8 to 128 cases without
    this). Trimming after each case hands them back, so the peak stays that of one case.
    """
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return lambda: None

    def release() -> None:
        trim(0)

    return release


def _as_list(items: list[Any]) -> list[Any]:
    return items


def _batches(
    dataset: Dataset[dict[str, Any]], indices: list[int], workers: int, batch_size: int
) -> Iterator[list[Any]]:
    chunks = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    # a worker without a batch to read would only hold memory (each imports MONAI)
    workers = min(workers, len(chunks))
    if workers == 0:
        for chunk in chunks:
            yield [dataset[i] for i in chunk]
        return
    loader = DataLoader(
        dataset,
        batch_sampler=chunks,
        num_workers=workers,
        collate_fn=_as_list,  # good and bad cases side by side; stacked below
        prefetch_factor=2,
    )
    yield from loader


def run_collapse_check(
    dataset: Dataset[dict[str, Any]],
    meters: Sequence[CollapseFloorMeter],
    *,
    workers: int = 0,
    batch_size: int = 8,
    strict: bool = False,
    progress: bool = False,
) -> CollapseRun:
    """Read every case once and feed it to every meter; merge across processes.

    The cases are split among the ``torch.distributed`` processes (case ``i`` to rank
    ``i mod world_size``), each read by ``workers`` loader processes. A case whose item holds
    an ``"error"`` is skipped and listed, or, with ``strict``, stops the run.

    Args:
        dataset: items as [`CaseCrops`][mrissl.data.collapse_run.CaseCrops] gives them: mappings
            ``{"image": (C, D, H, W), "index": i}`` (``"available"`` optional), or
            ``{"index": i, "name": str, "error": str}`` for a case that cannot be used.
        meters: one per mask, built with ``seed`` (so the result does not depend on the
            workers or processes) and ``gather_distributed=True`` for ``torchrun``.
        workers: loader worker processes; 0 reads in this process.
        batch_size: cases per update of the meters (the cases of one update are held
            together, with twice their size in working copies).
        strict: raise ``ValueError`` at the first case that cannot be read.
        progress: one progress bar on stderr (on rank 0).

    Returns:
        A [`CollapseRun`][mrissl.data.collapse_run.CollapseRun].

    Raises:
        ValueError: with ``strict`` for the first bad case, or when fewer than two usable
            cases remain (over all processes).
    """
    me, world = rank(), world_size()
    indices = list(range(len(dataset)))[me::world]  # type: ignore[arg-type]
    bar = ProgressBar(len(indices), "collapse-check", "case", enabled=progress and me == 0)
    skipped: list[tuple[int, Skipped]] = []
    trim = _trimmer()
    start = time.perf_counter()
    used = 0
    joint = SharedFloorPass(meters)
    pending: list[dict[str, Any]] = []

    stacked: list[torch.Tensor] = []  # the batch buffer, reused while its shape fits

    def feed() -> None:  # the pending cases, as one batch, to every meter
        images = [item["image"] for item in pending]
        shape = (len(images), *images[0].shape)
        if not stacked or stacked[0].shape != shape or stacked[0].dtype != images[0].dtype:
            stacked[:] = [torch.empty(shape, dtype=images[0].dtype)]
        x = torch.stack(images, out=stacked[0])
        available = None
        if any("available" in item for item in pending):
            available = torch.stack(
                [item.get("available", torch.ones(x.shape[1], dtype=torch.bool))
                 for item in pending]
            )  # fmt: skip
        joint.update(x, available=available, index=[int(item["index"]) for item in pending])
        pending.clear()
        del x
        trim()

    try:
        for batch in _batches(dataset, indices, workers, 1):
            for item in batch:
                if item.get("error"):
                    skipped.append((int(item["index"]), Skipped(str(item["name"]), item["error"])))
                else:
                    pending.append(item)
                    used += 1
                bar.update()
            if strict and skipped:
                break
            if len(pending) >= batch_size:
                feed()
        if pending and not (strict and skipped):
            feed()
    finally:
        bar.close()
    all_skipped = _gather_skipped(skipped)
    if strict and all_skipped:
        raise ValueError(f"cannot read case {all_skipped[0]} (--strict)")
    counts = torch.tensor([float(used)], dtype=torch.float64)
    if is_distributed():
        all_reduce_(counts)
    total = int(counts[0])
    if total < 2:
        first = f"; {len(all_skipped)} skipped, first {all_skipped[0]}" if all_skipped else ""
        raise ValueError(f"need at least 2 usable cases to estimate a variance, got {total}{first}")
    stacked.clear()
    results = joint.compute()
    per_modality = results[0].per_modality_volumes if results else None
    return CollapseRun(
        results=results,
        cases=total,
        skipped=all_skipped,
        per_modality_cases=[] if per_modality is None else [int(v) for v in per_modality],
        seconds=time.perf_counter() - start,
        processes=world,
    )


def _gather_skipped(local: list[tuple[int, Skipped]]) -> list[Skipped]:
    everyone: list[Any] = [local]
    if is_distributed():
        everyone = [None] * world_size()
        dist.all_gather_object(everyone, local)
    merged = sorted((pair for part in everyone for pair in part), key=lambda pair: pair[0])
    return [s for _, s in merged]


class PhantomCrops(Dataset[dict[str, Any]]):
    """The built-in phantom in the item layout of [`CaseCrops`][mrissl.data.collapse_run.CaseCrops].

    Args:
        n: number of heads.
        crop: their size ``S`` (cubic).
        modalities: channel order.

    Examples:
        >>> PhantomCrops(2, crop=16, modalities=["t1", "t2"])[1]["image"].shape
        torch.Size([2, 16, 16, 16])
    """

    def __init__(self, n: int, *, crop: int, modalities: Sequence[str]) -> None:
        from mrissl.data.phantom import PhantomDataset

        self.data = PhantomDataset(n, shape=crop, modalities=modalities, generator=0)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.data[i], "index": i, "name": f"phantom-{i}", "error": None}


def _center_crop_fast(
    paths: Mapping[str, Any], crop: int, percentiles: tuple[float, float] = (1.0, 99.0)
) -> torch.Tensor | None:
    """``preprocessing(load=True, crop="center", roi_size=crop)`` on 1 mm axis-aligned files.

    The same values, but only the final crop is ever cast, flipped and scaled: the percentiles
    and the foreground box are found on the files' own arrays (order does not matter to a
    percentile, and a scaled voxel is above 0 exactly when it is above the lower percentile),
    then the box is mapped through the flips to RAS. Returns ``None`` when the files need a
    resampling or an axis permutation (the caller then runs the MONAI pipeline).
    """
    from mrissl.data._percentiles import percentile_pair
    from mrissl.data.nifti import read_case_arrays

    arrays, affine = read_case_arrays(paths)
    linear = affine[:3, :3]
    diagonal = np.diag(linear)
    if not (np.array_equal(np.abs(diagonal), np.ones(3)) and np.count_nonzero(linear) == 3):
        return None
    flips = [bool(v < 0) for v in diagonal]  # RAS: every voxel axis increasing
    shape = arrays[0].shape[:3]
    bounds = []
    hits = [np.zeros(n, dtype=bool) for n in shape]  # per axis: a foreground voxel in the slice
    for raw in arrays:
        a, b = percentile_pair(
            torch.from_numpy(np.ascontiguousarray(raw.ravel(order="K"))), *percentiles
        )
        bounds.append((a, b))
        # a voxel is foreground when above the lower percentile: the box of the union of the
        # modalities' foregrounds is the hull of their boxes, read from maximum projections
        plane = raw.max(axis=2)
        for axis, proj in enumerate((plane.max(axis=1), plane.max(axis=0), raw.max(axis=(0, 1)))):
            hits[axis] |= proj > np.float32(a)
    box = []  # foreground box per axis, in RAS order of the axis
    for axis in range(3):
        hit = np.flatnonzero(hits[axis])
        lo, hi = (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0)
        if flips[axis]:
            lo, hi = shape[axis] - hi, shape[axis] - lo
        box.append((lo, hi))
    out = torch.zeros((len(arrays), crop, crop, crop), dtype=torch.float32)
    src, dst = [], []
    for lo, hi in box:
        size = hi - lo
        if size >= crop:  # centre crop of the box
            start = lo + size // 2 - crop // 2
            src.append((start, start + crop))
            dst.append((0, crop))
        else:  # the box, padded symmetrically
            before = (crop - size) // 2
            src.append((lo, hi))
            dst.append((before, before + size))
    raw_index = []
    for axis, (s0, s1) in enumerate(src):  # RAS ranges back to the files' indices
        n = shape[axis]
        raw_index.append(slice(n - s1, n - s0) if flips[axis] else slice(s0, s1))
    flip_dims = [axis for axis in range(3) if flips[axis]]
    target = tuple(slice(d0, d1) for d0, d1 in dst)
    for c, (raw, (a, b)) in enumerate(zip(arrays, bounds, strict=True)):
        part = torch.from_numpy(raw[tuple(raw_index)])  # a view of the file's array
        if flip_dims:
            part = part.flip(flip_dims)
        # (x - a) / (b - a) in float32, clipped to [0, 1], written into the crop in place;
        # MONAI's rule when both percentiles agree: shift only, no clip
        dest = out[c][target]
        torch.sub(part, a, out=dest)  # int16 - float: computed in float32
        if b - a != 0.0:
            dest.div_(b - a).clamp_(0.0, 1.0)
    return out

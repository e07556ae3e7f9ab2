"""``mrissl.data``: checked NIfTI loading against MONAI's loader; the phantom against a disk read.

Two comparisons per volume size S (four modalities, float32 NIfTI-1 ``.nii.gz`` files written to
a temporary folder from a phantom, so the data look like MRI and compress like it):

* ``load_case``: ``mrissl.data.load_case`` (header checks on every file, shape and affine
  comparison, NaN scan) against MONAI's ``LoadImage(reader="NibabelReader",
  ensure_channel_first=True)`` given the same four paths, which stacks them without checks.
  Both return a ``(4, S, S, S)`` float32 tensor; the values are checked to be identical first.
* ``phantom``: simulating one ``(4, S, S, S)`` head with ``synthetic_phantom`` against reading
  a case of the same size from disk with ``load_case``: is the built-in phantom cheaper than a
  real sample would be? On CUDA the phantom is built on the GPU and the read case is copied
  there.

Run from the repository root::

    python benchmarks/bench_data.py                   # 96³ and 128³
    python benchmarks/bench_data.py --quick           # 32³, 1 repeat (CI)
    python benchmarks/bench_data.py --json data.json

Targets: ``load_case`` ours/baseline <= 1.1 for median time (the checks read each voxel once
more) and <= 1.0 for peak memory. The ``phantom`` rows have no target: they show what a
simulated sample costs next to a real one (the requirement is an absolute one, a 128³ head in
well under a second on a CPU; see the "ours" column).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage

from _harness import Case, compare, make_parser, parse_args
from mrissl.data import load_case, synthetic_phantom

MODALITIES = ("t1", "t1ce", "t2", "flair")


def write_case(folder: Path, size: int) -> dict[str, Path]:
    image = synthetic_phantom(size, MODALITIES, generator=0).numpy()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = {}
    for name, channel in zip(MODALITIES, image, strict=True):
        paths[name] = folder / f"case_{size}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(channel, affine), paths[name])
    return paths


def cases(quick: bool, device: torch.device, folder: Path) -> Iterator[Case]:
    sizes = (32,) if quick else (96, 128)
    monai_load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)
    for size in sizes:
        paths = write_case(folder, size)
        files = [str(p) for p in paths.values()]
        ours = load_case(paths).image
        theirs = torch.as_tensor(np.asarray(monai_load(files)), dtype=torch.float32)
        if not torch.equal(ours, theirs):
            raise RuntimeError(f"load_case and MONAI LoadImage disagree at {size}³")
        yield Case(
            name=f"load_case {size}³ x4",
            ours=lambda paths=paths: load_case(paths),
            baseline=lambda files=files: monai_load(files),
            description=(
                f"4 float32 .nii.gz files of {size}³; baseline monai LoadImage(NibabelReader, "
                "ensure_channel_first) on the same list"
            ),
            target_time=1.1,
        )
        yield Case(
            name=f"phantom {size}³ x4",
            ours=lambda size=size: synthetic_phantom(size, MODALITIES, generator=1, device=device),
            baseline=lambda paths=paths: load_case(paths).image.to(device),
            description=(
                f"simulate a (4, {size}, {size}, {size}) phantom on {device.type}; baseline "
                "load_case of a case of that size from .nii.gz (no target)"
            ),
            target_time=None,
            target_memory=None,
        )


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    args = parse_args(parser, argv)
    with tempfile.TemporaryDirectory() as tmp:
        compare(
            cases(args.quick, args.device, Path(tmp)),
            args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            json_path=args.json,
            title="mrissl.data: load_case vs monai LoadImage; synthetic_phantom vs a disk read",
        )


if __name__ == "__main__":
    main()

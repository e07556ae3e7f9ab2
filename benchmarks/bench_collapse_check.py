"""``mrissl collapse-check`` at dataset scale: memory, time per case, workers, linearity.

Writes BraTS-sized synthetic cases (the phantom, 240×240×155 int16 ``.nii.gz``, four
modalities, BraTS 2023 names ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz`` etc.) to a
cached folder, then runs the command as a user would (``python -m mrissl collapse-check``,
one subprocess per run) on 8, 32 and 128 cases and measures:

* peak RSS of the command's main process (``VmHWM`` from ``/proc/<pid>/status``, read by the
  command itself at exit through ``MRISSL_REPORT_PEAK_RSS``; worker processes not included);
* wall time per case with 1 worker, against nibabel's decode time of the same files
  (``np.asanyarray(nib.load(path).dataobj)`` for the four files of each case, same run);
* wall time with 2 workers against 1 worker, at the two largest counts; and the marginal time
  per case (the slope between those two counts: start-up, imports and the final arithmetic
  cancel), against nibabel's decode time per case;
* time linear in the number of cases: the least-squares slope and intercept of time against
  cases, and the extrapolation to 1,251 cases (BraTS 2021);
* ``preprocessing(...)`` per case against MONAI's own pipeline with
  ``ScaleIntensityRangePercentilesd`` on the same files: max abs difference and time ratio; and
  the command's shortcut for 1 mm axis-aligned files against the same pipeline.

Targets (issue 11): peak RSS at 128 cases within 1.2× of the peak at 8 cases and below 2 GB;
time per case with 1 worker at most 1.5× nibabel's decode time; 2 workers at least 1.6× faster
than 1; max abs difference below 1e-6.

Run from the repository root::

    python benchmarks/bench_collapse_check.py            # 8, 32, 128 cases (writes ~5 GB once)
    python benchmarks/bench_collapse_check.py --quick    # 4, 8, 16 smaller cases
    python benchmarks/bench_collapse_check.py --cache /path/to/folder --json out.json

The generated folder is kept (default ``/tmp/mrissl-bench-brats-v2-<shape>``) and reused.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

BRATS_SHAPE = (240, 240, 155)
QUICK_SHAPE = (120, 120, 78)
MODALITIES = ("t1n", "t1c", "t2w", "t2f")  # BraTS 2023 spellings
BASE_HEADS = 16  # distinct phantom anatomies; every case adds its own noise


def case_name(k: int) -> str:
    return f"BraTS-GLI-{k:05d}-000"


@functools.lru_cache(maxsize=2)
def _head(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    from mrissl.data import synthetic_phantom

    torch.set_num_threads(1)
    half = tuple(s // 2 for s in shape)  # simulated at half resolution, then upsampled
    image = synthetic_phantom(half, ("t1", "t1ce", "t2", "flair"), generator=seed, noise=0.0)
    full = torch.nn.functional.interpolate(image[None], size=shape, mode="trilinear")[0]
    return full.numpy()


def write_case(k: int, folder: str, shape: tuple[int, int, int]) -> None:
    """Case ``k``: a phantom head with its own scanner noise, as int16 in BraTS 2023 layout."""
    out = Path(folder) / case_name(k)
    if all((out / f"{case_name(k)}-{m}.nii.gz").exists() for m in MODALITIES):
        return
    out.mkdir(parents=True, exist_ok=True)
    head = _head(k % BASE_HEADS, shape)
    rng = np.random.default_rng(k)
    affine = np.array(  # BraTS stores LPS-like voxel axes, 1 mm
        [[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    )
    for channel, m in zip(head, MODALITIES, strict=True):
        noisy = channel + rng.normal(0.0, 0.02, channel.shape).astype(np.float32)
        noisy[head.max(axis=0) < 0.01] = 0.0  # skull-stripped like BraTS: air is exactly 0
        values = np.clip(np.rint(noisy * 1000.0), 0, 32767).astype(np.int16)
        path = out / f"{case_name(k)}-{m}.nii.gz"
        tmp = out / f".part-{case_name(k)}-{m}.nii.gz"  # hidden: never found as a case
        nib.save(nib.Nifti1Image(values, affine), tmp)
        os.replace(tmp, path)


def ensure_cases(folder: Path, n: int, shape: tuple[int, int, int], jobs: int) -> None:
    todo = [
        k
        for k in range(n)
        if not all(
            (folder / case_name(k) / f"{case_name(k)}-{m}.nii.gz").exists() for m in MODALITIES
        )
    ]
    if not todo:
        return
    print(f"writing {len(todo)} cases of {shape} to {folder} ({jobs} processes)...", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(write_case, todo, [str(folder)] * len(todo), [shape] * len(todo)))
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def subset(folder: Path, n: int) -> Path:
    """A folder of the first ``n`` cases: case folders holding links to the files."""
    sub = folder.parent / f"{folder.name}-first{n}"
    for k in range(n):
        (sub / case_name(k)).mkdir(parents=True, exist_ok=True)
        for m in MODALITIES:
            name = f"{case_name(k)}-{m}.nii.gz"
            link = sub / case_name(k) / name
            if not link.exists():
                link.symlink_to(folder / case_name(k) / name)
    return sub


def run_command(folder: Path, workers: int, extra: list[str]) -> dict[str, Any]:
    env = dict(os.environ, MRISSL_REPORT_PEAK_RSS="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "mrissl", "collapse-check", str(folder), "--json", "--quiet"]
    cmd += ["--workers", str(workers), "--modalities", *MODALITIES, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    peak = None
    for line in proc.stderr.splitlines():
        if line.startswith("peak RSS of the main process:"):
            peak = int(line.split(":")[1].split()[0])
    report = json.loads(proc.stdout)
    return {"wall_s": wall, "peak_rss_bytes": peak, "report": report}


def decode_time(folder: Path, n: int) -> float:
    start = time.perf_counter()
    for k in range(n):
        for m in MODALITIES:
            np.asanyarray(nib.load(folder / case_name(k) / f"{case_name(k)}-{m}.nii.gz").dataobj)
    return time.perf_counter() - start


def compare_preprocessing(folder: Path, n: int) -> dict[str, float]:
    """``preprocessing`` against the same steps built from MONAI's own transforms."""
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        CropForegroundd,
        Orientationd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
        SpatialPadd,
    )

    from mrissl.data import LoadCased, preprocessing

    keys = ["image"]
    theirs = Compose(
        [
            LoadCased(keys),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=(1.0, 1.0, 1.0), mode="bilinear"),
            ScaleIntensityRangePercentilesd(
                keys, lower=1.0, upper=99.0, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            ),
            CropForegroundd(keys, source_key="image", select_fn=lambda x: x > 0.0,
                            allow_smaller=True),
            SpatialPadd(keys, spatial_size=(96, 96, 96)),
            CenterSpatialCropd(keys, roi_size=(96, 96, 96)),
        ]
    )  # fmt: skip
    from mrissl.data.collapse_run import _center_crop_fast

    ours = preprocessing(load=True, crop="center")
    t_ours = t_theirs = t_fast = t_decode = 0.0
    diff = diff_fast = 0.0
    for k in range(n):
        paths = {m: folder / case_name(k) / f"{case_name(k)}-{m}.nii.gz" for m in MODALITIES}
        start = time.perf_counter()
        for path in paths.values():
            np.asanyarray(nib.load(path).dataobj)
        t_decode += time.perf_counter() - start
        start = time.perf_counter()
        a = ours({"image": dict(paths)})["image"]
        t_ours += time.perf_counter() - start
        start = time.perf_counter()
        b = theirs({"image": dict(paths)})["image"]
        t_theirs += time.perf_counter() - start
        start = time.perf_counter()
        f = _center_crop_fast(paths, 96)
        t_fast += time.perf_counter() - start
        diff = max(diff, float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()))
        diff_fast = max(diff_fast, float((torch.as_tensor(f) - torch.as_tensor(b)).abs().max()))
    return {"ours_s": t_ours / n, "monai_s": t_theirs / n, "ratio": t_ours / t_theirs,
            "max_abs_diff": diff, "fast_s": t_fast / n, "fast_max_abs_diff": diff_fast,
            "decode_s": t_decode / n}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4, 8, 16 cases of 120×120×78")
    parser.add_argument("--cache", type=Path, help="folder for the generated cases")
    parser.add_argument("--counts", type=int, nargs="+", help="numbers of cases to run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="writers")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    shape = QUICK_SHAPE if args.quick else BRATS_SHAPE
    counts = args.counts or ([4, 8, 16] if args.quick else [8, 32, 128])
    folder = args.cache or Path(f"/tmp/mrissl-bench-brats-v2-{'x'.join(map(str, shape))}")
    ensure_cases(folder, max(counts), shape, args.jobs)
    print(f"{os.cpu_count()} CPUs; cases of {shape} int16 .nii.gz under {folder}")

    figures: dict[str, Any] = {"shape": shape, "runs": []}
    n_pre = min(counts)
    pre = compare_preprocessing(folder, n_pre)
    figures["preprocessing"] = pre
    print(
        f"preprocessing per case: ours {pre['ours_s']:.3f} s, MONAI pipeline "
        f"{pre['monai_s']:.3f} s, ratio {pre['ratio']:.2f}, max |diff| {pre['max_abs_diff']:.2e}; "
        f"collapse-check's shortcut {pre['fast_s']:.3f} s (max |diff| "
        f"{pre['fast_max_abs_diff']:.2e}); nibabel decode {pre['decode_s']:.3f} s"
    )
    for n in counts:
        sub = subset(folder, n)
        decode = decode_time(folder, n)
        one = run_command(sub, 1, [])
        row = {"cases": n, "decode_s": decode, "workers_1": one}
        line = (
            f"{n:4d} cases: nibabel decode {decode / n:.3f} s/case; 1 worker "
            f"{one['wall_s'] / n:.3f} s/case ({one['wall_s'] / decode:.2f}× decode), "
            f"peak RSS {one['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
        if n in counts[-2:]:
            two = run_command(sub, 2, [])
            row["workers_2"] = two
            line += f"; 2 workers {one['wall_s'] / two['wall_s']:.2f}× faster"
        figures["runs"].append(row)
        print(line, flush=True)
    xs = np.array([r["cases"] for r in figures["runs"]], dtype=float)
    ys = np.array([r["workers_1"]["wall_s"] for r in figures["runs"]])
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = float(np.abs(np.polyval([slope, intercept], xs) - ys).max())
    peaks = [r["workers_1"]["peak_rss_bytes"] for r in figures["runs"]]
    decode_per_case = sum(r["decode_s"] for r in figures["runs"]) / xs.sum()
    both = [r for r in figures["runs"] if "workers_2" in r]
    if len(both) == 2:  # marginal time per case: the slope between the two largest counts
        (a, b), n_ab = both, both[1]["cases"] - both[0]["cases"]
        one_slope = (b["workers_1"]["wall_s"] - a["workers_1"]["wall_s"]) / n_ab
        two_slope = (b["workers_2"]["wall_s"] - a["workers_2"]["wall_s"]) / n_ab
        figures["marginal"] = {
            "workers_1_s_per_case": one_slope,
            "workers_2_s_per_case": two_slope,
            "decode_s_per_case": decode_per_case,
        }
        print(
            f"marginal time per case (between {a['cases']} and {b['cases']} cases): 1 worker "
            f"{one_slope:.3f} s ({one_slope / decode_per_case:.2f}× nibabel decode "
            f"{decode_per_case:.3f} s), 2 workers {two_slope:.3f} s "
            f"({one_slope / two_slope:.2f}× faster than 1)",
            flush=True,
        )
    figures["fit"] = {
        "slope_s_per_case": slope,
        "intercept_s": intercept,
        "max_residual_s": residual,
        "extrapolated_1251_s": slope * 1251 + intercept,
    }
    print(
        f"time = {slope:.3f} s/case × cases + {intercept:.1f} s (largest residual "
        f"{residual:.1f} s); 1,251 cases: {(slope * 1251 + intercept) / 60:.0f} min with 1 worker"
    )
    print(
        f"peak RSS {peaks[-1] / 2**20:.0f} MiB at {counts[-1]} cases vs {peaks[0] / 2**20:.0f} "
        f"MiB at {counts[0]}: {peaks[-1] / peaks[0]:.2f}× (target <= 1.2, < 2048 MiB)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float))


if __name__ == "__main__":
    main()

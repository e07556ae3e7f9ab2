"""The ``mrissl`` command: checks a researcher runs on their own data before pretraining.

* ``mrissl collapse-check [FOLDER]``: for each masking strategy, the complete-collapse floor
  Var(x_m) of E-MIM (eq. 3), the loss a model that ignores its input and predicts a constant
  would reach, next to the loss a healthy model converges to. Without a folder it runs on the
  built-in synthetic phantom.
* ``mrissl rank FILE``: singular value spectrum, effective rank and RankMe of saved features.
* ``mrissl templates export CHECKPOINT FOLDER``: learned modality templates to NIfTI files.

Every failure the user can cause (a missing folder, no cases, an unreadable file, a bad mask
specification) ends with exit code 2 and one line on stderr, never a traceback.

Importing this module is cheap: torch, MONAI, timm and NumPy are imported inside the subcommand
that needs them, so ``mrissl --help`` and every ``--help`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mrissl import _cli_args as _arg
from mrissl._version import __version__

if TYPE_CHECKING:  # imported inside the subcommands at run time (fast --help)
    import torch

    from mrissl.masking import MaskSpec

__all__ = ["main", "main_entry"]

#: E-MIM's reference: the MSE a healthy MAE converges to on CIFAR-10 scaled to [0, 1].
REFERENCE_LOSS = 0.01
DEFAULT_MASKS = ("random:0.5", "random:0.75", "random:0.9", "hmp", "block:0.875")
DEFAULT_MODALITIES = ("t1", "t1ce", "t2", "flair")

_MASK_HELP = """\
mask specifications (repeat --mask for several):
  random:R            MAE masking: a fraction R of positions, all modalities alike
  random-each:R       MAE masking drawn independently for every modality
  hmp                 E-MIM hybrid mask pattern with mrissl's defaults (modal 1, position 0.5,
                      patch 0.5); hmp:M,P,Q sets the number of whole modalities M and the
                      position and patch ratios P and Q, '-' switches a step off
  modal[:M]           M whole modalities (default 1)
  position:R          the same random positions in every modality
  patch:R             complementary masking across modalities at each position
  block:R[:S]         BrainMVP block masking: exactly floor(R * blocks) blocks of S^3 voxels
                      (S defaults to 8), counted over the whole crop
"""


class CLIError(Exception):
    """A user error: reported as one line on stderr with exit code 2."""


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (its repr when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


# --------------------------------------------------------------------------- collapse-check


def _find_folder_cases(
    args: argparse.Namespace, modalities: Sequence[str]
) -> tuple[list[Any], str]:
    from mrissl.data import find_cases

    folder = Path(args.folder)
    if not folder.exists():
        raise CLIError(f"folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise CLIError(f"{str(folder)!r} is not a folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = find_cases(folder, modalities, incomplete="ignore")
    except ValueError as err:
        raise CLIError(str(err)) from None
    # incomplete cases are used for the modalities they have (``available``)
    cases = sorted([*found.cases, *found.incomplete], key=lambda c: c.name)
    if args.max_cases:
        cases = cases[: args.max_cases]
    if not cases:
        raise CLIError(
            f"no cases with any of the modalities {', '.join(found.modalities)} found in "
            f"{str(folder)!r} (files are matched by modality suffix, such as *-t1n.nii.gz)"
        )
    return cases, str(folder)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init_distributed() -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def _verdict(floor: float, std_error: float, reference: float, num_draws: int = 8) -> str:
    from mrissl.diagnostics._student_t import t_quantile  # 95 % interval, evaluation draws − 1 dof

    half = t_quantile(0.975, max(num_draws - num_draws // 2 - 1, 1)) * std_error
    if floor + half < reference:
        return "COLLAPSE RISK"
    if floor - half < reference:
        return "borderline"
    return "ok"


def _mask_specs(texts: Sequence[str], patch_size: int) -> list[MaskSpec]:
    """The ``--mask`` arguments parsed; a bad one is a user error naming ``--mask``."""
    from mrissl.masking import parse_mask_spec

    try:
        return [parse_mask_spec(text, patch_size) for text in texts]
    except ValueError as err:  # "spec '<text>': <reason>"
        detail = str(err).removeprefix("spec ")
        raise CLIError(f"--mask {detail} (see mrissl collapse-check --help)") from None


def _collapse_check(args: argparse.Namespace) -> int:
    from mrissl.modalities import canonical_modalities

    try:
        modalities = list(canonical_modalities(args.modalities))
    except ValueError as err:
        raise CLIError(f"--modalities: {err}") from None
    specs = _mask_specs(args.mask or DEFAULT_MASKS, args.patch_size)
    if args.reference_loss <= 0:
        raise CLIError(f"--reference-loss must be positive, got {args.reference_loss}")
    workers = _default_workers() if args.workers is None else args.workers
    if workers < 0:
        raise CLIError(f"--workers must be >= 0, got {workers}")
    started = _init_distributed()
    try:
        return _collapse_check_run(args, modalities, specs, workers)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _collapse_check_run(
    args: argparse.Namespace, modalities: list[str], specs: list[MaskSpec], workers: int
) -> int:
    from mrissl.data.collapse_run import CaseCrops, PhantomCrops, run_collapse_check
    from mrissl.diagnostics import CollapseFloorMeter
    from mrissl.distributed import rank

    if args.folder is None or args.demo:
        dataset: Any = PhantomCrops(args.phantom_cases, args.crop, modalities)
        source = f"{args.phantom_cases} synthetic phantom cases ({args.crop}³)"
    else:
        cases, folder = _find_folder_cases(args, modalities)
        dataset = CaseCrops(cases, modalities, args.crop)
        source = f"{len(cases)} cases from {folder}"
    meters = [
        CollapseFloorMeter(
            spec.generator,
            patch_size=spec.patch_size,
            num_draws=args.num_draws,
            constant=args.constant,
            on=args.on,
            seed=args.seed,
            gather_distributed=True,
        )
        for spec in specs
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = run_collapse_check(
                dataset,
                meters,
                workers=workers,
                batch_size=1,  # one case's temporaries at a time in this process
                strict=args.strict,
                progress=not args.quiet,
            )
    except ValueError as err:
        raise CLIError(_first_line(err)) from None
    _report_peak_rss()
    if rank() != 0:
        return 0
    rows = []
    for spec, result in zip(specs, run.results, strict=True):
        rows.append(
            {
                "mask": spec.text,
                "masked_fraction": result.masked_fraction,
                "floor": result.floor,
                "std_error": result.std_error,
                "per_modality": dict(zip(modalities, result.per_modality.tolist(), strict=True)),
                "per_modality_std_error": dict(
                    zip(modalities, result.per_modality_std_error.tolist(), strict=True)
                ),
                "verdict": _verdict(
                    result.floor, result.std_error, args.reference_loss, args.num_draws
                ),
            }
        )
    report = {
        "source": source,
        "modalities": modalities,
        "shape": [len(modalities), args.crop, args.crop, args.crop],
        "cases": run.cases,
        "per_modality_cases": dict(zip(modalities, run.per_modality_cases, strict=True)),
        "skipped": [{"case": s.name, "reason": s.reason} for s in run.skipped],
        "seconds": run.seconds,
        "seconds_per_case": run.seconds / max(1, run.cases + len(run.skipped)),
        "workers": workers,
        "processes": run.processes,
        "patch_size": args.patch_size,
        "constant": args.constant,
        "on": args.on,
        "num_draws": args.num_draws,
        "reference_loss": args.reference_loss,
        "results": rows,
    }
    for s in run.skipped:  # one line each, the file and the reason
        print(f"skipped {s}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False, default=_finite))
    else:
        _print_table(report)
    return 0


def _report_peak_rss() -> None:
    """For benchmarks: the main process's peak resident set size, on stderr (Linux only)."""
    if not os.environ.get("MRISSL_REPORT_PEAK_RSS"):
        return
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    kib = int(line.split()[1])
                    print(f"peak RSS of the main process: {kib * 1024} bytes", file=sys.stderr)
    except OSError:
        pass


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


GUIDE_URL = "https://mrissl.readthedocs.io/en/latest/collapse-check/"


def _print_table(report: dict[str, Any]) -> None:
    mods = report["modalities"]
    print(
        f"Complete-collapse floor Var(x_m) (E-MIM eq. 3) on {report['source']}, "
        f"patch {report['patch_size']}, constant per {report['constant']}, "
        f"mean over {report['on']} voxels"
    )
    counts = ", ".join(f"{m} {n}" for m, n in report["per_modality_cases"].items())
    skipped = f", {len(report['skipped'])} skipped" if report["skipped"] else ""
    print(
        f"{report['cases']} cases used{skipped} (cases per modality: {counts}); "
        f"{report['seconds']:.1f} s, {report['seconds_per_case']:.2f} s per case "
        f"({report['workers']} workers × {report['processes']} processes)"
    )
    head = ["mask", "masked", "Var(x_m)", "± s.e.", *mods, "verdict"]
    widths = [max(14, *(len(r["mask"]) for r in report["results"])), 7, 10, 9]
    widths += [max(8, len(m)) for m in mods] + [13]
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    )
    for r in report["results"]:
        cells = [
            r["mask"].ljust(widths[0]),
            f"{r['masked_fraction']:.0%}".rjust(widths[1]),
            f"{r['floor']:.5f}".rjust(widths[2]),
            f"{r['std_error']:.5f}".rjust(widths[3]),
            *(
                f"{r['per_modality'][m]:.5f}".rjust(w)
                for m, w in zip(mods, widths[4:-1], strict=True)
            ),
            r["verdict"].rjust(widths[-1]),
        ]
        print("  ".join(cells))
    print(
        f"reference converged loss: {report['reference_loss']} (MSE on [0, 1] images; E-MIM's "
        f"CIFAR-10 figure). A floor below it means a model that outputs a constant beats a "
        f"healthy one, so masked image modelling can collapse (E-MIM section III-A)."
    )
    print(_reading(report))


def _reading(report: dict[str, Any]) -> str:
    """A few plain sentences on what the verdicts mean for this run and what to change."""
    verdicts = {r["verdict"] for r in report["results"]}
    if report["constant"] == "voxel":
        lines = [
            "How to read it: --constant voxel (this run) lets the collapsed model output one "
            "value per voxel, the dataset's mean image. That fits pretraining on registered, "
            "whole or centred volumes. If you pretrain on random crops (BrainMVP's 96³), the "
            "mean image cannot be placed; rerun with --constant modality (higher floors)."
        ]
    else:
        lines = [
            "How to read it: --constant modality (this run) lets the collapsed model output one "
            "value per modality. That fits pretraining on random crops. For registered, whole "
            "or centred volumes it can also output the mean image: rerun with --constant voxel "
            "(lower floors, the stricter check)."
        ]
    if "COLLAPSE RISK" in verdicts:
        lines.append(
            "COLLAPSE RISK: predicting the constant already beats the reference loss, so the "
            "optimiser can settle there. Mask more structure (whole modalities or positions: "
            "hmp, block), normalise intensities per case (percentiles) so that the mean image "
            "explains less, train on random crops, or add an anti-collapse term (pyramid "
            "Barlow Twins)."
        )
    if "borderline" in verdicts:
        lines.append(
            "borderline: within two standard errors of the reference; raise --num-draws or "
            "add cases to decide."
        )
    if verdicts == {"ok"}:
        lines.append("ok: the constant's loss stays above the reference for every mask.")
    lines.append(f"Guide: {GUIDE_URL}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- rank


def _load_features(path: Path, key: str | None) -> torch.Tensor:
    import numpy as np
    import torch

    from mrissl._io import UnreadableFileError, load_tensors

    if not path.is_file():
        raise CLIError(f"file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".npz"):
            loaded: Any = np.load(path, allow_pickle=False)
            if key is not None and not hasattr(loaded, "files"):
                raise CLIError(f"--key {key!r}: {str(path)!r} holds one array, not named ones")
            if suffix == ".npz":
                names = list(loaded.files)
                name = key or (names[0] if len(names) == 1 else None)
                if name not in names:
                    raise CLIError(f"{str(path)!r} holds arrays {names}; choose one with --key")
                loaded = loaded[name]
            return torch.from_numpy(np.asarray(loaded))
        loaded = load_tensors(path, what="features")
    except (CLIError, UnreadableFileError):
        raise
    except Exception as err:
        raise CLIError(f"cannot read features from {str(path)!r}: {_first_line(err)}") from None
    if key is not None and not isinstance(loaded, dict):
        raise CLIError(f"--key {key!r}: {str(path)!r} holds one array, not named ones")
    if isinstance(loaded, dict):
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        name = key or (next(iter(tensors)) if len(tensors) == 1 else None)
        if name not in tensors:
            raise CLIError(f"{str(path)!r} holds tensors {sorted(tensors)}; choose one with --key")
        loaded = tensors[name]
    if not isinstance(loaded, torch.Tensor):
        raise CLIError(f"{str(path)!r} holds a {type(loaded).__name__}, not a tensor of features")
    return loaded


def _rank(args: argparse.Namespace) -> int:
    import torch

    from mrissl.diagnostics import effective_rank, rankme, singular_values

    z = _load_features(Path(args.file), args.key)
    if z.ndim not in (2, 3) or not (z.is_floating_point() or z.dtype in (torch.int32, torch.int64)):
        raise CLIError(
            f"features must be a (N, D) or (B, N, E) numeric array, got shape {tuple(z.shape)} "
            f"and dtype {z.dtype}"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sv = singular_values(z.double(), center=not args.no_center)
        notes = [str(w.message) for w in caught]
        erank = float(effective_rank(sv))
        rme = float(rankme(sv))
    except ValueError as err:
        raise CLIError(str(err)) from None
    samples = z.shape[0] if z.ndim == 2 else z.shape[0] * z.shape[1]
    report = {
        "file": str(args.file),
        "samples": samples,
        "dim": z.shape[-1],
        "centered": not args.no_center,
        "effective_rank": erank,
        "rankme": rme,
        "max_rank": min(samples, z.shape[-1]),
        "singular_values": sv.tolist(),
        "notes": notes,
    }
    if args.plot:
        try:
            from mrissl.diagnostics import plot_spectrum

            plot_spectrum({Path(args.file).stem: sv}, path=args.plot)
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install 'mrissl[plot]'") from None
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    centred = "centred" if report["centered"] else "not centred"
    print(f"{args.file}: {samples} samples × {z.shape[-1]} dims ({centred})")
    print(
        f"effective rank (Roy & Vetterli) {erank:.3f}   RankMe {rme:.3f}   "
        f"of at most {report['max_rank']}"
    )
    top = ", ".join(f"{s:.4g}" for s in sv[: args.top].tolist())
    print(f"largest singular values: {top}")
    for note in notes:
        print(f"note: {note}")
    if args.plot:
        print(f"spectrum plot written to {args.plot}")
    return 0


# --------------------------------------------------------------------------- templates


def _templates_export(args: argparse.Namespace) -> int:
    import torch

    from mrissl._io import load_tensors
    from mrissl.templates import ModalityTemplates

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise CLIError(f"checkpoint {str(checkpoint)!r} does not exist")
    state = load_tensors(checkpoint, what="checkpoint")  # ValueError: one line naming it
    if not isinstance(state, dict):
        raise CLIError(f"{str(checkpoint)!r} holds a {type(state).__name__}, not a state_dict")
    affine = None
    if args.spacing is not None:
        affine = torch.diag(torch.tensor([*args.spacing, 1.0], dtype=torch.float64))
    try:
        templates = ModalityTemplates.from_state_dict(state, prefix=args.prefix)
        paths = templates.to_nifti(args.folder, affine=affine, normalized=not args.raw)
    except (ValueError, OSError) as err:
        raise CLIError(_first_line(err)) from None
    shape = "×".join(str(s) for s in templates.shape)
    print(f"wrote {len(paths)} templates of {shape} voxels to {args.folder}:")
    for path in paths:
        print(f"  {path}")
    return 0


# --------------------------------------------------------------------------- entry point


_POSITIVE_SIDE = _arg.int_in(1, _arg.MAX_SIDE, "a positive whole number of voxels")
_NUM_DRAWS = _arg.int_in(3, _arg.MAX_COUNT, "a whole number of passes (at least 3)")
_MAX_CASES = _arg.int_in(0, _arg.MAX_COUNT * 100, "a whole number of cases (0 = all)")
_PHANTOM_CASES = _arg.int_in(2, _arg.MAX_COUNT, "a whole number of cases (at least 2)")
_SEED = _arg.int_in(0, _arg.MAX_SEED, "a non-negative whole number")
_TOP = _arg.int_in(0, _arg.MAX_COUNT, "a non-negative whole number")
_WORKERS = _arg.int_in(0, 256, "a non-negative whole number of loader processes")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> Any:  # argparse's signature is NoReturn
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mrissl",
        description="Checks for self-supervised pretraining on multi-modal 3D MRI.",
    )
    parser.add_argument("--version", action="version", version=f"mrissl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    cc = sub.add_parser(
        "collapse-check",
        help="complete-collapse floor Var(x_m) per masking strategy (E-MIM eq. 3)",
        description=(
            "Estimate, for each masking strategy, the complete-collapse floor Var(x_m) of "
            "E-MIM (eq. 3): the mean squared error of the best constant predictor of the "
            "masked voxels over the dataset and the mask distribution (a Monte Carlo "
            "estimate with its standard error), per modality and overall, and compare it "
            "with the loss a healthy model converges to. Reads a folder of NIfTI cases once, "
            "in parallel (--workers), each preprocessed as in BrainMVP (RAS, 1 mm, 1-99 "
            "percentile scaling to [0, 1], foreground box) and cropped or padded to --crop "
            "around the centre; memory does not grow with the number of cases. A case lacking "
            "a modality is used for the modalities it has; an unreadable case (corrupt, "
            "off-grid, 4D) is skipped and listed (--strict: exit 2 instead). Under torchrun "
            "(torchrun --nproc_per_node=K -m mrissl collapse-check FOLDER) the cases are split "
            "among the processes and rank 0 prints the same report. Without a folder, or with "
            "--demo, it uses the built-in synthetic phantom."
        ),
        epilog=_MASK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cc.add_argument(
        "folder", nargs="?", help="dataset folder of NIfTI files (omit for the phantom)"
    )
    cc.add_argument("--demo", action="store_true", help="run on the synthetic phantom")
    cc.add_argument(
        "--modalities",
        nargs="+",
        default=list(DEFAULT_MODALITIES),
        metavar="NAME",
        type=_arg.modality,
        help="modalities in channel order, any known spelling (default: t1 t1ce t2 flair)",
    )
    cc.add_argument(
        "--mask",
        action="append",
        metavar="SPEC",
        help=f"masking strategy, repeatable (default: {' '.join(DEFAULT_MASKS)})",
    )
    cc.add_argument(
        "--patch-size", type=_POSITIVE_SIDE, default=16, help="token patch size (default 16)"
    )
    cc.add_argument(
        "--crop", type=_POSITIVE_SIDE, default=96, help="cubic crop size in voxels (default 96)"
    )
    cc.add_argument(
        "--num-draws",
        type=_NUM_DRAWS,
        default=8,
        help="Monte Carlo masks per case (default 8; the data are read once)",
    )
    cc.add_argument(
        "--constant",
        choices=("voxel", "modality"),
        default="voxel",
        help="the collapsed model's constant: one per voxel and modality (default; registered, "
        "whole or centred volumes), or one per modality (pretraining on random crops)",
    )
    cc.add_argument(
        "--on",
        choices=("masked", "all"),
        default="masked",
        help="masked: a model ignoring its input (default); all: one copying visible voxels",
    )
    cc.add_argument(
        "--reference-loss",
        type=_arg.positive_float,
        default=REFERENCE_LOSS,
        help=f"loss of a healthy converged model to compare with (default {REFERENCE_LOSS})",
    )
    cc.add_argument("--max-cases", type=_MAX_CASES, default=0, help="use at most this many cases")
    cc.add_argument(
        "--workers",
        type=_WORKERS,
        default=None,
        metavar="N",
        help="loader processes reading cases (default: the number of CPUs; 0 reads in the "
        "main process); results do not depend on it",
    )
    cc.add_argument(
        "--strict",
        action="store_true",
        help="stop with exit code 2 at the first case that cannot be read, instead of "
        "skipping and listing it",
    )
    cc.add_argument(
        "--phantom-cases", type=_PHANTOM_CASES, default=8, help="phantom cases (default 8)"
    )
    cc.add_argument(
        "--seed", type=_SEED, default=0, help="seed of the mask draws (case i uses seed and i)"
    )
    cc.add_argument("--json", action="store_true", help="print a JSON report instead of a table")
    cc.add_argument("--quiet", action="store_true", help="no progress bar")
    cc.set_defaults(run=_collapse_check)

    rk = sub.add_parser(
        "rank",
        help="singular values, effective rank and RankMe of saved features",
        description=(
            "Singular value spectrum of a feature matrix (N, D) — or (B, N, E) tokens taken "
            "as B·N samples — in float64, with the effective rank of Roy & Vetterli "
            "(exp of the entropy of the normalised singular values) and RankMe (Garrido et "
            "al.). Reads torch.save files (loaded with weights_only=True) or NumPy .npy/.npz."
        ),
    )
    rk.add_argument(
        "file",
        type=_arg.existing_file,
        help="features: .pt/.pth (a tensor or a dict of tensors), .npy or .npz",
    )
    rk.add_argument("--key", help="which tensor of a dict or .npz file")
    rk.add_argument("--no-center", action="store_true", help="do not subtract the feature mean")
    rk.add_argument("--top", type=_TOP, default=10, help="singular values to print (default 10)")
    rk.add_argument(
        "--plot",
        metavar="PNG",
        type=_arg.new_file,
        help="save a log-scale spectrum plot (extra 'plot')",
    )
    rk.add_argument("--json", action="store_true", help="print a JSON report")
    rk.set_defaults(run=_rank)

    tp = sub.add_parser("templates", help="BrainMVP learnable modality templates")
    tsub = tp.add_subparsers(dest="templates_command", metavar="COMMAND", required=True)
    ex = tsub.add_parser(
        "export",
        help="write the templates of a checkpoint as NIfTI files",
        description=(
            "Find the learnable modality templates (BrainMVP's modality-wise data "
            "distillation, mrissl.templates.ModalityTemplates) in a checkpoint saved with "
            "torch.save (read with weights_only=True) and write one <modality>.nii.gz per "
            "modality, with the modality names and order in each header."
        ),
    )
    ex.add_argument(
        "checkpoint",
        type=_arg.existing_file,
        help="a state_dict, or a dict nesting one, saved with torch.save",
    )
    ex.add_argument("folder", type=_arg.output_folder, help="output folder (created if needed)")
    ex.add_argument("--prefix", help="the templates' key prefix when there are several")
    ex.add_argument(
        "--spacing",
        nargs=3,
        type=_arg.positive_float,
        metavar=("SD", "SH", "SW"),
        help="voxel size in mm for the affine (default: the affine stored with the templates)",
    )
    ex.add_argument(
        "--raw", action="store_true", help="write the raw parameters, not the normalised values"
    )
    ex.set_defaults(run=_templates_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mrissl`` command; returns the exit code (2 for user errors).

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        ``0`` on success, ``2`` for a usage or data error (one line on stderr).

    Examples:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "z.pt")
        >>> torch.save(torch.eye(3), path)
        >>> main(["rank", path, "--no-center", "--top", "3"])
        /...z.pt: 3 samples × 3 dims (not centred)
        effective rank (Roy & Vetterli) 3.000   RankMe 3.000   of at most 3
        largest singular values: 1, 1, 1
        0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return run(args)
    except CLIError as err:
        print(f"mrissl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # from the user's files or arguments; others are bugs
        print(f"mrissl {args.command}: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    """Console-script entry point: ``mrissl`` exits with the code of [`main`][mrissl.cli.main]."""
    raise SystemExit(main())

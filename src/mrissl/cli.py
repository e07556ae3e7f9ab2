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

from mrissl import _cli_rank, _cli_templates
from mrissl._cli_args import CLIError
from mrissl._cli_args import first_line as _first_line
from mrissl._cli_parser import DEFAULT_MASKS, build_parser

if TYPE_CHECKING:  # imported inside the subcommand at run time (fast --help)
    from mrissl.masking import MaskSpec

__all__ = ["main", "main_entry"]


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
        dataset: Any = PhantomCrops(args.phantom_cases, crop=args.crop, modalities=modalities)
        source = f"{args.phantom_cases} synthetic phantom cases ({args.crop}³)"
    else:
        cases, folder = _find_folder_cases(args, modalities)
        dataset = CaseCrops(cases, modalities=modalities, crop=args.crop)
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
                batch_size=_cases_per_update(len(modalities), args.crop),
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


def _cases_per_update(channels: int, crop: int) -> int:
    """Cases per update of the meters: up to 8, about 256 MiB of crops (bounded memory)."""
    return max(1, min(8, (256 << 20) // (4 * channels * crop**3)))


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


# --------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    """The ``mrissl`` argument parser, each subcommand bound to the function that runs it."""
    return build_parser(
        collapse_check=_collapse_check, rank=_cli_rank.run, templates_export=_cli_templates.run
    )


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

"""The ``mrissl`` command: checks a researcher runs on their own data before pretraining.

* ``mrissl collapse-check [FOLDER]``: for each masking strategy, the complete-collapse floor
  Var(x_m) of E-MIM (eq. 3), the loss a model that ignores its input and predicts a constant
  would reach, next to the loss a healthy model converges to. Without a folder it runs on the
  built-in synthetic phantom.
* ``mrissl rank FILE``: singular value spectrum, effective rank and RankMe of saved features.
* ``mrissl templates export CHECKPOINT FOLDER``: learned modality templates to NIfTI files.

Every failure the user can cause (a missing folder, no cases, an unreadable file, a bad mask
specification) ends with exit code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mrissl._version import __version__

__all__ = ["MaskSpec", "main", "main_entry", "parse_mask_spec"]

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


@dataclass(frozen=True)
class MaskSpec:
    """A parsed ``--mask`` argument: its text, the generator and the patch size it needs."""

    text: str
    generator: Any
    patch_size: int | None


def _ratio(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"--mask {spec!r}: {text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise CLIError(f"--mask {spec!r}: the ratio must be in [0, 1), got {value}")
    return value


def _count(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise CLIError(f"--mask {spec!r}: expected a positive whole number, got {text!r}")
    return int(text)


def parse_mask_spec(spec: str, patch_size: int) -> MaskSpec:
    """Turn a ``--mask`` specification into a mask generator (see ``--help``).

    Args:
        spec: for example ``"random:0.75"``, ``"hmp"``, ``"hmp:1,0.5,-"`` or ``"block:0.875"``.
        patch_size: the token patch size used by every generator but ``block``.

    Returns:
        The [`MaskSpec`][mrissl.cli.MaskSpec].

    Raises:
        CLIError: naming the specification and what is wrong with it.

    Examples:
        >>> parse_mask_spec("random:0.75", 16).generator
        RandomTokenMask(mask_ratio=0.75, shared_across_modalities=True)
        >>> parse_mask_spec("block:0.875:8", 16).patch_size is None
        True
    """
    from mrissl import masking

    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "random" or kind == "random-each":
        if not arg:
            raise CLIError(f"--mask {spec!r}: give the ratio, as in random:0.75")
        gen: Any = masking.RandomTokenMask(
            _ratio(arg, spec), shared_across_modalities=kind == "random"
        )
        return MaskSpec(spec, gen, patch_size)
    if kind == "hmp":
        if not arg:
            return MaskSpec(spec, masking.HybridMaskPattern(), patch_size)
        parts = arg.split(",")
        if len(parts) != 3:
            raise CLIError(f"--mask {spec!r}: hmp takes three values M,P,Q ('-' for off)")
        modal = None if parts[0] == "-" else _count(parts[0], spec)
        position = None if parts[1] == "-" else _ratio(parts[1], spec)
        patch = None if parts[2] == "-" else _ratio(parts[2], spec)
        try:
            gen = masking.HybridMaskPattern(modal=modal, position=position, patch=patch)
        except ValueError as err:
            raise CLIError(f"--mask {spec!r}: {err}") from None
        return MaskSpec(spec, gen, patch_size)
    if kind == "modal":
        return MaskSpec(spec, masking.ModalMask(_count(arg, spec) if arg else 1), patch_size)
    if kind == "position":
        return MaskSpec(spec, masking.PositionMask(_ratio(arg, spec)), patch_size)
    if kind == "patch":
        return MaskSpec(spec, masking.PatchMask(_ratio(arg, spec)), patch_size)
    if kind == "block":
        ratio_text, _, size_text = arg.partition(":")
        if not ratio_text:
            raise CLIError(f"--mask {spec!r}: give the ratio, as in block:0.875")
        size = _count(size_text, spec) if size_text else 8
        gen = masking.BlockMask(block_size=size, mask_ratio=_ratio(ratio_text, spec))
        return MaskSpec(spec, gen, None)
    raise CLIError(
        f"--mask {spec!r}: unknown kind {kind!r}; expected random, random-each, hmp, modal, "
        f"position, patch or block (see mrissl collapse-check --help)"
    )


# --------------------------------------------------------------------------- collapse-check


def _load_folder(args: argparse.Namespace, modalities: Sequence[str]) -> tuple[torch.Tensor, str]:
    from mrissl.data import find_cases, preprocessing

    folder = Path(args.folder)
    if not folder.exists():
        raise CLIError(f"folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise CLIError(f"{str(folder)!r} is not a folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = find_cases(folder, modalities, on_missing="ignore")
    except ValueError as err:
        raise CLIError(str(err)) from None
    if found.incomplete:
        names = ", ".join(f"{c.name} (no {'/'.join(c.missing)})" for c in found.incomplete[:5])
        more = f" and {len(found.incomplete) - 5} more" if len(found.incomplete) > 5 else ""
        print(
            f"skipping {len(found.incomplete)} incomplete case(s): {names}{more}", file=sys.stderr
        )
    cases = list(found)[: args.max_cases] if args.max_cases else list(found)
    if not cases:
        raise CLIError(
            f"no complete cases with modalities {', '.join(found.modalities)} found in "
            f"{str(folder)!r} (files are matched by modality suffix, such as *-t1n.nii.gz)"
        )
    pipeline = preprocessing(load=True, crop="center", roi_size=args.crop)
    volumes = []
    for case in _progress(cases, "loading cases", enabled=not args.quiet):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = pipeline({"image": dict(case.paths)})["image"]
        except Exception as err:  # nibabel and MONAI raise many kinds; name the case
            raise CLIError(f"cannot read case {case.name!r}: {_first_line(err)}") from None
        volumes.append(torch.as_tensor(image).float())
    return torch.stack(volumes), f"{len(volumes)} cases from {folder}"


def _phantom(args: argparse.Namespace, modalities: Sequence[str]) -> tuple[torch.Tensor, str]:
    from mrissl.data import PhantomDataset

    dataset = PhantomDataset(args.phantom_cases, shape=args.crop, modalities=modalities, seed=0)
    volumes = [dataset[i] for i in _progress(range(len(dataset)), "phantom", not args.quiet)]
    return torch.stack(volumes), f"{len(volumes)} synthetic phantom cases ({args.crop}³)"


def _progress(items: Sequence[Any], desc: str, enabled: bool) -> Any:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, file=sys.stderr, leave=False)


def _verdict(floor: float, std_error: float, reference: float, num_draws: int = 8) -> str:
    from mrissl.diagnostics._student_t import t_quantile  # 95 % interval, evaluation draws − 1 dof

    half = t_quantile(0.975, max(num_draws - num_draws // 2 - 1, 1)) * std_error
    if floor + half < reference:
        return "COLLAPSE RISK"
    if floor - half < reference:
        return "borderline"
    return "ok"


def _collapse_check(args: argparse.Namespace) -> int:
    from mrissl.diagnostics import collapsed_loss_floor
    from mrissl.modalities import canonical_modalities

    try:
        modalities = list(canonical_modalities(args.modalities))
    except ValueError as err:
        raise CLIError(f"--modalities: {err}") from None
    specs = [parse_mask_spec(s, args.patch_size) for s in (args.mask or DEFAULT_MASKS)]
    if args.reference_loss <= 0:
        raise CLIError(f"--reference-loss must be positive, got {args.reference_loss}")
    if args.folder is None or args.demo:
        volumes, source = _phantom(args, modalities)
    else:
        volumes, source = _load_folder(args, modalities)
    if volumes.shape[0] < 2:
        raise CLIError(f"need at least 2 cases to estimate a variance, got {volumes.shape[0]}")

    rows = []
    for spec in specs:
        g = torch.Generator().manual_seed(args.seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = collapsed_loss_floor(
                    volumes,
                    spec.generator,
                    patch_size=spec.patch_size,
                    num_draws=args.num_draws,
                    constant=args.constant,
                    reduction=args.reduction,
                    generator=g,
                    progress=False,
                )
        except ValueError as err:
            raise CLIError(f"--mask {spec.text!r}: {err}") from None
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
        "shape": list(volumes.shape[1:]),
        "patch_size": args.patch_size,
        "constant": args.constant,
        "reduction": args.reduction,
        "num_draws": args.num_draws,
        "reference_loss": args.reference_loss,
        "results": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False, default=_finite))
    else:
        _print_table(report)
    return 0


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _print_table(report: dict[str, Any]) -> None:
    mods = report["modalities"]
    print(
        f"Complete-collapse floor Var(x_m) (E-MIM eq. 3) on {report['source']}, "
        f"patch {report['patch_size']}, constant per {report['constant']}, "
        f"mean over {report['reduction']} voxels"
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


# --------------------------------------------------------------------------- rank


def _load_features(path: Path, key: str | None) -> torch.Tensor:
    import numpy as np

    if not path.is_file():
        raise CLIError(f"file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".npz"):
            loaded: Any = np.load(path, allow_pickle=False)
            if suffix == ".npz":
                names = list(loaded.files)
                name = key or (names[0] if len(names) == 1 else None)
                if name not in names:
                    raise CLIError(f"{str(path)!r} holds arrays {names}; choose one with --key")
                loaded = loaded[name]
            return torch.from_numpy(np.asarray(loaded))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(f"cannot read features from {str(path)!r}: {_first_line(err)}") from None
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
    from mrissl.templates import ModalityTemplates

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise CLIError(f"checkpoint {str(checkpoint)!r} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CLIError(f"cannot read checkpoint {str(checkpoint)!r}: {_first_line(err)}") from None
    if not isinstance(state, dict):
        raise CLIError(f"{str(checkpoint)!r} holds a {type(state).__name__}, not a state_dict")
    affine = None
    if args.spacing is not None:
        affine = torch.diag(torch.tensor([*args.spacing, 1.0], dtype=torch.float64))
    try:
        templates = ModalityTemplates.from_state_dict(state, prefix=args.prefix)
        paths = templates.to_nifti(args.folder, affine=affine, normalised=not args.raw)
    except (ValueError, OSError) as err:
        raise CLIError(_first_line(err)) from None
    shape = "×".join(str(s) for s in templates.shape)
    print(f"wrote {len(paths)} templates of {shape} voxels to {args.folder}:")
    for path in paths:
        print(f"  {path}")
    return 0


# --------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
            "with the loss a healthy model converges to. Reads a folder of NIfTI cases "
            "(cropped or padded to --crop around the centre after RAS reorientation, 1 mm "
            "resampling and 1-99 percentile scaling to [0, 1]); without a folder, or with "
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
        help="modalities in channel order, any known spelling (default: t1 t1ce t2 flair)",
    )
    cc.add_argument(
        "--mask",
        action="append",
        metavar="SPEC",
        help=f"masking strategy, repeatable (default: {' '.join(DEFAULT_MASKS)})",
    )
    cc.add_argument("--patch-size", type=int, default=16, help="token patch size (default 16)")
    cc.add_argument("--crop", type=int, default=96, help="cubic crop size in voxels (default 96)")
    cc.add_argument("--num-draws", type=int, default=8, help="Monte Carlo passes (default 8)")
    cc.add_argument(
        "--constant",
        choices=("voxel", "modality"),
        default="voxel",
        help="the collapsed model's constant: one per voxel and modality (default), or one per "
        "modality (for random crops)",
    )
    cc.add_argument(
        "--reduction",
        choices=("masked", "all"),
        default="masked",
        help="masked: a model ignoring its input (default); all: one copying visible voxels",
    )
    cc.add_argument(
        "--reference-loss",
        type=float,
        default=REFERENCE_LOSS,
        help=f"loss of a healthy converged model to compare with (default {REFERENCE_LOSS})",
    )
    cc.add_argument("--max-cases", type=int, default=0, help="use at most this many cases")
    cc.add_argument("--phantom-cases", type=int, default=8, help="phantom cases (default 8)")
    cc.add_argument("--seed", type=int, default=0, help="seed of the mask draws")
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
    rk.add_argument("file", help="features: .pt/.pth (a tensor or a dict of tensors), .npy or .npz")
    rk.add_argument("--key", help="which tensor of a dict or .npz file")
    rk.add_argument("--no-center", action="store_true", help="do not subtract the feature mean")
    rk.add_argument("--top", type=int, default=10, help="singular values to print (default 10)")
    rk.add_argument("--plot", metavar="PNG", help="save a log-scale spectrum plot (extra 'plot')")
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
    ex.add_argument("checkpoint", help="a state_dict, or a dict nesting one, saved with torch.save")
    ex.add_argument("folder", help="output folder (created if needed)")
    ex.add_argument("--prefix", help="the templates' key prefix when there are several")
    ex.add_argument(
        "--spacing",
        nargs=3,
        type=float,
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
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "z.pt")
        >>> torch.save(torch.eye(3), path)
        >>> main(["rank", path, "--no-center", "--top", "3"])
        /...z.pt: 3 samples × 3 dims (not centred)
        effective rank (Roy & Vetterli) 3.000   RankMe 3.000   of at most 3
        largest singular values: 1, 1, 1
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return run(args)
    except CLIError as err:
        print(f"mrissl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    """Console-script entry point: ``mrissl`` exits with the code of [`main`][mrissl.cli.main]."""
    raise SystemExit(main())

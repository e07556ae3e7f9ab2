"""The ``mrissl`` command's argument parser (private): subcommands, options, defaults and help.

Standard library only, so ``mrissl --help`` answers without importing torch. The functions
that run each subcommand are passed in by [`mrissl.cli`][mrissl.cli], which owns them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mrissl import _cli_args as _arg
from mrissl._version import __version__

__all__: list[str] = []

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


def build_parser(
    *,
    collapse_check: Callable[[argparse.Namespace], int],
    rank: Callable[[argparse.Namespace], int],
    templates_export: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """The ``mrissl`` parser; each subcommand's ``run`` default is the function given for it."""
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
    cc.set_defaults(run=collapse_check)

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
    rk.set_defaults(run=rank)

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
    ex.set_defaults(run=templates_export)
    return parser

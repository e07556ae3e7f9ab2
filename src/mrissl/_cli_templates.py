"""``mrissl templates export`` (private): learned modality templates to NIfTI files.

Standard library only at import time; torch and the templates are imported when the
subcommand runs, so ``mrissl --help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mrissl._cli_args import CLIError, first_line

__all__: list[str] = []


def run(args: argparse.Namespace) -> int:
    """``mrissl templates export CHECKPOINT FOLDER``: one NIfTI file per learned template."""
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
        raise CLIError(first_line(err)) from None
    shape = "×".join(str(s) for s in templates.shape)
    print(f"wrote {len(paths)} templates of {shape} voxels to {args.folder}:")
    for path in paths:
        print(f"  {path}")
    return 0

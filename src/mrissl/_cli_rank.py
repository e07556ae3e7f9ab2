"""``mrissl rank FILE`` (private): spectrum, effective rank and RankMe of saved features.

Standard library only at import time; torch, NumPy and the diagnostics are imported when the
subcommand runs, so ``mrissl --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mrissl._cli_args import CLIError, first_line

if TYPE_CHECKING:  # imported inside the subcommand at run time (fast --help)
    import torch

__all__: list[str] = []


def load_features(path: Path, key: str | None) -> torch.Tensor:
    """Read one ``(N, D)`` or ``(B, N, E)`` feature tensor from a torch or NumPy file."""
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
        raise CLIError(f"cannot read features from {str(path)!r}: {first_line(err)}") from None
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


def run(args: argparse.Namespace) -> int:
    """``mrissl rank FILE``: print (or ``--json``) the spectrum, effective rank and RankMe."""
    import torch

    from mrissl.diagnostics import effective_rank, rankme, singular_values

    z = load_features(Path(args.file), args.key)
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

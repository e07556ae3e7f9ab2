"""Argument types and user errors of the ``mrissl`` command (private).

``CLIError`` is a user error that the command reports as one line on stderr with exit code 2.
Every other function is an argparse ``type=``: it turns the text into a value or raises
``argparse.ArgumentTypeError`` whose message argparse prints after the option's name, so a bad
argument is one line and exit code 2 before any work starts. Standard library only, so
``mrissl --help`` stays instant.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from mrissl.modalities import MODALITIES, canonical_modality

__all__: list[str] = []

#: a cubic crop or patch side above this is far beyond any MRI volume (and would exhaust memory)
MAX_SIDE = 1024
#: Monte Carlo passes, phantom cases, printed singular values: generous, finite limits
MAX_COUNT = 100_000
#: torch.Generator.manual_seed takes at most 64 bits; seeds are kept non-negative
MAX_SEED = 2**63 - 1


class CLIError(Exception):
    """A user error: reported as one line on stderr with exit code 2."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its repr when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An int type accepting ``low <= value <= high``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected {what} in [{low}, {high}], got {value}"
            ) from None
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def positive_float(text: str) -> float:
    """A finite float greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {text!r}")
    return value


def modality(text: str) -> str:
    """A known modality name in any spelling, returned canonical."""
    try:
        return canonical_modality(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown modality {text!r}; known modalities: {', '.join(MODALITIES)} "
            "(and their usual spellings, such as t1n, t2w, t2f, t1c)"
        ) from None


def existing_file(text: str) -> str:
    """A path to an existing regular file."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file")
    return text


def _writable_folder(folder: Path, text: str) -> None:
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: folder {str(folder)!r} is read-only"
        )


def new_file(text: str) -> str:
    """A file to write: its folder must exist and be writable; it must not be a folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file name")
    folder = path.parent
    if not folder.exists():
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: folder {str(folder)!r} does not exist"
        )
    _writable_folder(folder, text)
    return text


def output_folder(text: str) -> str:
    """A folder to write into (created if needed): its nearest existing ancestor is a folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    path = Path(text)
    if path.exists():
        _writable_folder(path, text)
        return text
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    _writable_folder(ancestor, text)
    return text

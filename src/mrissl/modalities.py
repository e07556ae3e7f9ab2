"""Canonical MRI modality names and the aliases that datasets use for them.

Public datasets spell the same contrast in many ways: BraTS 2021 writes ``t1ce`` and ``flair``,
BraTS 2023 writes ``t1c`` and ``t2f``, IXI writes ``PD`` and ``T2``, BIDS writes ``T1w`` and
``FLAIR``. mrissl names each modality once, with the lower-case canonical names of
[`MODALITIES`][mrissl.modalities.MODALITIES], and maps every known spelling onto them with
[`canonical_modality`][mrissl.modalities.canonical_modality]. The data loaders, the learnable
modality templates and the command line all use this one table, so a template learned on
BraTS 2021 (``t1ce``) fills a BraTS 2023 case (``t1c``).

Matching ignores case and the separators ``-``, ``_``, ``.`` and spaces: ``"T1-Gd"``, ``"t1_gd"``
and ``"t1gd"`` are the same alias.

This module imports nothing but the standard library, so every layer of mrissl may use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

__all__ = ["MODALITIES", "MODALITY_ALIASES", "canonical_modalities", "canonical_modality"]

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair", "pd", "dwi", "adc", "mra")
"""The canonical modality names, in the order mrissl lists them: the eight MRI contrasts of
BrainMVP's pretraining collection (BraTS, UCSF-PDGM, IXI)."""

# Spellings seen in public collections, written as people write them; matching ignores case
# and separators, so "t1-gd" also covers "T1_Gd" and "t1gd".
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "t1": ("t1", "t1n", "t1w", "t1-native", "t1-pre", "t1-precontrast"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1-gd", "t1-post", "t1-contrast", "t1wce", "t1w-ce", "t1cgd"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2-flair", "t2w-flair"),
    "pd": ("pd", "pdw"),
    "dwi": ("dwi", "dw", "trace"),
    "adc": ("adc",),
    "mra": ("mra", "tof", "tof-mra"),
}

_SEPARATORS = re.compile(r"[-_.\s]+")


def _key(name: str) -> str:
    return _SEPARATORS.sub("", name.strip().lower())


MODALITY_ALIASES: Mapping[str, str] = MappingProxyType(
    {_key(alias): canonical for canonical, aliases in _SPELLINGS.items() for alias in aliases}
)
"""Every known alias (lower case, separators removed) mapped to its canonical name."""


def canonical_modality(name: str) -> str:
    """Return the canonical name of a modality given any of its known spellings.

    Args:
        name: a modality name as a dataset spells it, for example ``"T1Gd"``, ``"t2f"`` or
            ``"T1w"``. Case and the separators ``-``, ``_``, ``.`` and spaces are ignored.

    Returns:
        One of [`MODALITIES`][mrissl.modalities.MODALITIES].

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: if ``name`` is not a known spelling; the message lists the known names.

    Examples:
        >>> canonical_modality("T1-Gd"), canonical_modality("t2f"), canonical_modality("T1w")
        ('t1ce', 'flair', 't1')
        >>> canonical_modality("swi")
        Traceback (most recent call last):
            ...
        ValueError: unknown modality 'swi'; known modalities: t1 (t1n, t1w, ...
    """
    if not isinstance(name, str):
        raise TypeError(f"modality name must be a str, got {type(name).__name__} {name!r}")
    canonical = MODALITY_ALIASES.get(_key(name))
    if canonical is None:
        known = "; ".join(
            f"{c} ({', '.join(a for a in aliases if a != c)})" if len(aliases) > 1 else c
            for c, aliases in _SPELLINGS.items()
        )
        raise ValueError(
            f"unknown modality {name!r}; known modalities: {known}. "
            "Case and the separators '-', '_', '.' and spaces are ignored."
        )
    return canonical


def canonical_modalities(names: Iterable[str], argument: str = "modalities") -> tuple[str, ...]:
    """Resolve several modality names, checking that no modality is named twice.

    Args:
        names: modality names in any known spelling, in the order the caller wants them.
        argument: the argument name to use in error messages.

    Returns:
        The canonical names, in the given order.

    Raises:
        TypeError: if ``names`` is a single string or holds a non-string.
        ValueError: if a name is unknown, if two names mean the same modality, or if
            ``names`` is empty.

    Examples:
        >>> canonical_modalities(["T1n", "t1c", "T2w", "t2-flair"])
        ('t1', 't1ce', 't2', 'flair')
        >>> canonical_modalities(["t1", "T1w"])
        Traceback (most recent call last):
            ...
        ValueError: modalities names the same modality twice: 'T1w' and 't1' are both 't1'
    """
    if isinstance(names, str):
        raise TypeError(
            f"{argument} must be a sequence of modality names, got the single string {names!r}; "
            f"write [{names!r}] for one modality"
        )
    seen: dict[str, str] = {}
    out = []
    for name in names:
        canonical = canonical_modality(name)
        if canonical in seen:
            raise ValueError(
                f"{argument} names the same modality twice: {name!r} and {seen[canonical]!r} "
                f"are both {canonical!r}"
            )
        seen[canonical] = name
        out.append(canonical)
    if not out:
        raise ValueError(f"{argument} must name at least one modality, got none")
    return tuple(out)

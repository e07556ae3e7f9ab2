"""Mask generators named in one line of text, as ``mrissl collapse-check --mask`` takes them.

The grammar (``random:R``, ``random-each:R``, ``hmp[:M,P,Q]``, ``modal[:M]``,
``position:R``, ``patch:R``, ``block:R[:S]``) is in
[the masking guide][masks-as-text].
"""

from __future__ import annotations

from typing import NamedTuple

from mrissl._checks import check_number
from mrissl.masking._base import MaskGenerator
from mrissl.masking.block import BlockMask
from mrissl.masking.hybrid import HybridMaskPattern, ModalMask, PatchMask, PositionMask
from mrissl.masking.random import RandomTokenMask

__all__ = ["MaskSpec", "parse_mask_spec"]

_KINDS = "random, random-each, hmp, modal, position, patch or block"


class MaskSpec(NamedTuple):
    """A parsed mask specification, from [`parse_mask_spec`][mrissl.masking.parse_mask_spec].

    Attributes:
        text: the specification as given.
        generator: the [`MaskGenerator`][mrissl.masking.MaskGenerator] it names.
        patch_size: the token patch size to call the generator with; ``None`` for ``block``,
            whose tokens are its blocks.
    """

    text: str
    generator: MaskGenerator
    patch_size: int | None


def _error(spec: str, reason: str) -> ValueError:
    return ValueError(f"spec {spec!r}: {reason}")


def _ratio(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(spec, f"{text!r} is not a number") from None
    try:
        return check_number(value, "the ratio", low=0, high=1, high_open=True)
    except ValueError as err:
        raise _error(spec, str(err)) from None


def _count(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _error(spec, f"expected a positive whole number, got {text!r}")
    return int(text)


def parse_mask_spec(spec: str, patch_size: int) -> MaskSpec:
    """Turn a one-line mask specification into its mask generator.

    ``"kind[:arguments]"``, for example ``"random:0.75"``, ``"hmp"``, ``"hmp:1,0.5,-"`` or
    ``"block:0.875:8"``; every kind is listed in
    [the masking guide][masks-as-text].

    Args:
        spec: the specification; the kind is case-insensitive.
        patch_size: the token patch size used by every kind but ``block``.

    Returns:
        [`MaskSpec`][mrissl.masking.MaskSpec] ``(text, generator, patch_size)``.

    Raises:
        ValueError: ``"spec '...': ..."``, naming the specification and what is wrong with it
            (an unknown kind, a missing or bad number, a ratio outside ``[0, 1)``); for a
            ``patch_size`` below 1.
        TypeError: for a ``spec`` that is not a string or a ``patch_size`` that is not an int.

    Examples:
        >>> parse_mask_spec("random:0.75", 16).generator
        RandomTokenMask(mask_ratio=0.75, shared_across_modalities=True)
        >>> parse_mask_spec("block:0.875:8", 16).patch_size is None
        True
        >>> parse_mask_spec("random:1.5", 16)
        Traceback (most recent call last):
            ...
        ValueError: spec 'random:1.5': the ratio must be a finite number >= 0 and < 1, got 1.5
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__} {spec!r}")
    check_number(patch_size, "patch_size", low=1, integer=True)
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    gen: MaskGenerator
    if kind == "random" or kind == "random-each":
        if not arg:
            raise _error(spec, "give the ratio, as in random:0.75")
        gen = RandomTokenMask(_ratio(arg, spec), shared_across_modalities=kind == "random")
    elif kind == "hmp" and not arg:
        gen = HybridMaskPattern()
    elif kind == "hmp":
        parts = arg.split(",")
        if len(parts) != 3:
            raise _error(spec, "hmp takes three values M,P,Q ('-' for off)")
        modal = None if parts[0] == "-" else _count(parts[0], spec)
        position = None if parts[1] == "-" else _ratio(parts[1], spec)
        patch = None if parts[2] == "-" else _ratio(parts[2], spec)
        try:
            gen = HybridMaskPattern(modal=modal, position=position, patch=patch)
        except ValueError as err:
            raise _error(spec, str(err)) from None
    elif kind == "modal":
        gen = ModalMask(_count(arg, spec) if arg else 1)
    elif kind == "position":
        gen = PositionMask(_ratio(arg, spec))
    elif kind == "patch":
        gen = PatchMask(_ratio(arg, spec))
    elif kind == "block":
        ratio_text, _, size_text = arg.partition(":")
        if not ratio_text:
            raise _error(spec, "give the ratio, as in block:0.875")
        size = _count(size_text, spec) if size_text else 8
        return MaskSpec(spec, BlockMask(size, mask_ratio=_ratio(ratio_text, spec)), None)
    else:
        raise _error(spec, f"unknown kind {kind!r}; expected {_KINDS}")
    return MaskSpec(spec, gen, patch_size)

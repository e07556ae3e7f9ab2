"""Argument validation shared by every module (private).

Each helper raises ``TypeError`` or ``ValueError`` whose message names the argument, what was
expected and what arrived, as DESIGN.md asks of every public function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch

from mrissl._settings import values_checked

__all__: list[str] = []

Triple = tuple[int, int, int]


def to_triple(value: Any, name: str) -> Triple:
    """Return ``value`` (an int or a sequence of three ints, all positive) as a 3-tuple."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of 3 ints, got bool {value!r}")
    if isinstance(value, int):
        items: tuple[Any, ...] = (value, value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != 3:
            raise ValueError(
                f"{name} must be an int or a sequence of 3 ints (depth, height, width), "
                f"got {len(items)} values {value!r}"
            )
    else:
        raise TypeError(
            f"{name} must be an int or a sequence of 3 ints, got {type(value).__name__} {value!r}"
        )
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must contain ints, got {type(v).__name__} in {value!r}")
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        out.append(int(v))
    return out[0], out[1], out[2]


def check_tensor(x: Any, name: str, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Check that ``x`` is a tensor with one of the allowed numbers of dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(
                f"{name} must have {want} dimensions, got shape {tuple(x.shape)} ({x.ndim} dims)"
            )
    return x


def check_bool_mask(x: Any, name: str, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Check that ``x`` is a bool mask tensor (True = masked, DESIGN.md)."""
    mask = check_tensor(x, name, ndim)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = masked), got dtype {mask.dtype}")
    return mask


def check_floating(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``x`` has a floating-point dtype."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_index(index: torch.Tensor, name: str, batch: int, length: int) -> torch.Tensor:
    """Check a ``(B, K)`` integer index tensor into a sequence of ``length`` tokens.

    The range check reads the values on the host (a synchronisation on CUDA), so it is a value
    check and runs only when ``values_checked()``; without it an out-of-range index stops the
    gather or scatter kernel (an ``IndexError`` on the CPU, a device-side assert on CUDA).
    """
    check_tensor(index, name, ndim=2)
    if index.dtype != torch.long:
        raise TypeError(f"{name} must be an int64 (torch.long) tensor, got dtype {index.dtype}")
    if index.shape[0] != batch:
        raise ValueError(
            f"{name} must have the batch size of the tokens ({batch}) as its first dimension, "
            f"got shape {tuple(index.shape)}"
        )
    if values_checked() and index.numel() > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= length:
            raise ValueError(
                f"{name} must hold token positions in [0, {length}), got values in [{lo}, {hi}]"
            )
    return index


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Check that a random generator is a ``torch.Generator`` on ``device``'s type."""
    check_generator_type(generator)
    if generator is None:
        return
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the mask is made on {device}: pass a "
            f"torch.Generator(device={device.type!r}) for {device.type} tensors"
        )


def check_available(
    available: Any, batch_size: int, num_modalities: int, device: torch.device
) -> torch.Tensor | None:
    """Validate ``available: (B, C)`` bool and move it to ``device``.

    Shape and dtype are always checked; that every row has at least one True is a value check
    (it reads the tensor on the host), run only when ``values_checked()``.
    """
    if available is None:
        return None
    avail = check_tensor(available, "available", ndim=2)
    if avail.dtype != torch.bool:
        raise TypeError(f"available must be a bool tensor, got dtype {avail.dtype}")
    if tuple(avail.shape) != (batch_size, num_modalities):
        raise ValueError(
            f"available must have shape (B, C) = ({batch_size}, {num_modalities}), "
            f"got {tuple(avail.shape)}"
        )
    avail = avail.to(device)
    if not values_checked():
        return avail
    empty = ~avail.any(dim=1)
    if bool(empty.any()):
        cases = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"available must mark at least one modality per case; cases {cases} have none"
        )
    return avail


def check_finite(x: torch.Tensor, name: str, *, always: bool = False) -> torch.Tensor:
    """Reject NaN or infinite values in ``x``, naming ``name`` and how many there are.

    Reading the result is a host synchronisation, so on the step path it runs only when
    ``values_checked()``; constructors, file readers and offline diagnostics pass
    ``always=True``.
    """
    if not (always or values_checked()) or x.numel() == 0 or not x.is_floating_point():
        return x
    bad = int((~torch.isfinite(x.detach())).sum())
    if bad:
        raise ValueError(
            f"{name} holds {bad} NaN or infinite value(s) of {x.numel()}; expected finite values"
        )
    return x


def check_generator_type(generator: Any) -> None:
    """Check that ``generator`` is a ``torch.Generator`` or ``None`` (an int seed is not one)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    hint = ""
    if isinstance(generator, int) and not isinstance(generator, bool):
        hint = f"; for a seed pass torch.Generator().manual_seed({generator})"
    raise TypeError(
        f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        f" {generator!r}{hint}"
    )


def as_index(index: Any, name: str, device: torch.device) -> Any:
    """Turn a nested list or tuple of ints into an int64 tensor on ``device``; pass others on.

    Users naturally write ``keep=[[0, 1], [1, 2]]``; a tensor (of any dtype) is returned
    unchanged for [`check_index`][] to judge. Floats or bools in a list are a ``TypeError``.
    """
    if isinstance(index, torch.Tensor) or not isinstance(index, list | tuple):
        return index
    try:
        probe = torch.as_tensor(index)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{name} must be an int64 tensor or a rectangular nested list of ints, got a "
            f"{type(index).__name__} that is neither ({err})"
        ) from None
    if probe.is_floating_point() or probe.is_complex() or probe.dtype == torch.bool:
        raise TypeError(f"{name} must hold ints, got a {type(index).__name__} of {probe.dtype}")
    return probe.to(device=device, dtype=torch.long)


# ---- scalar configuration: the one vocabulary every module uses ---------------------------


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` naming them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is a ``bool``, else raise ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


@overload
def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = ...,
    high: float | None = ...,
    low_open: bool = ...,
    high_open: bool = ...,
    integer: Literal[False] = ...,
) -> float: ...


@overload
def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = ...,
    high: float | None = ...,
    low_open: bool = ...,
    high_open: bool = ...,
    integer: Literal[True],
) -> int: ...


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float | int:
    """A finite real number (an ``int`` with ``integer=True``) within optional bounds.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. A ``bool`` is not a
    number here (``True`` for a ratio is a mistake). Returns a ``float``, or the ``int``.

    Raises:
        TypeError: for a value that is not a number (not an ``int`` with ``integer=True``).
        ValueError: for NaN, an infinity or a value out of bounds, naming the bounds.
    """
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} {value!r}")
    given: Any = value  # narrowed to a number above; mypy sees `object`
    number: float | int = int(given) if integer else float(given)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or below or above:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        want = ("an int" if integer else "a finite number") + (
            " " + " and ".join(bounds) if bounds else ""
        )
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return number

"""The mask-generator interface and the random primitives every generator shares.

A mask generator draws a bool token mask ``(B, C, N)``, True = masked, over the token grid of
DESIGN.md: ``C`` modalities times ``N`` positions in raster order. Subclasses implement
``_sample`` on validated arguments; [`MaskGenerator`][mrissl.masking.MaskGenerator] does the
checking, the device and generator handling and the rule for missing modalities (a missing
modality is always masked).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from mrissl._checks import (
    check_available,
    check_generator,
    check_generator_type,
    check_number,
    check_tensor,
    to_triple,
)
from mrissl.nn import grid_size

__all__ = ["MaskGenerator", "target_mask"]

# Guards floor(N·ratio) against binary rounding (0.875 · 1728 must give 1512, not 1511).
_EPS = 1e-9


def _check_grid_args(num_modalities: Any, num_tokens: Any) -> tuple[int, int]:
    return check_number(num_modalities, "num_modalities", low=1, integer=True), check_number(
        num_tokens, "num_tokens", low=1, integer=True
    )


def _count(n: int, ratio: float) -> int:
    """``floor(n · ratio)``, the exact number of masked items of a ratio-``ratio`` draw."""
    return math.floor(n * ratio + _EPS)


def _num_tokens(grid: Any) -> int:
    """Total number of tokens ``N`` of a grid given as an int ``N`` or a 3-tuple."""
    if isinstance(grid, bool):
        raise TypeError(f"grid must be an int or a sequence of 3 ints, got bool {grid!r}")
    if isinstance(grid, int):
        if grid <= 0:
            raise ValueError(f"grid must be a positive number of tokens, got {grid}")
        return grid
    gd, gh, gw = to_triple(grid, "grid")
    return gd * gh * gw


def _resolve_device(
    device: torch.device | str | None, generator: torch.Generator | None
) -> torch.device:
    """The device masks are made on; a generator must live on a device of the same type."""
    check_generator_type(generator)
    if device is None:
        dev = generator.device if generator is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    check_generator(generator, dev)
    return dev


def _rand(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=device)


def _choose_k(scores: torch.Tensor, k: torch.Tensor | int, dim: int = -1) -> torch.Tensor:
    """Mark the ``k`` entries with the smallest scores along ``dim`` (True = chosen).

    With i.i.d. uniform scores every ``k``-subset is equally likely. Entries that must never be
    chosen get a score above 1 (they rank last), so ``k`` must not exceed the eligible count.
    ``k`` may be an int or a tensor shaped like ``scores`` without ``dim``, giving a different
    count per row.
    """
    dim = dim % scores.ndim
    order = scores.argsort(dim=dim)
    n = scores.shape[dim]
    rank = torch.arange(n, device=scores.device).view(
        [n if d == dim else 1 for d in range(scores.ndim)]
    )
    first_k = rank < (k if isinstance(k, int) else k.unsqueeze(dim))
    # the first k of the sorted order are chosen; scatter puts them back in place
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return chosen.scatter_(dim, order, first_k.expand(order.shape))


def _random_k(
    B: int,
    C: int,
    N: int,
    k: int,
    shared: bool,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Draw ``(B, C, N)`` masks with exactly ``k`` of ``N`` tokens masked per sample.

    Each modality draws its own ``k`` tokens unless ``shared``, when all take the sample's draw.
    """
    if shared:
        return _choose_k(_rand((B, 1, N), generator, device), k).expand(B, C, N).clone()
    return _choose_k(_rand((B, C, N), generator, device), k)


def _check_bool_mask(mask: torch.Tensor, name: str) -> None:
    """Masks are bool tensors, True = masked (DESIGN.md)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = masked), got dtype {mask.dtype}")


def _mask_missing(mask: torch.Tensor, available: torch.Tensor | None) -> torch.Tensor:
    """A missing modality is always masked as input (DESIGN.md)."""
    if available is None:
        return mask
    return mask | ~available.unsqueeze(-1)


def target_mask(mask: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens a reconstruction loss should score: masked **and** present.

    ``target = mask ∧ available[:, :, None]``: generators mask a missing modality entirely
    (it is never offered as input), but there is nothing to reconstruct there.

    Args:
        mask: ``(B, C, N)`` bool, True = masked.
        available: ``(B, C)`` bool, True = modality present; ``None`` means all present.

    Returns:
        ``(B, C, N)`` bool, True = reconstruct this token.

    Raises:
        ValueError: if the shapes disagree.

    Examples:
        >>> mask = torch.tensor([[[True, False], [True, True]]])  # (1, 2, 2)
        >>> target_mask(mask, torch.tensor([[True, False]]))  # modality 1 is missing
        tensor([[[ True, False],
                 [False, False]]])
    """
    check_tensor(mask, "mask", ndim=3)
    _check_bool_mask(mask, "mask")
    if available is None:
        return mask
    check_tensor(available, "available", ndim=2)
    if tuple(available.shape) != tuple(mask.shape[:2]):
        raise ValueError(
            f"available must have shape (B, C) = {tuple(mask.shape[:2])} to match mask "
            f"{tuple(mask.shape)}, got {tuple(available.shape)}"
        )
    return mask & available.to(device=mask.device, dtype=torch.bool).unsqueeze(-1)


class MaskGenerator(ABC):
    """Base class of the token-mask generators of [`mrissl.masking`][mrissl.masking].

    A generator holds configuration only (no state, no RNG of its own): every call draws from
    ``generator`` when one is given, and never touches the global RNG then, so the same seed
    gives the same mask. Subclasses implement ``_sample`` and ``expected_mask_ratio``.

    Call it with a batch size and a grid ([`sample`][mrissl.masking.MaskGenerator.sample]) or
    with the volume itself (``generator(volume, patch_size)``); either way the result is a
    ``(B, C, N)`` bool mask, True = masked, on the requested device, with every missing
    modality (``available[b, c]`` False) masked at every position.

    Examples:
        >>> from mrissl.masking import RandomTokenMask
        >>> gen = RandomTokenMask(0.75)
        >>> gen.sample(2, 4, (6, 6, 6)).shape
        torch.Size([2, 4, 216])
        >>> gen(torch.zeros(2, 4, 96, 96, 96), 16).shape
        torch.Size([2, 4, 216])
        >>> gen.expected_mask_ratio(4, 216)
        0.75
    """

    #: used by ``__call__`` when no patch size is given (``BlockMask`` sets its block size)
    _default_patch_size: int | tuple[int, int, int] | None = None

    def sample(
        self,
        batch_size: int,
        num_modalities: int,
        grid: int | Sequence[int],
        *,
        available: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw a token mask.

        Args:
            batch_size: ``B``.
            num_modalities: ``C``.
            grid: the token grid ``(gd, gh, gw)``, or the number of tokens ``N`` (no
                generator here needs the spatial layout of the tokens).
            available: ``(B, C)`` bool, True = modality present; every case needs at least
                one. ``None`` means all present.
            generator: the random source; on the device the mask is made on.
            device: where to make the mask; defaults to the generator's device, else the CPU.

        Returns:
            ``(B, C, N)`` bool, True = masked.

        Raises:
            ValueError: for a bad size, ``available`` of the wrong shape (or, with the value
                checks on, with a case that has no modality), a generator on another device
                type, or too few modalities.
        """
        B = check_number(batch_size, "batch_size", low=1, integer=True)
        C = check_number(num_modalities, "num_modalities", low=1, integer=True)
        if self._min_modalities() > C:
            raise ValueError(
                f"{type(self).__name__} needs num_modalities >= {self._min_modalities()} "
                f"({self._needs_why()}), got num_modalities={C}"
            )
        N = _num_tokens(grid)
        dev = _resolve_device(device, generator)
        avail = check_available(available, B, C, dev)
        mask = self._sample(B, C, N, avail, generator, dev)
        return _mask_missing(mask, avail)

    def __call__(
        self,
        volume: torch.Tensor,
        patch_size: int | Sequence[int] | None = None,
        *,
        available: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw a token mask for a batch of volumes, on the volume's device.

        Args:
            volume: ``(B, C, D, H, W)``; only its shape and device are used.
            patch_size: the token size ``(p0, p1, p2)`` or one int; it must divide
                ``(D, H, W)``. Required, except for [`BlockMask`][mrissl.masking.BlockMask]
                which uses its block size when it is ``None``.
            available: ``(B, C)`` bool, True = modality present.
            generator: the random source, on the volume's device type.

        Returns:
            ``(B, C, N)`` bool, True = masked, with ``N`` the number of patches.
        """
        check_tensor(volume, "volume", ndim=5)
        if volume.shape[0] == 0 or volume.shape[1] == 0:
            raise ValueError(
                f"volume must hold at least one case and one modality, got shape "
                f"{tuple(volume.shape)}"
            )
        if patch_size is None:
            patch_size = self._default_patch_size
        if patch_size is None:
            raise ValueError(
                f"{type(self).__name__} needs patch_size to know the token grid of a volume "
                f"of shape {tuple(volume.shape)}; got patch_size=None"
            )
        grid = grid_size(tuple(volume.shape[2:]), patch_size)
        return self.sample(
            volume.shape[0],
            volume.shape[1],
            grid,
            available=available,
            generator=generator,
            device=volume.device,
        )

    @abstractmethod
    def expected_mask_ratio(self, num_modalities: int, num_tokens: int) -> float:
        """Expected fraction of masked tokens of a ``(C, N)`` grid, all modalities present.

        Args:
            num_modalities: ``C``.
            num_tokens: ``N``.

        Returns:
            ``E[mask.float().mean()]`` over the random draws.
        """

    @abstractmethod
    def _sample(
        self,
        B: int,
        C: int,
        N: int,
        available: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Draw a ``(B, C, N)`` mask from validated arguments; the caller masks the missing."""

    def _min_modalities(self) -> int:
        """The smallest number of modalities ``C`` the generator accepts."""
        return 1

    def _needs_why(self) -> str:
        return "its masking step needs more modalities"

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

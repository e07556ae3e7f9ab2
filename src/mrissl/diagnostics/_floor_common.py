"""What the collapse-floor modules share: the result, the mask-generator protocol, checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch

from mrissl._checks import check_finite, check_floating, check_tensor

__all__ = ["CollapseFloor", "Constant", "FloorMaskGenerator", "Over", "PatchSize"]

Constant = Literal["voxel", "modality"]
Over = Literal["masked", "all"]
PatchSize = int | Sequence[int] | None


class FloorMaskGenerator(Protocol):
    """What [`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor] calls to draw masks.

    Any callable ``mask_generator(volume, patch_size, generator=generator)`` returning a bool
    mask (True = masked) qualifies: every generator of ``mrissl.masking``, or a plain function.
    ``volume`` is ``(B, C, D, H, W)``; the mask is a token mask ``(B, C, N)`` or ``(B, N)`` on
    the grid of ``patch_size``, or a voxel mask ``(B, C, D, H, W)``. When the data carry
    ``"available"``, it is also passed as ``available=``. A generator with a ``block_size``
    attribute (BlockMask-like) may be called with ``patch_size=None``: its token masks are read
    on the grid of its ``block_size``.

    Examples:
        >>> def first_half(volume, patch_size, generator=None):  # a voxel mask
        ...     mask = torch.zeros(volume.shape, dtype=torch.bool)
        ...     mask[..., : volume.shape[-1] // 2] = True
        ...     return mask
        >>> masks: FloorMaskGenerator = first_half
        >>> masks(torch.rand(1, 2, 4, 4, 4), None).float().mean().item()
        0.5
    """

    def __call__(
        self,
        volume: torch.Tensor,
        patch_size: PatchSize,
        /,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw one bool mask for ``volume`` (True = masked) from ``generator``."""
        ...


@runtime_checkable
class _BlockSized(Protocol):
    """A mask generator whose tokens are its own blocks (BlockMask-like)."""

    block_size: Any


class CollapseFloor(NamedTuple):
    """The floor estimated by [`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor].

    Attributes:
        floor: the estimate of Var(x_m), the MSE of the best constant predictor.
        std_error: its standard error over the independent evaluation draws.
        per_modality: ``(C,)`` float64, the floor of the loss restricted to each modality's
            masked voxels (NaN for a modality that no evaluation draw masked).
        per_modality_std_error: ``(C,)`` float64 standard errors of ``per_modality``.
        masked_fraction: the mean fraction of the present voxels masked per draw.
        num_draws: the number of mask draws per volume (fit plus evaluation draws).
        num_volumes: the number of volumes seen (over all processes when gathered).
        constant: ``"voxel"`` or ``"modality"`` (see the function).
        on: ``"masked"`` or ``"all"``, the voxels the loss is averaged over (see the function).
        per_modality_volumes: ``(C,)`` int64, how many volumes had each modality present
            (all of them unless ``available`` marked some missing).
    """

    floor: float
    std_error: float
    per_modality: torch.Tensor
    per_modality_std_error: torch.Tensor
    masked_fraction: float
    num_draws: int
    num_volumes: int
    constant: str
    on: str
    per_modality_volumes: torch.Tensor | None = None

    def __str__(self) -> str:
        return (
            f"Var(x_m) = {self.floor:.6g} ± {self.std_error:.2g} (constant per {self.constant}, "
            f"mean over {self.on} voxels, {self.masked_fraction:.1%} masked, "
            f"{self.num_volumes} volumes × {self.num_draws} draws)"
        )


def _as_batch(x: torch.Tensor, what: str) -> torch.Tensor:
    check_tensor(x, what, ndim=(4, 5))
    check_floating(x, what)
    check_finite(x, what)  # a NaN voxel would make the floor NaN ± NaN
    return x.unsqueeze(0) if x.ndim == 4 else x

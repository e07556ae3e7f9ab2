"""BrainMVP block masking: an exact number of aligned r³ blocks, or the paper's random cubes.

BrainMVP (Algorithm 1, r = 8, p* = 0.875) masks a large part of each single-modality input
and fills it from another modality of the same case (see
[`cross_modal_fill`][mrissl.masking.cross_modal_fill]). The paper's text drops r³ cubes at
random centres until p* of the voxels are covered; the released code instead splits the crop
into an aligned grid of r³ blocks and masks exactly ``floor(N · p*)`` of them (96³, r = 8:
1728 blocks, 1512 masked), background included. [`BlockMask`][mrissl.masking.BlockMask]
does the released code's version on the token grid whose tokens are the blocks;
[`BlockMask.sample_cubes`][mrissl.masking.BlockMask.sample_cubes] does the paper's version
and returns a voxel mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from mrissl._checks import (
    Triple,
    check_available,
    check_bool,
    check_choice,
    check_number,
    to_triple,
)
from mrissl._settings import values_checked
from mrissl.masking._base import (
    MaskGenerator,
    _check_grid_args,
    _count,
    _random_k,
    _resolve_device,
)

__all__ = ["BlockMask"]


class BlockMask(MaskGenerator):
    """BrainMVP masking: exactly ``floor(N · mask_ratio)`` of the ``N`` aligned r³ blocks.

    The tokens of this generator are the blocks (``generator(volume)`` needs no patch size),
    as in the released BrainMVP code: an aligned grid, an exact count, the whole crop
    counted. The defaults are the paper's (r = 8, p* = 0.875). Every modality of a sample
    draws its own blocks unless ``shared_across_modalities``; a missing modality is masked
    entirely. See [the masking guide][brainmvp-block-masking].

    Args:
        block_size: ``r``, the block edge in voxels, or ``(r0, r1, r2)``.
        mask_ratio: ``p*``, the fraction of blocks to mask, in ``[0, 1)``.
        shared_across_modalities: one draw per sample instead of per sample and modality.

    Raises:
        ValueError: for a bad block size or a ratio outside ``[0, 1)``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = BlockMask()(torch.zeros(2, 4, 96, 96, 96), generator=g)  # 8³ blocks
        >>> mask.shape, mask.sum(dim=2)[0].tolist()  # 1512 = floor(1728 · 0.875)
        (torch.Size([2, 4, 1728]), [1512, 1512, 1512, 1512])
    """

    def __init__(
        self,
        block_size: int | Sequence[int] = 8,
        *,
        mask_ratio: float = 0.875,
        shared_across_modalities: bool = False,
    ) -> None:
        self.block_size: Triple = to_triple(block_size, "block_size")
        self.mask_ratio = check_number(mask_ratio, "mask_ratio", low=0, high=1, high_open=True)
        self.shared_across_modalities = check_bool(
            shared_across_modalities, "shared_across_modalities"
        )
        self._default_patch_size = self.block_size

    def expected_mask_ratio(self, num_modalities: int, num_tokens: int) -> float:
        """Fraction of masked blocks: ``floor(N · mask_ratio) / N`` (exact).

        Examples:
            >>> BlockMask().expected_mask_ratio(4, 1728)
            0.875
        """
        _, N = _check_grid_args(num_modalities, num_tokens)
        return _count(N, self.mask_ratio) / N

    def _sample(
        self,
        B: int,
        C: int,
        N: int,
        available: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        return _random_k(
            B, C, N, _count(N, self.mask_ratio), self.shared_across_modalities, generator, device
        )

    def sample_cubes(
        self,
        batch_size: int,
        num_modalities: int,
        img_size: int | Sequence[int],
        *,
        until: Literal["covered", "counted"] = "covered",
        available: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The paper's variant (BrainMVP Algorithm 1): random r³ cubes, as a voxel mask.

        Cubes of edge ``r`` at uniformly drawn centres (clipped at the border) are added one
        after the other until at least ``p* · D·H·W`` voxels are masked
        (``until="covered"``), or until ``ceil(p* · D·H·W / r³)`` cubes are drawn
        (``until="counted"``, the literal pseudo-code: overlaps counted twice). The result
        is the sequential loop's, computed without a loop or a host read; how, and what
        happens in the rare case that the fixed number of centres falls short, is in
        [the masking guide][brainmvp-block-masking].

        Args:
            batch_size: ``B``.
            num_modalities: ``C``; each modality of each case gets its own cubes.
            img_size: ``(D, H, W)`` or one int.
            until: the stopping rule, see above.
            available: ``(B, C)`` bool, True = present; missing modalities are masked.
            generator: the random source, on ``device``'s type.
            device: where to make the mask; defaults to the generator's device, else the CPU.

        Returns:
            ``(B, C, D, H, W)`` bool voxel mask, True = masked.

        Raises:
            ValueError: for bad sizes, a bad ``until`` or a bad ``available``.

        Examples:
            >>> g = torch.Generator().manual_seed(0)
            >>> cubes = BlockMask(4, mask_ratio=0.5).sample_cubes(2, 3, 32, generator=g)
            >>> cubes.shape
            torch.Size([2, 3, 32, 32, 32])
            >>> covered = cubes.flatten(2).float().mean(dim=2)
            >>> bool((covered >= 0.5).all()), bool((covered < 0.5 + 64 / 32**3).all())
            (True, True)
        """
        B = check_number(batch_size, "batch_size", low=1, integer=True)
        C = check_number(num_modalities, "num_modalities", low=1, integer=True)
        size = to_triple(img_size, "img_size")
        check_choice(until, "until", ("covered", "counted"))
        dev = _resolve_device(device, generator)
        avail = check_available(available, B, C, dev)
        V = size[0] * size[1] * size[2]
        cube = self.block_size[0] * self.block_size[1] * self.block_size[2]
        if until == "counted":
            first = _first_cover(B * C, size, self.block_size, _ceil(V, cube), generator, dev)
            mask = first < _ceil(V * self.mask_ratio, cube)
        else:
            target = max(1, math.ceil(V * self.mask_ratio - 1e-9))
            # twice the expected number of cubes for the target (cubes clipped at the border
            # cover less): a fixed number of centres, so the shapes do not depend on the draw
            clipped = _mean_clipped_volume(size, self.block_size)
            num = int(2 * V / clipped * math.log(1.0 / (1.0 - self.mask_ratio))) + 64
            first = _first_cover(B * C, size, self.block_size, num, generator, dev)
            # the stopping cube of each row: the target-th earliest first-cover index
            stop = first.view(B * C, -1).kthvalue(target, dim=1).values
            if values_checked():
                while not bool(torch.isfinite(stop).all()):
                    num *= 2  # not enough centres drawn to reach the target: draw more
                    first = _first_cover(B * C, size, self.block_size, num, generator, dev)
                    stop = first.view(B * C, -1).kthvalue(target, dim=1).values
            else:
                # (not seen in 10⁴ draws of small volumes, where the border matters most)
                torch._assert_async(
                    torch.isfinite(stop).all(),
                    "BlockMask.sample_cubes: the drawn cubes did not reach mask_ratio; "
                    "run with mrissl.checks('values') to draw more instead",
                )
            mask = first <= stop.view(B * C, 1, 1, 1)
        mask = mask.view(B, C, *size)
        if avail is not None:
            mask |= ~avail[:, :, None, None, None]
        return mask


def _mean_clipped_volume(size: Triple, cube: Triple) -> float:
    """Mean number of voxels of a cube inside the volume, over uniformly drawn centres."""
    volume = 1.0
    for n, r in zip(size, cube, strict=True):
        # a cube centred at x spans x - r//2 … x - r//2 + r - 1; its part inside [0, n)
        inside = [min(x - r // 2 + r, n) - max(x - r // 2, 0) for x in range(n)]
        volume *= sum(inside) / n
    return volume


def _ceil(a: float, b: int) -> int:
    return math.ceil(a / b - 1e-9)


def _first_cover(
    rows: int,
    size: Triple,
    cube: Triple,
    num: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """``(rows, D, H, W)`` float: index of the first of ``num`` random cubes covering a voxel.

    ``inf`` where no cube reaches. Centres are drawn uniformly over the voxels.
    """
    D, H, W = size
    centres = torch.randint(D * H * W, (rows, num), generator=generator, device=device)
    order = torch.arange(num, device=device, dtype=torch.float32).expand(rows, num)
    start = torch.full((rows, D * H * W), math.inf, device=device)
    start.scatter_reduce_(1, centres, order, reduce="amin")
    # min over the cube footprint = -max over it of the negated field; a cube centred at x
    # covers x - r//2 … x - r//2 + r - 1, so a voxel v sees the centres v - (r - 1 - r//2)
    # … v + r//2
    neg = -start.view(rows, 1, D, H, W)
    pad: list[int] = []
    for r in reversed(cube):
        pad += [r - 1 - r // 2, r // 2]
    neg = F.pad(neg, pad, value=-math.inf)
    neg = F.max_pool3d(neg, (cube[0], 1, 1), stride=1)
    neg = F.max_pool3d(neg, (1, cube[1], 1), stride=1)
    neg = F.max_pool3d(neg, (1, 1, cube[2]), stride=1)
    return -neg.view(rows, D, H, W)

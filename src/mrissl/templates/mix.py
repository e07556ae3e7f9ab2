"""[`TemplateMix`][mrissl.templates.TemplateMix], the downstream template mix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from mrissl._checks import (
    check_available,
    check_choice,
    check_floating,
    check_generator,
    check_number,
    check_tensor,
)
from mrissl.masking import BlockMask, mask_to_voxels
from mrissl.modalities import canonical_modalities
from mrissl.nn import grid_size
from mrissl.templates.modality import ModalityTemplates

__all__ = ["MixedView", "TemplateMix", "TemplateMixViews"]


class MixedView(NamedTuple):
    """One copy made by [`TemplateMix`][mrissl.templates.TemplateMix].

    Attributes:
        volume: ``(B, C, d, h, w)`` the copy, like the input with some modalities (or, for a
            single-modality case, some blocks) taken from the templates.
        replaced: ``(B, C)`` bool, True where a whole modality is its template.
        blocks: ``(B, C, N)`` bool block mask of the single-modality cases (True = block
            filled from the template; all False for multi-modality cases), or ``None`` when no
            case can be single-modality.
    """

    volume: torch.Tensor
    replaced: torch.Tensor
    blocks: torch.Tensor | None


class TemplateMixViews(NamedTuple):
    """The two copies ``X'``, ``X''`` made by [`TemplateMix`][mrissl.templates.TemplateMix].

    ``first, second = mix(x)`` unpacks them; ``first.volume`` is ``X'``.

    Attributes:
        first: the copy ``X'``, a [`MixedView`][mrissl.templates.MixedView].
        second: the copy ``X''``.
    """

    first: MixedView
    second: MixedView


class TemplateMix(nn.Module):
    """BrainMVP's downstream template mix: two copies with some modalities made templates.

    BrainMVP supplement A, eqs. 7, 8: with the learned templates frozen, two copies ``X'`` and
    ``X''`` of each case have different numbers of randomly chosen modalities replaced by their
    templates (at the crop's place in the canvas); the task loss sees both and
    [`consistency_loss`][mrissl.losses.consistency_loss] ties their features:

        L_FT = L_sl(F(X'), Y) + L_sl(F(X''), Y) + λ_cons · ‖F_enc(X') − F_enc(X'')‖₂

    A copy replaces ``min_replaced … min(max_replaced, A − 1)`` of the case's ``A`` present
    modalities, so a real one always stays and a missing one is never touched. A case with one
    present modality gets ``block_mask`` blocks filled from its template instead. How the
    counts are paired, and why, is in the [guide][downstream-template-mix].
    Vectorized over the batch; the templates are read without gradient.

    Args:
        templates: the learned [`ModalityTemplates`][mrissl.templates.ModalityTemplates].
        modalities: the modality of each input channel, in channel order (any spelling).
        max_replaced: the most modalities replaced in one copy (capped at ``A − 1``);
            ``None`` = ``A − 1``.
        min_replaced: the fewest (``1`` by default; ``0`` lets a copy stay unchanged).
        block_mask: the [`BlockMask`][mrissl.masking.BlockMask] of the single-modality
            variant (BrainMVP's r = 8, p* = 0.875 by default); ``None`` leaves such cases
            unchanged.
        counts: ``"different"`` (the supplement: the two copies replace different numbers of
            modalities whenever the range allows) or ``"independent"`` (each copy draws its
            own count).

    Raises:
        TypeError: for ``templates`` that are not a ``ModalityTemplates`` or a bad
            ``block_mask``.
        ValueError: for a modality without template, bad counts or ``counts``.

    Examples:
        >>> templates = ModalityTemplates(["t1", "t1ce", "t2", "flair"], shape=32, init=-1.0)
        >>> mix = TemplateMix(templates, modalities=["T1", "T1Gd", "T2", "FLAIR"])
        >>> x = torch.rand(3, 4, 16, 16, 16)
        >>> first, second = mix(x, generator=torch.Generator().manual_seed(0))
        >>> first.volume.shape, first.replaced.sum(dim=1).tolist()  # 1 to 3 of 4 replaced
        (torch.Size([3, 4, 16, 16, 16]), [2, 3, 1])
        >>> second.replaced.sum(dim=1).tolist()  # a different count in the other copy
        [3, 1, 3]
        >>> bool((first.volume[first.replaced] == -1).all())
        True
        >>> available = torch.tensor([[True, False, True, False]] * 2)  # t1ce, flair missing
        >>> two = mix(x[:2], available=available, generator=torch.Generator().manual_seed(1))
        >>> two.first.replaced[:, [0, 2]].tolist(), two.second.replaced[:, [0, 2]].tolist()
        ([[True, False], [True, False]], [[False, True], [False, True]])
    """

    ids: torch.Tensor

    def __init__(
        self,
        templates: ModalityTemplates,
        *,
        modalities: Sequence[str],
        max_replaced: int | None = None,
        min_replaced: int = 1,
        block_mask: BlockMask | None = None,
        counts: Literal["different", "independent"] = "different",
    ) -> None:
        super().__init__()
        self.counts = check_choice(counts, "counts", ("different", "independent"))
        if not isinstance(templates, ModalityTemplates):
            raise TypeError(
                f"templates must be a ModalityTemplates, got {type(templates).__name__}"
            )
        self.templates = templates
        self.modalities = canonical_modalities(modalities, "modalities")
        self.register_buffer("ids", templates.index(self.modalities), persistent=False)
        self.min_replaced = check_number(min_replaced, "min_replaced", low=0, integer=True)
        if max_replaced is not None:
            max_replaced = check_number(max_replaced, "max_replaced", low=0, integer=True)
            if max_replaced < max(self.min_replaced, 1):
                raise ValueError(
                    f"max_replaced must be at least max(min_replaced, 1) = "
                    f"{max(self.min_replaced, 1)}, got {max_replaced}"
                )
        self.max_replaced = max_replaced
        if block_mask is not None and not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask or None, got {type(block_mask)}")
        self.block_mask = BlockMask() if block_mask is None else block_mask

    def forward(
        self,
        volume: torch.Tensor,
        *,
        available: torch.Tensor | None = None,
        offsets: torch.Tensor | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> TemplateMixViews:
        """Make the two copies of every case.

        Args:
            volume: ``(B, C, d, h, w)`` floating crops, channels in ``modalities`` order.
            available: ``(B, C)`` bool, True = modality present; ``None`` = all present.
            offsets: ``(B, 3)``/``(3,)`` start of each crop in the template canvas; ``None``
                centers it.
            generator: the random source, on the volume's device type.

        Returns:
            [`TemplateMixViews`][mrissl.templates.TemplateMixViews] ``(first, second)``, each
            a [`MixedView`][mrissl.templates.MixedView] ``(volume, replaced, blocks)``.

        Raises:
            ValueError: for a channel count that differs from ``modalities``, a bad
                ``available``, offsets outside the canvas or a block size that does not
                divide the crop.
        """
        check_tensor(volume, "volume", ndim=5)
        check_floating(volume, "volume")
        B, C, d, h, w = volume.shape
        if len(self.modalities) != C:
            raise ValueError(
                f"volume has C = {C} channels but TemplateMix was built for "
                f"{len(self.modalities)} modalities {list(self.modalities)}"
            )
        device = volume.device
        check_generator(generator, device)
        avail = check_available(available, B, C, device)
        with torch.no_grad():
            ids = self.ids.to(self.templates.device)[None].expand(B, C)
            crops = self.templates.crop(ids, (d, h, w), offsets)
            crops = crops.to(device=device, dtype=volume.dtype)
        # with every modality present and C >= 2 no case is single-modality: skip the blocks
        blocks_needed = C == 1 or avail is not None
        present = avail if avail is not None else torch.ones(B, C, dtype=torch.bool, device=device)
        out: list[MixedView] = []
        pair = self._choose_pair(present, generator) if self.counts == "different" else None
        for copy in range(2):  # the two copies X', X'' (not a loop over samples)
            replaced = self._choose(present, generator) if pair is None else pair[copy]
            mask = replaced[:, :, None, None, None]
            blocks = None
            if blocks_needed:
                single = present.sum(dim=1, keepdim=True) == 1  # (B, 1)
                grid = grid_size((d, h, w), self.block_mask.block_size)
                tokens = self.block_mask.sample(B, C, grid, generator=generator, device=device)
                blocks = tokens & (single & present)[:, :, None]
                vox = mask_to_voxels(blocks, self.block_mask.block_size, (d, h, w))
                mask = mask | vox
            out.append(MixedView(torch.where(mask, crops, volume), replaced, blocks))
        return TemplateMixViews(*out)

    def _range(self, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` fewest and most modalities one copy may replace, ``lo ≤ hi``."""
        A = present.sum(dim=1)
        hi = A - 1 if self.max_replaced is None else (A - 1).clamp(max=self.max_replaced)
        return torch.full_like(hi, self.min_replaced).clamp(max=hi), hi

    def _choose_pair(
        self, present: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both copies' ``(B, C)`` choices, with different counts wherever the range allows."""
        B, C = present.shape
        lo, hi = self._range(present)
        n = (hi - lo + 1).clamp(min=1)  # counts available per case
        u = torch.rand(2, B, generator=generator, device=present.device)
        k1 = lo + (u[0] * n).long().clamp(max=n - 1)
        # the other copy: uniform over the n − 1 other counts (the same count when n = 1)
        step = 1 + (u[1] * (n - 1)).long().clamp(max=(n - 2).clamp(min=0))
        k2 = torch.where(n >= 2, lo + (k1 - lo + step) % n, k1)
        k1, k2 = torch.where(hi >= 1, k1, 0), torch.where(hi >= 1, k2, 0)
        s1, fresh = torch.rand(2, B, C, generator=generator, device=present.device)
        # one count only: the second copy takes the last k by the first copy's scores, a
        # different set of modalities (k ≤ A − 1 < A)
        s2 = torch.where((n == 1)[:, None], 1.0 - s1, fresh)
        rank1 = s1.masked_fill(~present, 2.0).argsort(dim=1).argsort(dim=1)
        rank2 = s2.masked_fill(~present, 2.0).argsort(dim=1).argsort(dim=1)
        return (rank1 < k1[:, None]) & present, (rank2 < k2[:, None]) & present

    def _choose(self, present: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``(B, C)`` bool: ``k`` random present modalities per case, ``k`` uniform in range."""
        B, C = present.shape
        lo, hi = self._range(present)
        u = torch.rand(B, generator=generator, device=present.device)
        k = torch.where(hi >= 1, lo + (u * (hi - lo + 1)).long().clamp(max=hi - lo), 0)
        # rank of a uniform score among the present modalities; missing ones rank last
        scores = torch.rand(B, C, generator=generator, device=present.device)
        scores = scores.masked_fill(~present, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)
        return (rank < k[:, None]) & present

    def extra_repr(self) -> str:
        """Channels and counts, for ``print(module)``."""
        return (
            f"modalities={list(self.modalities)}, min_replaced={self.min_replaced}, "
            f"max_replaced={self.max_replaced}, counts={self.counts!r}"
        )

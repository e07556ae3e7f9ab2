"""MAE masking: a fixed number of random tokens per sample."""

from __future__ import annotations

import torch

from mrissl._checks import check_bool, check_number
from mrissl.masking._base import (
    MaskGenerator,
    _check_grid_args,
    _count,
    _random_k,
)

__all__ = ["RandomTokenMask"]


class RandomTokenMask(MaskGenerator):
    """Random token masking as in MAE: exactly ``floor(N · mask_ratio)`` tokens masked.

    With ``shared_across_modalities=True`` (the default) one set of positions is drawn per
    sample and masked in every modality: MAE on a channel-stacked encoder, the E-MIM
    authors' baseline. With ``False`` each modality of each sample draws its own positions.
    A missing modality is masked at every position. See
    [the masking guide][mae-random-token-masking].

    Args:
        mask_ratio: fraction of tokens to mask, in ``[0, 1)``.
        shared_across_modalities: one draw per sample (True) or per sample and modality.

    Raises:
        ValueError: if ``mask_ratio`` is outside ``[0, 1)``.
        TypeError: for a ``mask_ratio`` that is not a number or a flag that is not a bool.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = RandomTokenMask(0.75).sample(2, 4, 216, generator=g)  # (B, C, N)
        >>> mask.sum(dim=2)  # 162 = floor(216 · 0.75) per sample and modality
        tensor([[162, 162, 162, 162],
                [162, 162, 162, 162]])
        >>> bool((mask == mask[:, :1]).all())  # the same positions in every modality
        True
        >>> per_mod = RandomTokenMask(0.5, shared_across_modalities=False)
        >>> m = per_mod.sample(1, 2, 8, generator=g)
        >>> m.sum(dim=2), bool((m[:, 0] == m[:, 1]).all())
        (tensor([[4, 4]]), False)
    """

    def __init__(self, mask_ratio: float = 0.75, *, shared_across_modalities: bool = True) -> None:
        self.mask_ratio = check_number(mask_ratio, "mask_ratio", low=0, high=1, high_open=True)
        self.shared_across_modalities = check_bool(
            shared_across_modalities, "shared_across_modalities"
        )

    def expected_mask_ratio(self, num_modalities: int, num_tokens: int) -> float:
        """Fraction of masked tokens: ``floor(N · mask_ratio) / N`` (exact, not only expected).

        Examples:
            >>> RandomTokenMask(0.75).expected_mask_ratio(4, 10)  # floor(7.5) / 10
            0.7
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

"""E-MIM's hybrid mask pattern (HMP): modal, position and patch masks, composed in that order.

E-MIM (section III-A, Fig. 3) masks a ``(C modalities × N positions)`` token grid in three
consecutive steps:

1. **Modal mask** ([`ModalMask`][mrissl.masking.ModalMask]): a randomly chosen modality is
   masked entirely.
2. **Position mask** ([`PositionMask`][mrissl.masking.PositionMask]): random positions are
   masked in every modality at once.
3. **Patch mask** ([`PatchMask`][mrissl.masking.PatchMask]): at the remaining positions the
   modalities are split complementarily, some hidden and the others kept, so a hidden patch
   is reconstructed from the other modalities at the same place.

The paper fixes neither the ratios of steps 2 and 3 nor how many modalities step 1 hides
beyond "one"; they are constructor arguments here, with defaults documented on
[`HybridMaskPattern`][mrissl.masking.HybridMaskPattern].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mrissl._checks import check_number
from mrissl.masking._base import (
    _EPS,
    MaskGenerator,
    _check_grid_args,
    _choose_k,
    _count,
    _rand,
)

__all__ = ["HybridMaskPattern", "ModalMask", "PatchMask", "PositionMask"]

_NEVER = 2.0  # a score above every uniform draw: the entry ranks last and is never chosen


class ModalMask(MaskGenerator):
    """Mask whole modalities (E-MIM HMP step 1, "Modal Mask").

    Per sample, ``min(k, eligible, present - 1)`` modalities are masked, chosen uniformly
    among the present ``candidates`` (``k = num_masked``, default 1: "randomly masks one
    modal"); with ``probability=p`` each eligible modality is masked independently with
    probability ``p``. At least one present modality is always kept, so a case with a single
    present modality gets no modal mask. See
    [the masking guide][step-1-modal-mask].

    Args:
        num_masked: modalities to mask per sample (ignored when ``probability`` is given).
        probability: per-modality masking probability in ``[0, 1)``, or ``None``.
        candidates: indices of the modalities that may be masked, or ``None`` for all.

    Raises:
        ValueError: for ``num_masked < 1``, a probability outside ``[0, 1)``, repeated or
            negative candidates; when sampling, for ``C < num_masked + 1`` (C = 1 cannot have
            a modal mask) or a candidate index ``>= C``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = ModalMask().sample(3, 4, 8, generator=g)  # (B, C, N)
        >>> mask.all(dim=2)  # one whole modality per sample
        tensor([[False, False,  True, False],
                [ True, False, False, False],
                [False, False,  True, False]])
        >>> only = ModalMask(candidates=[0, 1]).sample(64, 4, 8, generator=g)
        >>> bool(only[:, 2:].any())  # modalities 2 and 3 are never chosen
        False
        >>> ModalMask().sample(2, 1, 8)
        Traceback (most recent call last):
            ...
        ValueError: ModalMask needs num_modalities >= 2 (masking 1 modality must leave one ...
    """

    def __init__(
        self,
        num_masked: int = 1,
        *,
        probability: float | None = None,
        candidates: Sequence[int] | None = None,
    ) -> None:
        self.num_masked = check_number(num_masked, "num_masked", low=1, integer=True)
        self.probability = (
            None
            if probability is None
            else check_number(probability, "probability", low=0, high=1, high_open=True)
        )
        self.candidates: tuple[int, ...] | None = None
        if candidates is not None:
            cands = tuple(candidates)
            for c in cands:
                check_number(c, "candidates", low=0, integer=True)
            if not cands or len(set(cands)) != len(cands):
                raise ValueError(
                    f"candidates must be a non-empty sequence of distinct modality indices, "
                    f"got {candidates!r}"
                )
            self.candidates = tuple(sorted(cands))

    def _min_modalities(self) -> int:
        return 2 if self.probability is not None else self.num_masked + 1

    def _needs_why(self) -> str:
        k = 1 if self.probability is not None else self.num_masked
        return f"masking {k} modalit{'y' if k == 1 else 'ies'} must leave one modality visible"

    def _candidate_mask(self, C: int, device: torch.device) -> torch.Tensor:
        if self.candidates is None:
            return torch.ones(C, dtype=torch.bool, device=device)
        if self.candidates[-1] >= C:
            raise ValueError(
                f"ModalMask candidates must be modality indices below num_modalities={C}, "
                f"got {self.candidates}"
            )
        # comparisons on the device: indexing with the list would copy it to the device,
        # a synchronisation on CUDA
        index = torch.arange(C, device=device)
        out = torch.zeros(C, dtype=torch.bool, device=device)
        for c in self.candidates:
            out |= index == c
        return out

    def _draw(
        self,
        B: int,
        C: int,
        available: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        """``(B, C)`` bool: the modalities masked entirely."""
        present = (
            available
            if available is not None
            else torch.ones(B, C, dtype=torch.bool, device=device)
        )
        eligible = present & self._candidate_mask(C, device)
        scores = _rand((B, C), generator, device)
        if self.probability is None:
            # exactly k per sample, never the last present modality
            k = torch.minimum(eligible.sum(1), present.sum(1) - 1).clamp(max=self.num_masked)
            return _choose_k(scores.masked_fill(~eligible, _NEVER), k, dim=1)
        masked = (scores < self.probability) & eligible
        tie = _rand((B, C), generator, device)  # drawn always, so the stream does not branch
        emptied = ~(present & ~masked).any(dim=1)
        # keep one of the masked modalities, uniformly, where every present one was hit
        keep = tie.masked_fill(~masked, _NEVER).argmin(dim=1)
        spare = torch.zeros_like(masked).scatter_(1, keep[:, None], True) & emptied[:, None]
        return masked & ~spare

    def _count_distribution(self, C: int) -> dict[int, float]:
        """Probability of each number of masked modalities when all ``C`` are present."""
        K = C if self.candidates is None else sum(c < C for c in self.candidates)
        if self.probability is None:
            return {min(self.num_masked, K, C - 1): 1.0}
        p = self.probability
        dist: dict[int, float] = {}
        for m in range(K + 1):
            prob = math.comb(K, m) * p**m * (1 - p) ** (K - m)
            m_kept = min(m, C - 1)  # all C hit: one is kept
            dist[m_kept] = dist.get(m_kept, 0.0) + prob
        return dist

    def expected_mask_ratio(self, num_modalities: int, num_tokens: int) -> float:
        """Expected fraction of masked tokens: ``E[masked modalities] / C``.

        Examples:
            >>> ModalMask().expected_mask_ratio(4, 216)
            0.25
            >>> round(ModalMask(probability=0.5).expected_mask_ratio(2, 216), 4)  # (1 - 0.25) / 2
            0.375
        """
        C, _ = _check_grid_args(num_modalities, num_tokens)
        return sum(m * p for m, p in self._count_distribution(C).items()) / C

    def _sample(
        self,
        B: int,
        C: int,
        N: int,
        available: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        return self._draw(B, C, available, generator, device)[:, :, None].expand(B, C, N).clone()


class PositionMask(MaskGenerator):
    """Mask the same random positions in every modality (E-MIM HMP step 2, "Position Mask").

    Exactly ``floor(N · mask_ratio)`` positions per sample, chosen uniformly; a masked
    position is hidden in all ``C`` modalities at once.

    Args:
        mask_ratio: fraction of positions to mask, in ``[0, 1)``.

    Raises:
        ValueError: if ``mask_ratio`` is outside ``[0, 1)``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = PositionMask(0.5).sample(2, 3, 8, generator=g)
        >>> mask[0].int()
        tensor([[0, 0, 1, 1, 1, 0, 1, 0],
                [0, 0, 1, 1, 1, 0, 1, 0],
                [0, 0, 1, 1, 1, 0, 1, 0]], dtype=torch.int32)
    """

    def __init__(self, mask_ratio: float = 0.5) -> None:
        self.mask_ratio = check_number(mask_ratio, "mask_ratio", low=0, high=1, high_open=True)

    def _draw(
        self, B: int, N: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """``(B, N)`` bool: the masked positions."""
        return _choose_k(_rand((B, N), generator, device), _count(N, self.mask_ratio))

    def expected_mask_ratio(self, num_modalities: int, num_tokens: int) -> float:
        """Fraction of masked tokens: ``floor(N · mask_ratio) / N`` (exact).

        Examples:
            >>> PositionMask(0.5).expected_mask_ratio(4, 216)
            0.5
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
        return self._draw(B, N, generator, device)[:, None, :].expand(B, C, N).clone()


def _hidden_per_position(ratio: float, V: int) -> tuple[int, float]:
    """Split ``ratio · V`` into its floor and fractional part."""
    t = ratio * V
    base = math.floor(t + _EPS)
    return base, max(t - base, 0.0)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + _EPS)


def _expected_hidden(ratio: float, V: int, positions: int) -> float:
    """Patches hidden by the patch step over ``positions`` positions with ``V`` visible each."""
    if V <= 1 or positions == 0:
        return 0.0
    base, frac = _hidden_per_position(ratio, V)
    if base >= V - 1:  # the keep-one cap binds everywhere
        return float(positions * (V - 1))
    return float(positions * base + _round_half_up(positions * frac))


class PatchMask(MaskGenerator):
    """Complementary masking across modalities (E-MIM HMP step 3, "Patch Mask").

    With ``r = mask_ratio`` and ``V`` visible modalities at a position, ``k`` of them are
    hidden, chosen uniformly:

    ``k = floor(r · V) + e``, capped at ``V - 1``,

    where ``e = 1`` at ``round(frac(r · V) · N')`` of the sample's ``N'`` positions, chosen
    uniformly, else 0. So no position loses every modality, each visible patch is hidden with
    probability about ``r``, and the count per sample is fixed. Missing modalities are not
    visible. See [the masking guide][step-3-patch-mask].

    Args:
        mask_ratio: fraction of the visible modalities of a position to hide, in ``[0, 1)``.

    Raises:
        ValueError: if ``mask_ratio`` is outside ``[0, 1)``; when sampling, for ``C = 1``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = PatchMask(0.5).sample(1, 4, 6, generator=g)
        >>> mask[0].int()  # columns are positions: two of four modalities hidden in each
        tensor([[0, 0, 1, 0, 1, 1],
                [1, 1, 1, 1, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [0, 0, 0, 1, 1, 1]], dtype=torch.int32)
        >>> bool(mask.all(dim=1).any())  # no position loses every modality
        False
    """

    def __init__(self, mask_ratio: float = 0.5) -> None:
        self.mask_ratio = check_number(mask_ratio, "mask_ratio", low=0, high=1, high_open=True)

    def _min_modalities(self) -> int:
        return 2

    def _needs_why(self) -> str:
        return "complementary masking hides some modalities of a position and keeps others"

    def _draw(self, visible: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``(B, C, N)`` bool: the hidden tokens, a subset of ``visible: (B, C, N)``."""
        B, C, N = visible.shape
        device = visible.device
        V = visible.sum(dim=1)  # (B, N) visible modalities per position
        # floor and fractional part of r·V per position, in float64 as _hidden_per_position
        t = V.to(torch.float64) * self.mask_ratio
        base = (t + _EPS).floor()
        frac = (t - base).clamp(min=0.0)
        # the extra patches: walk the positions in a random order and hand one out each time
        # the running sum of frac passes a half-integer, so a sample gets round(sum of frac)
        # extras in all (a fixed count) and, frac being equal across a sample's remaining
        # positions, each of them is equally likely to get one
        order = _rand((B, N), generator, device).argsort(dim=1)
        f = frac.gather(1, order)
        upto = f.cumsum(dim=1)
        before = torch.cat([torch.zeros_like(upto[:, :1]), upto[:, :-1]], dim=1)
        # floor(s + 1/2) as a cast: s >= 0 (and torch.floor is slow on some CPU builds)
        extra_sorted = (upto + 0.5 + _EPS).long() - (before + 0.5 + _EPS).long()
        extra = torch.zeros_like(V).scatter_(1, order, extra_sorted)
        k = torch.minimum(base.long() + extra, V - 1).clamp(min=0)
        scores = _rand((B, C, N), generator, device).masked_fill(~visible, _NEVER)
        return _choose_k(scores, k, dim=1)

    def expected_mask_ratio(self, num_modalities: int, num_tokens: int) -> float:
        """Fraction of masked tokens with ``V = C`` visible at each of the ``N`` positions.

        Examples:
            >>> PatchMask(0.5).expected_mask_ratio(4, 216)
            0.5
            >>> PatchMask(0.5).expected_mask_ratio(3, 216)  # k is 1 or 2, half the time each
            0.5
            >>> PatchMask(0.75).expected_mask_ratio(2, 216)  # at most 1 of 2
            0.5
        """
        C, N = _check_grid_args(num_modalities, num_tokens)
        return _expected_hidden(self.mask_ratio, C, N) / (C * N)

    def _sample(
        self,
        B: int,
        C: int,
        N: int,
        available: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        visible = torch.ones(B, C, N, dtype=torch.bool, device=device)
        if available is not None:
            visible &= available[:, :, None]
        return self._draw(visible, generator)


class HybridMaskPattern(MaskGenerator):
    """E-MIM's hybrid mask pattern: modal, position and patch masks in that order.

    ``mask = modal[:, :, None] | position[:, None, :] | patch(¬modal ∧ ¬position ∧ present)``
    (E-MIM section III-A, Fig. 3): step 2 draws among all ``N`` positions, and step 3 hides
    some of the modalities that steps 1 and 2 left visible, keeping at least one. A missing
    modality is masked throughout. Each step is given as a configured step object, as its
    number (shorthand for the step's constructor) or ``None`` (off), so each row of E-MIM's
    Table III is one call
    ([`table_iii_row`][mrissl.masking.HybridMaskPattern.table_iii_row]). The defaults mask
    0.8125 of the tokens for ``C = 4``; why these defaults, the ablation table, and what the
    masked fraction does not change are in
    [the masking guide][defaults-and-the-realised-ratio].

    Args:
        modal: a [`ModalMask`][mrissl.masking.ModalMask], an int (``ModalMask(num_masked=k)``)
            or ``None``.
        position: a [`PositionMask`][mrissl.masking.PositionMask], a float
            (``PositionMask(r)``) or ``None``.
        patch: a [`PatchMask`][mrissl.masking.PatchMask], a float (``PatchMask(r)``) or
            ``None``.

    Raises:
        ValueError: if every step is off, or for a bad step argument; when sampling, for too
            few modalities for the modal or patch step.
        TypeError: for a step of the wrong type.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> hmp = HybridMaskPattern()
        >>> mask = hmp.sample(8, 4, (6, 6, 6), generator=g)  # (B, C, N)
        >>> mask.sum(dim=(1, 2)).tolist()  # 0.8125 · 4 · 216 = 702 in every sample
        [702, 702, 702, 702, 702, 702, 702, 702]
        >>> HybridMaskPattern(modal=None, position=0.25).steps
        ('position', 'patch')
    """

    def __init__(
        self,
        modal: ModalMask | int | None = 1,
        *,
        position: PositionMask | float | None = 0.5,
        patch: PatchMask | float | None = 0.5,
    ) -> None:
        self.modal = _as_step(modal, ModalMask, "modal", int)
        self.position = _as_step(position, PositionMask, "position", float)
        self.patch = _as_step(patch, PatchMask, "patch", float)
        if self.modal is None and self.position is None and self.patch is None:
            raise ValueError(
                "HybridMaskPattern needs at least one of modal, position, patch; got all None "
                "(for plain MAE masking use RandomTokenMask)"
            )

    @classmethod
    def table_iii_row(cls, modal: bool, position: bool, patch: bool) -> HybridMaskPattern:
        """The mask of one row of E-MIM's Table III: the steps ticked in that row.

        Ticked steps get the defaults, except the position-only row, which is the paper's MAE
        baseline (its numbers equal MAE's in Tables I and II) at MAE's 75 % ratio.

        Raises:
            ValueError: for the row with no step ticked, which the paper does not define.

        Examples:
            >>> mae = HybridMaskPattern.table_iii_row(False, True, False)
            >>> mae.steps, mae.expected_mask_ratio(4, 216)
            (('position',), 0.75)
            >>> HybridMaskPattern.table_iii_row(True, False, True).expected_mask_ratio(4, 216)
            0.625
        """
        row = (bool(modal), bool(position), bool(patch))
        if row == (False, False, False):
            raise ValueError(
                "Table III's row with no step ticked matches neither MAE nor training from "
                "scratch and the paper does not say what it trains; the paper's MAE is the "
                "position-only row, table_iii_row(False, True, False)"
            )
        return cls(
            modal=1 if row[0] else None,
            position=(0.75 if row == (False, True, False) else 0.5) if row[1] else None,
            patch=0.5 if row[2] else None,
        )

    @property
    def steps(self) -> tuple[str, ...]:
        """The names of the steps switched on, in the order they run."""
        named = (("modal", self.modal), ("position", self.position), ("patch", self.patch))
        return tuple(name for name, step in named if step is not None)

    def _min_modalities(self) -> int:
        need = [1]
        if self.modal is not None:
            need.append(self.modal._min_modalities())
        if self.patch is not None:
            need.append(self.patch._min_modalities())
        return max(need)

    def _needs_why(self) -> str:
        if self.modal is not None and self.modal._min_modalities() > 1:
            return f"its modal step: {self.modal._needs_why()}"
        return "its patch step hides some modalities of a position and keeps others"

    def expected_mask_ratio(self, num_modalities: int, num_tokens: int) -> float:
        """Expected fraction of masked tokens with all modalities present.

        ``E[m·N + P·(C - m) + K] / (C·N)``: ``m`` modalities masked by step 1,
        ``P = floor(N · r_pos)`` positions by step 2, ``K`` patches by step 3 (fixed for a
        given ``m``, so exact with ``ModalMask(num_masked=...)``).

        Examples:
            >>> HybridMaskPattern().expected_mask_ratio(4, 216)
            0.8125
            >>> HybridMaskPattern(patch=None).expected_mask_ratio(4, 216)
            0.625
        """
        C, N = _check_grid_args(num_modalities, num_tokens)
        m_dist = {0: 1.0} if self.modal is None else self.modal._count_distribution(C)
        P = 0 if self.position is None else _count(N, self.position.mask_ratio)
        total = 0.0
        for m, prob in m_dist.items():
            K = 0.0 if self.patch is None else _expected_hidden(self.patch.mask_ratio, C - m, N - P)
            total += prob * (m * N + P * (C - m) + K)
        return total / (C * N)

    def _sample(
        self,
        B: int,
        C: int,
        N: int,
        available: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> torch.Tensor:
        mask = torch.zeros(B, C, N, dtype=torch.bool, device=device)
        if self.modal is not None:
            mask |= self.modal._draw(B, C, available, generator, device)[:, :, None]
        if self.position is not None:
            mask |= self.position._draw(B, N, generator, device)[:, None, :]
        if self.patch is not None:
            # step 3 acts on what steps 1 and 2 left visible; position-masked columns are
            # all hidden, so it leaves them alone
            visible = ~mask
            if available is not None:
                visible &= available[:, :, None]
            mask |= self.patch._draw(visible, generator)
        return mask


def _as_step(value: Any, cls: type[Any], name: str, number: type) -> Any:
    """A step given as itself, ``None`` or its number (``ModalMask``'s count, a ratio)."""
    if value is None or isinstance(value, cls):
        return value
    try:
        if number is int:
            check_number(value, name, integer=True)
        else:
            check_number(value, name)
    except TypeError:
        want = "an int (modalities to mask)" if number is int else "a number"
        raise TypeError(
            f"{name} must be a {cls.__name__}, {want} or None, got {type(value).__name__} {value!r}"
        ) from None
    return cls(value)

"""The streaming effective-rank meter as a ``torchmetrics.Metric``.

Needs torchmetrics (``pip install "mrissl[torchmetrics]"``); importing this module without it
raises an ``ImportError`` that says so.
"""

from __future__ import annotations

from typing import Any

import torch

from mrissl.diagnostics import EffectiveRankMeter
from mrissl.diagnostics.spectrum import RANKME_EPS
from mrissl.integrations._tracker import require

require("torchmetrics", "torchmetrics")

from torchmetrics import Metric  # noqa: E402

__all__ = ["EffectiveRank"]


def _merge_moments(stacked: torch.Tensor) -> torch.Tensor:
    """Merge ``P`` packed moment states ``(P, D + 2, D)`` into one (Chan et al., 1979).

    The pooled scatter is the sum of the scatters about each part's mean plus the scatter of
    the part means about the pooled mean, weighted by the counts: exact, and stable in float64.
    """
    n = stacked[:, 0, 0]  # (P,)
    means = stacked[:, 1]  # (P, D)
    total = n.sum()
    mean = (n[:, None] * means).sum(dim=0) / total.clamp(min=1.0)
    delta = means - mean
    merged = torch.zeros_like(stacked[0])
    merged[0, 0] = total
    merged[1] = mean
    merged[2:] = stacked[:, 2:].sum(dim=0) + torch.einsum("p,pi,pj->ij", n, delta, delta)
    return merged


class EffectiveRank(Metric):
    """Effective rank (or RankMe) of every feature seen, as a ``torchmetrics.Metric``.

    The work is done by an [`EffectiveRankMeter`][mrissl.diagnostics.EffectiveRankMeter]: its
    ``update`` merges each batch into the running count, mean and scatter matrix, and its
    ``compute`` decomposes them. The three are kept in one float64 metric state of shape
    ``(D + 2, D)`` (row 0 holds the count, row 1 the mean, the rest the ``D × D`` scatter) that
    the meter works on in place. torchmetrics merges that state across processes, and in
    ``forward`` and ``merge_state``, with the exact pairwise merge of the meter's moments, so
    the value under DDP equals one process seeing every batch. Memory is ``O(D²)`` whatever the
    number of samples.

    Args:
        dim: the feature dimension ``D``.
        center: subtract the running mean (spectrum of the covariance).
        eps: the ``ε`` of RankMe.
        rankme: return RankMe instead of the effective rank.
        kwargs: passed to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, …).

    Examples:
        >>> metric = EffectiveRank(16)
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(3, 16, generator=g)  # features in a 3-dim subspace
        >>> for _ in range(4):
        ...     metric.update(torch.randn(32, 3, generator=g) @ basis)
        >>> float(metric.compute()) <= 3.0
        True
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    moments: torch.Tensor

    def __init__(
        self,
        dim: int,
        *,
        center: bool = True,
        eps: float = RANKME_EPS,
        rankme: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        meter = EffectiveRankMeter(dim, center=center, eps=eps, gather_distributed=False)
        # not a submodule: its buffers are views of `moments`, which torchmetrics owns
        object.__setattr__(self, "_meter", meter)
        self.dim = dim
        self.rankme = bool(rankme)
        self.add_state(
            "moments",
            default=torch.zeros(dim + 2, dim, dtype=torch.float64),
            dist_reduce_fx=_merge_moments,
        )

    def _bound_meter(self) -> EffectiveRankMeter:
        meter: EffectiveRankMeter = self.__dict__["_meter"]
        # torchmetrics replaces `moments` on reset, sync and forward: point the meter at it
        meter._buffers["count"] = self.moments[0, 0]
        meter._buffers["mean"] = self.moments[1]
        meter._buffers["m2"] = self.moments[2:]
        return meter

    def update(self, z: torch.Tensor) -> None:
        """Add ``(B, D)`` features or ``(B, N, D)`` tokens (see the meter's ``update``)."""
        if isinstance(z, torch.Tensor) and self.moments.device != z.device:
            self.moments = self.moments.to(z.device)
        self._bound_meter().update(z)

    def compute(self) -> torch.Tensor:
        """The 0-dim float64 effective rank (or RankMe) of every feature seen."""
        result = self._bound_meter().compute()
        return result.rankme if self.rankme else result.effective_rank

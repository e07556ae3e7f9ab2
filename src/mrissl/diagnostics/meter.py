"""A streaming effective-rank meter: O(D²) memory whatever the number of samples.

The meter keeps the running moments ``(count, μ, M2)`` of the features in float64, merged batch
by batch (Chan, Golub & LeVeque, 1979); the singular values of the stacked, centred features
are ``sqrt(eigvalsh(M2))``. Derivation and accuracy:
[A whole run: `EffectiveRankMeter`][a-whole-run-effectiverankmeter].
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from mrissl._checks import check_bool, check_number, check_tensor
from mrissl.diagnostics.spectrum import RANKME_EPS, _entropy_rank, _feature_matrix
from mrissl.distributed import all_reduce_

__all__ = ["EffectiveRankMeter", "RankResult"]


class RankResult(NamedTuple):
    """What [`EffectiveRankMeter.compute`][mrissl.diagnostics.EffectiveRankMeter.compute] returns.

    Attributes:
        spectrum: ``(min(count, D),)`` float64 singular values, largest first.
        effective_rank: 0-dim float64, Roy & Vetterli's effective rank of ``spectrum``.
        rankme: 0-dim float64, RankMe of ``spectrum`` with the meter's ``eps``.
        num_samples: the number of samples the spectrum summarises (over all processes when
            gathered).
    """

    spectrum: torch.Tensor
    effective_rank: torch.Tensor
    rankme: torch.Tensor
    num_samples: int


def _add_gram_(m2: torch.Tensor, xc: torch.Tensor) -> None:
    """Add ``xcᵀ xc`` to ``m2`` in place, using the symmetry of the product.

    For wide features the two diagonal blocks and one off-diagonal block are multiplied and the
    other block is its transpose: 3/4 of the multiplications of a plain ``addmm_``.
    """
    D = xc.shape[1]
    if D < 128:
        m2.addmm_(xc.T, xc)
        return
    h = D // 2
    a, b = xc[:, :h], xc[:, h:]
    ab = a.T @ b
    m2[:h, :h].addmm_(a.T, a)
    m2[h:, h:].addmm_(b.T, b)
    m2[:h, h:].add_(ab)
    m2[h:, :h].add_(ab.T)


class EffectiveRankMeter(nn.Module):
    """Spectrum, effective rank and RankMe of every feature seen so far, streamed batch by batch.

    ``M2 ← M2 + M2_b + n · w · δδᵀ``, ``μ ← μ + w δ`` with ``δ = μ_b − μ``,
    ``w = n_b / (n + n_b)``; ``σ_k = sqrt(λ_k(M2))``. Call
    [`update`][mrissl.diagnostics.EffectiveRankMeter.update] with each batch,
    [`compute`][mrissl.diagnostics.EffectiveRankMeter.compute] whenever a value is wanted and
    [`reset`][mrissl.diagnostics.EffectiveRankMeter.reset] to start over. The state is three
    buffers (``count``, ``mean: (D,)``, ``m2: (D, D)``) saved by ``state_dict``. The result
    equals [`effective_rank`][mrissl.diagnostics.effective_rank] of the stacked batches to
    about 1e-8 of the largest singular value
    ([A whole run: `EffectiveRankMeter`][a-whole-run-effectiverankmeter]).

    Args:
        dim: the feature dimension ``D``.
        center: subtract the running mean (spectrum of the covariance); ``False`` gives the
            spectrum of the raw features.
        eps: the ``ε`` of RankMe (``p_k + ε``); the effective rank never uses one.
        gather_distributed: merge the state of all processes in ``compute`` (two all-reduces
            of ``O(D²)`` values; the local state is unchanged; a no-op without a process group).
        process_group: the ``torch.distributed`` group to merge over (default: the world).

    Raises:
        TypeError: for a non-int ``dim``, a non-bool flag or a non-number ``eps``.
        ValueError: for ``dim < 1`` or ``eps < 0``.

    Examples:
        >>> meter = EffectiveRankMeter(32)
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(4, 32, generator=g)  # features live in a 4-dim subspace
        >>> for _ in range(10):
        ...     meter.update(torch.randn(64, 4, generator=g) @ basis)
        >>> result = meter.compute()
        >>> result.num_samples, result.spectrum.shape
        (640, torch.Size([32]))
        >>> float(result.effective_rank) <= 4.0
        True
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(
        self,
        dim: int,
        *,
        center: bool = True,
        eps: float = RANKME_EPS,
        gather_distributed: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        self.dim = check_number(dim, "dim", low=1, integer=True)
        self.center = check_bool(center, "center")
        self.eps = check_number(eps, "eps", low=0)
        self.gather_distributed = check_bool(gather_distributed, "gather_distributed")
        self.process_group = process_group
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dim, dtype=torch.float64))

    def extra_repr(self) -> str:  # noqa: D102
        return f"dim={self.dim}, center={self.center}, eps={self.eps:g}"

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Add a batch of features to the running moments.

        Args:
            z: ``(B, D)`` features, or ``(B, N, D)`` tokens (each token is one sample); any
                floating dtype, finite, at least one sample. Detached automatically.

        Raises:
            TypeError: if ``z`` is not a floating-point tensor.
            ValueError: if ``z`` is not 2-D/3-D or its last dimension is not ``dim``; with the
                value checks on (``mrissl.set_checks("values")``), if it holds NaN/Inf (checked
                before anything is merged, so the state stays valid).
        """
        check_tensor(z, "z", ndim=(2, 3))
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"z must have the meter's feature dimension {self.dim} as its last dimension, "
                f"got shape {tuple(z.shape)}"
            )
        batch = _feature_matrix(z, "z", min_samples=1)
        if batch.device != self.mean.device:
            self.to(batch.device)
        x = batch.detach().to(torch.float64)
        # Chan et al. (1979), merged in place: M2 += Xcᵀ Xc + n_a·w_b·δδᵀ, μ += w_b·δ
        n_b = x.shape[0]
        mean_b = x.mean(dim=0)
        xc = x - mean_b
        delta = mean_b - self.mean
        n_a = self.count.to(torch.float64)
        w_b = n_b / (n_a + n_b)
        _add_gram_(self.m2, xc)
        self.m2.addr_(delta, delta * (n_a * w_b))
        self.mean.add_(delta * w_b)
        self.count.add_(n_b)

    def reset(self) -> None:
        """Forget every sample seen (keeps the device and configuration)."""
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()

    def _global_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.gather_distributed:
            return self.count, self.mean, self.m2
        # two rounds keep the merge exact and stable: the global mean first, then each
        # process's scatter about that mean
        count = all_reduce_(self.count.clone(), process_group=self.process_group)
        total = count.to(torch.float64).clamp(min=1.0)
        mean = all_reduce_(
            self.mean * self.count.to(torch.float64), process_group=self.process_group
        )
        mean = mean / total
        delta = self.mean - mean
        local = self.m2 + torch.outer(delta, delta) * self.count.to(torch.float64)
        return count, mean, all_reduce_(local, process_group=self.process_group)

    @torch.no_grad()
    def compute(self) -> RankResult:
        """Decompose the accumulated moments.

        Eigenvalues of ``m2`` below ``D · 2.2e-16 · λ_max`` (rounding) are set to 0, so that a
        rank-``k`` stream gives exactly ``k``.

        Returns:
            A [`RankResult`][mrissl.diagnostics.RankResult]: the ``(min(count, D),)`` float64
            spectrum (largest first), the effective rank, RankMe and the sample count.

        Raises:
            ValueError: if fewer than 2 samples have been seen (over all processes when gathered),
                or if the accumulated moments hold NaN/Inf (a batch with NaN/Inf was fed while
                the value checks were off).

        Warns:
            UserWarning: when ``count`` is below ``D``, which caps the effective rank.
        """
        count, mean, m2 = self._global_state()
        n = int(count)
        if n < 2:
            raise ValueError(
                f"EffectiveRankMeter needs at least 2 samples before compute(), got {n}; "
                "call update() with more features first"
            )
        # compute reads values on the host anyway: say why, rather than let eigvalsh fail with
        # "ill-conditioned" on a state that update() (unchecked by default) let NaN into
        if not bool(torch.isfinite(m2).all() & torch.isfinite(mean).all()):
            raise ValueError(
                f"EffectiveRankMeter's moments hold NaN or Inf after {n} samples: a batch given "
                "to update() held NaN or Inf; call reset(), and turn on "
                'mrissl.set_checks("values") to have update() reject such a batch'
            )
        if not self.center:
            m2 = m2 + torch.outer(mean, mean) * float(n)
        cap = min(n - int(self.center), self.dim)
        if cap < self.dim:
            warnings.warn(
                f"the meter has seen {n} samples of dimension {self.dim}: the effective rank is "
                f"capped at {cap}; feed more samples before reading it",
                stacklevel=2,
            )
        eigvals = torch.linalg.eigvalsh(m2).flip(0)  # σ_k² of the stacked matrix, descending
        tol = eigvals[0].clamp(min=0) * (self.dim * torch.finfo(torch.float64).eps)
        eigvals = torch.where(eigvals > tol, eigvals, torch.zeros_like(eigvals))
        spectrum = eigvals[: min(n, self.dim)].sqrt()
        return RankResult(
            spectrum=spectrum,
            effective_rank=_entropy_rank(spectrum, 0.0),
            rankme=_entropy_rank(spectrum, self.eps),
            num_samples=n,
        )

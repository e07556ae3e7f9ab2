"""Watch a training run for complete and dimensional collapse, one call per step."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from mrissl._checks import check_bool, check_number
from mrissl.diagnostics.floor import CollapseFloor
from mrissl.diagnostics.meter import EffectiveRankMeter

__all__ = ["CollapseMonitor", "CollapseStatus"]


class CollapseStatus(NamedTuple):
    """The verdict of a [`CollapseMonitor`][mrissl.diagnostics.CollapseMonitor].

    Attributes:
        step: the number of steps seen when the verdict was made (a multiple of ``window``).
        complete: the mean loss of the last window is within the tolerance of the floor.
        dimensional: the effective rank fell below ``rank_fraction`` of its first value, or fell
            in each of the last ``patience`` windows by ``min_drop`` in all.
        reason: a sentence explaining the verdict, with the numbers behind it.
        loss: the mean loss over the last window (None before the first window ends).
        effective_rank: the effective rank of the last window's features (None without them).
    """

    step: int
    complete: bool
    dimensional: bool
    reason: str
    loss: float | None = None
    effective_rank: float | None = None

    @property
    def collapsed(self) -> bool:
        """True when either kind of collapse is flagged."""
        return self.complete or self.dimensional


class CollapseMonitor(nn.Module):
    """Flags complete and dimensional collapse from the loss and features of each step.

    Call [`step`][mrissl.diagnostics.CollapseMonitor.step] once per training step with the
    loss and (optionally) features; it never synchronises but every ``window`` steps, when it
    decides:

    * **complete collapse** (E-MIM eq. 3): ``|mean loss − floor| ≤ tolerance · floor``, with
      ``floor`` = Var(x_m) from [`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor];
    * **dimensional collapse**: the window's effective rank is below ``rank_fraction`` times the
      first window's, or fell in each of the last ``patience`` windows by ``min_drop`` in all.

    See [Watching a run: `CollapseMonitor`][watching-a-run-collapsemonitor].

    Args:
        dim: the feature dimension ``D`` of the features given to ``step``.
        floor: Var(x_m) as a float or a [`CollapseFloor`][mrissl.diagnostics.CollapseFloor];
            None disables the complete-collapse check.
        tolerance: relative distance to the floor that counts as collapsed.
        rank_fraction: fraction of the initial effective rank below which the rank has collapsed.
        window: steps per verdict; the rank of a window uses all of its ``window · B`` samples.
        patience: number of consecutive falling windows that count as a steady fall.
        min_drop: relative fall over those windows needed to flag it.
        center: passed to the meter (spectrum of the covariance).
        gather_distributed: merge features of all processes when a window ends.
        warn: issue a ``UserWarning`` with the reason when a collapse is first flagged.

    Raises:
        TypeError: for a setting of the wrong type (a ``bool`` for a number, a float window).
        ValueError: for a negative ``floor``, ``tolerance`` or ``min_drop``, a
            ``rank_fraction`` outside ``(0, 1]``, or a ``window``/``patience`` below 1.

    Examples:
        >>> monitor = CollapseMonitor(dim=16, floor=0.02, window=5)
        >>> g = torch.Generator().manual_seed(0)
        >>> for step in range(10):
        ...     z = torch.randn(32, 16, generator=g)  # healthy, full-rank features
        ...     status = monitor.step(torch.tensor(0.05), z)
        >>> status.collapsed, status.step
        (False, 10)
        >>> status = None
        >>> for step in range(5):  # the loss settles on the floor
        ...     status = monitor.step(0.0201, torch.randn(32, 16, generator=g), warn=False)
        >>> status.complete, status.reason.split(":")[0]
        (True, 'complete collapse')
    """

    def __init__(
        self,
        dim: int,
        *,
        floor: float | CollapseFloor | None = None,
        tolerance: float = 0.1,
        rank_fraction: float = 0.5,
        window: int = 100,
        patience: int = 4,
        min_drop: float = 0.1,
        center: bool = True,
        gather_distributed: bool = False,
        warn: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(floor, CollapseFloor):
            floor = floor.floor
        self.floor = None if floor is None else check_number(floor, "floor", low=0)
        self.tolerance = check_number(tolerance, "tolerance", low=0)
        self.rank_fraction = check_number(
            rank_fraction, "rank_fraction", low=0, low_open=True, high=1
        )
        self.window = check_number(window, "window", low=1, integer=True)
        self.patience = check_number(patience, "patience", low=1, integer=True)
        self.min_drop = check_number(min_drop, "min_drop", low=0)
        self.warn = check_bool(warn, "warn")
        self.meter = EffectiveRankMeter(dim, center=center, gather_distributed=gather_distributed)
        self.steps = 0
        # the window's running loss lives on the loss's device and is read only at a window's
        # end, so update() never synchronises (not persistent: get_extra_state saves it)
        self.loss_sum: torch.Tensor
        self.loss_count: torch.Tensor
        self.register_buffer("loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("loss_count", torch.zeros((), dtype=torch.int64), persistent=False)
        self.ranks: list[float] = []
        self.losses: list[float] = []
        self.status = CollapseStatus(0, False, False, "no window completed yet")

    @torch.no_grad()
    def update(
        self, loss: torch.Tensor | float | None, features: torch.Tensor | None = None
    ) -> None:
        """Add one step's loss and features to the current window, without a verdict.

        The per-step work of [`step`][mrissl.diagnostics.CollapseMonitor.step]: a running sum
        and a feature-moment update, entirely on the device, so it never synchronises and
        compiles into one graph (``torch.compile(monitor.update, fullgraph=True)``). It counts
        no steps and closes no window: after ``update(loss, features)`` call ``step(None)``,
        which counts the step and closes a window every ``window`` steps without adding the
        loss or the features a second time (or call ``step(loss, features)`` alone instead).

        Args:
            loss: the step's reconstruction loss, a 0-dim tensor (detached here) or a float;
                None if only features are monitored.
            features: ``(B, D)`` or ``(B, N, D)`` features of the step (detached here).

        Raises:
            TypeError: if the loss is neither a tensor nor a number.
            ValueError: if the loss is not a scalar; the meter's errors for bad features.
        """
        if loss is not None:
            if isinstance(loss, torch.Tensor):
                if loss.numel() != 1:
                    raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
                if loss.device != self.loss_sum.device:
                    self.loss_sum = self.loss_sum.to(loss.device)
                    self.loss_count = self.loss_count.to(loss.device)
                self.loss_sum.add_(loss.detach().reshape(()).to(torch.float64))
            elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise TypeError(f"loss must be a tensor or a float, got {type(loss).__name__}")
            else:
                self.loss_sum.add_(float(loss))
            self.loss_count.add_(1)
        if features is not None:
            self.meter.update(features)

    @torch.no_grad()
    def step(
        self,
        loss: torch.Tensor | float | None,
        features: torch.Tensor | None = None,
        *,
        warn: bool | None = None,
    ) -> CollapseStatus:
        """Record one training step; every ``window`` steps, update the verdict.

        Between window ends this is [`update`][mrissl.diagnostics.CollapseMonitor.update] plus
        a Python step counter (no synchronisation); at a window's end it reads the mean loss
        and decomposes the window's moments on the host.

        Args:
            loss: the step's reconstruction loss, a 0-dim tensor (detached here) or a float;
                None if only features are monitored.
            features: ``(B, D)`` or ``(B, N, D)`` features of the step (detached here).
            warn: override the monitor's ``warn`` for this call.

        Returns:
            The latest [`CollapseStatus`][mrissl.diagnostics.CollapseStatus] (unchanged between
            window ends).

        Raises:
            ValueError: if the loss is not a scalar, or the window's mean loss is NaN/Inf; the
                meter's errors for bad features.
        """
        self.update(loss, features)
        self.steps += 1
        if self.steps % self.window == 0:
            self._close_window(self.warn if warn is None else warn)
        return self.status

    def _close_window(self, warn: bool) -> None:
        loss: float | None = None
        loss_count = int(self.loss_count)
        if loss_count:
            loss = float(self.loss_sum) / loss_count
            if not math.isfinite(loss):
                raise ValueError(
                    f"the mean loss over steps {self.steps - self.window + 1}-{self.steps} is "
                    f"{loss}: the training loss has become NaN or Inf"
                )
            self.losses.append(loss)
        rank: float | None = None
        if int(self.meter.count) >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a small window is capped by design
                rank = float(self.meter.compute().effective_rank)
            self.ranks.append(rank)
        self.meter.reset()
        self.loss_sum.zero_()
        self.loss_count.zero_()
        before = self.status
        self.status = self._verdict(loss, rank)
        if warn and (
            (self.status.complete and not before.complete)
            or (self.status.dimensional and not before.dimensional)
        ):
            warnings.warn(self.status.reason, stacklevel=3)

    def _verdict(self, loss: float | None, rank: float | None) -> CollapseStatus:
        reasons = []
        complete = dimensional = False
        if (
            loss is not None
            and self.floor is not None
            and abs(loss - self.floor) <= self.tolerance * self.floor
        ):
            complete = True
            reasons.append(
                f"complete collapse: the mean loss {loss:.4g} over the last {self.window} "
                f"steps is within {self.tolerance:.0%} of the collapsed-loss floor "
                f"Var(x_m) = {self.floor:.4g} (E-MIM eq. 3)"
            )
        if rank is not None and self.ranks:
            first = self.ranks[0]
            recent = self.ranks[-(self.patience + 1) :]
            falling = len(recent) == self.patience + 1 and all(
                b < a for a, b in itertools.pairwise(recent)
            )
            if rank < self.rank_fraction * first:
                dimensional = True
                reasons.append(
                    f"dimensional collapse: the effective rank {rank:.2f} is below "
                    f"{self.rank_fraction:.0%} of its initial value {first:.2f}"
                )
            elif falling and recent[-1] <= (1 - self.min_drop) * recent[0]:
                dimensional = True
                reasons.append(
                    f"dimensional collapse: the effective rank fell in each of the last "
                    f"{self.patience} windows, from {recent[0]:.2f} to {recent[-1]:.2f}"
                )
        if not reasons:
            parts = []
            if loss is not None:
                floor = "" if self.floor is None else f" (floor {self.floor:.4g})"
                parts.append(f"mean loss {loss:.4g}{floor}")
            if rank is not None:
                parts.append(f"effective rank {rank:.2f} (initial {self.ranks[0]:.2f})")
            reasons.append("no collapse: " + ", ".join(parts) if parts else "no collapse")
        return CollapseStatus(self.steps, complete, dimensional, "; ".join(reasons), loss, rank)

    def get_extra_state(self) -> dict[str, Any]:
        """The step counter, the window's running loss and the history (for ``state_dict``)."""
        return {
            "steps": self.steps,
            "loss_sum": float(self.loss_sum),
            "loss_count": int(self.loss_count),
            "ranks": list(self.ranks),
            "losses": list(self.losses),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the state written by ``get_extra_state``."""
        self.steps = int(state["steps"])
        self.loss_sum.fill_(float(state["loss_sum"]))
        self.loss_count.fill_(int(state["loss_count"]))
        self.ranks = [float(r) for r in state["ranks"]]
        self.losses = [float(v) for v in state["losses"]]

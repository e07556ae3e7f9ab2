"""The state the framework integrations share: one rank meter per feature, an optional monitor."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from mrissl.diagnostics import CollapseMonitor, EffectiveRankMeter

__all__: list[str] = []

Features = torch.Tensor | Mapping[str, torch.Tensor]


def require(module: str, extra: str) -> Any:
    """Import a framework or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"mrissl.integrations.{extra} needs the `{module}` package, which is not installed; "
            f'install it with `pip install "mrissl[{extra}]"`'
        ) from err


class RankTracker:
    """Streams features into one meter per name and turns them into loggable numbers.

    Args:
        name: the name of the features when a single tensor is given.
        prefix: put in front of every logged name (``"train/"``).
        center, eps: passed to each [`EffectiveRankMeter`][mrissl.diagnostics.EffectiveRankMeter].
        gather_distributed: merge the meters over ``torch.distributed`` processes before reading.
        monitor: a [`CollapseMonitor`][mrissl.diagnostics.CollapseMonitor] stepped with the loss
            and the features of every update.
        monitor_on: which named features the monitor sees, when there are several.
    """

    def __init__(
        self,
        *,
        name: str,
        prefix: str,
        center: bool,
        eps: float,
        gather_distributed: bool,
        monitor: CollapseMonitor | None,
        monitor_on: str | None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        if monitor is not None and not isinstance(monitor, CollapseMonitor):
            raise TypeError(
                f"monitor must be a mrissl.diagnostics.CollapseMonitor or None, got "
                f"{type(monitor).__name__}"
            )
        # checked here so that a bad value fails at construction, not at the first batch
        EffectiveRankMeter(1, center=center, eps=eps, gather_distributed=gather_distributed)
        self.name = name
        self.prefix = prefix
        self.center = center
        self.eps = eps
        self.gather_distributed = gather_distributed
        self.monitor = monitor
        self.monitor_on = monitor_on
        self.meters: dict[str, EffectiveRankMeter] = {}

    def _named(self, features: Any, source: str) -> dict[str, torch.Tensor]:
        if isinstance(features, torch.Tensor):
            return {self.name: features}
        if isinstance(features, Mapping) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in features.items()
        ):
            return dict(features)
        raise TypeError(
            f"{source} must give a (B, D) or (B, N, D) tensor or a mapping of names to such "
            f"tensors, got {type(features).__name__}"
        )

    def update(self, features: Any, loss: torch.Tensor | float | None, source: str) -> None:
        """Feed one batch of features (and the step's loss, for the monitor)."""
        named = self._named(features, source)
        for key, z in named.items():
            meter = self.meters.get(key)
            if meter is None:
                meter = EffectiveRankMeter(
                    z.shape[-1],
                    center=self.center,
                    eps=self.eps,
                    gather_distributed=self.gather_distributed,
                )
                self.meters[key] = meter
            meter.update(z)
        if self.monitor is not None:
            if self.monitor_on is not None:
                key = self.monitor_on
            elif len(named) == 1:
                (key,) = named
            else:
                raise ValueError(
                    f"{source} gives several features {sorted(named)}: say which one the "
                    f"CollapseMonitor watches with monitor_on="
                )
            if key not in named:
                raise ValueError(
                    f"monitor_on={key!r} is not among the features {sorted(named)} of {source}"
                )
            self.monitor.step(loss, named[key])

    def compute(self) -> dict[str, torch.Tensor]:
        """Effective rank and RankMe of every feature, and the monitor's flags, by name.

        The values are 0-dim float64 tensors (a logger that stores float32 would round them).
        """
        values: dict[str, torch.Tensor] = {}
        for key, meter in self.meters.items():
            result = meter.compute()
            values[f"{self.prefix}{key}/effective_rank"] = result.effective_rank
            values[f"{self.prefix}{key}/rankme"] = result.rankme
        if self.monitor is not None:
            status = self.monitor.status
            for flag in ("complete", "dimensional"):
                value = torch.tensor(float(getattr(status, flag)), dtype=torch.float64)
                values[f"{self.prefix}collapse/{flag}"] = value
        return values

    def reset(self) -> None:
        """Start a new epoch (the monitor keeps its windows and history)."""
        for meter in self.meters.values():
            meter.reset()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's windows and history (the meters restart every epoch)."""
        return {} if self.monitor is None else {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        if self.monitor is not None and "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])

    def status_reason(self) -> str | None:
        """The monitor's last verdict, in words."""
        return None if self.monitor is None else self.monitor.status.reason

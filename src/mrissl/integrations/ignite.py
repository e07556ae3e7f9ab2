"""An Ignite handler that puts the effective rank of chosen features in the engine's metrics.

Works with any ``ignite.engine.Engine``, and so with MONAI's ``SupervisedTrainer`` and
``SupervisedEvaluator`` (pass it in ``train_handlers`` / ``val_handlers``). Needs
pytorch-ignite (``pip install "mrissl[ignite]"``); importing this module without it raises an
``ImportError`` that says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mrissl.diagnostics import CollapseMonitor
from mrissl.diagnostics.spectrum import RANKME_EPS
from mrissl.integrations._tracker import RankTracker, require

require("ignite", "ignite")

from ignite.engine import Engine, Events  # noqa: E402

__all__ = ["EffectiveRankHandler", "engine_output"]


def engine_output(engine: Engine, key: str = "pred") -> Any:
    """Read ``key`` from ``engine.state.output`` as one batch, whatever MONAI did to it.

    MONAI's engines keep the iteration's output as a dict (``decollate=False``) or, by default,
    as a list of per-sample dicts; this gives the ``(B, …)`` tensor in both cases.

    Args:
        engine: a running engine.
        key: ``"pred"`` (MONAI's ``CommonKeys.PRED``), ``"loss"``, ``"image"``, …

    Returns:
        The batched value, or ``None`` when the output has no such key.

    Examples:
        >>> from ignite.engine import Engine
        >>> engine = Engine(lambda e, b: [{"pred": torch.ones(3)}, {"pred": torch.zeros(3)}])
        >>> _ = engine.run([0], max_epochs=1)
        >>> engine_output(engine).shape
        torch.Size([2, 3])
    """
    output: Any = engine.state.output
    if isinstance(output, Mapping):
        return output.get(key)
    if isinstance(output, Sequence) and output and all(isinstance(o, Mapping) for o in output):
        values = [o.get(key) for o in output]
        if any(v is None for v in values):
            return None
        if key == "loss":  # MONAI copies the batch's loss into every sample
            return values[0]
        return torch.stack(values)
    return None


class EffectiveRankHandler:
    """Stream features into rank meters each iteration; write the values each epoch.

    At every ``ITERATION_COMPLETED`` the features are fed to a streaming
    [`EffectiveRankMeter`][mrissl.diagnostics.EffectiveRankMeter] (one ``D × D`` product, no
    host synchronisation); at ``EPOCH_COMPLETED`` the meters are read into
    ``engine.state.metrics`` (where MONAI's ``StatsHandler`` and ``TensorBoardStatsHandler``,
    attached after this handler, pick them up), optionally written to ``logger``, and reset.
    Under ``torch.distributed`` the meters merge their moments over all processes first
    (``gather_distributed``), so every process gets the value of the global epoch.

    Names in ``engine.state.metrics``, with ``prefix`` in front: ``<name>/effective_rank`` and
    ``<name>/rankme`` (floats) for each feature, and with a ``monitor``, ``collapse/complete``
    and ``collapse/dimensional`` (1.0 when flagged).

    Args:
        features: a function ``engine -> (B, D) | (B, N, D)`` tensor, or a mapping of names to
            such tensors; default: the engine's prediction
            ([`engine_output`][mrissl.integrations.ignite.engine_output] ``(engine, "pred")``),
            right for a network that outputs embeddings.
        name: the name of the features when a single tensor is given.
        prefix: put in front of every metric name.
        center: subtract the running mean (spectrum of the covariance).
        eps: the ``ε`` of RankMe.
        gather_distributed: merge over all processes before reading (a no-op without a group).
        monitor: a [`CollapseMonitor`][mrissl.diagnostics.CollapseMonitor] stepped every
            iteration with ``loss(engine)`` and the features.
        monitor_on: the features the monitor watches, when ``features`` gives several.
        loss: a function ``engine -> loss`` for the monitor; default: MONAI's ``"loss"``
            output.
        logger: a ``logging.Logger`` that gets one line per epoch (and the monitor's verdict).

    Examples:
        >>> from ignite.engine import Engine
        >>> g = torch.Generator().manual_seed(0)
        >>> batches = [torch.randn(16, 8, generator=g) for _ in range(4)]
        >>> engine = Engine(lambda engine, batch: {"pred": batch})  # embeddings as output
        >>> EffectiveRankHandler().attach(engine)
        >>> state = engine.run(batches, max_epochs=1)
        >>> sorted(state.metrics)
        ['features/effective_rank', 'features/rankme']
    """

    def __init__(
        self,
        features: Callable[[Engine], Any] | None = None,
        *,
        name: str = "features",
        prefix: str = "",
        center: bool = True,
        eps: float = RANKME_EPS,
        gather_distributed: bool = True,
        monitor: CollapseMonitor | None = None,
        monitor_on: str | None = None,
        loss: Callable[[Engine], Any] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        for arg, fn in (("features", features), ("loss", loss)):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"{arg} must be a function of the engine or None, got {type(fn).__name__}"
                )
        if logger is not None and not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger, got {type(logger).__name__}")
        self.features = features
        self.loss = loss
        self.logger = logger
        self.tracker = RankTracker(
            name=name,
            prefix=prefix,
            center=center,
            eps=eps,
            gather_distributed=gather_distributed,
            monitor=monitor,
            monitor_on=monitor_on,
        )

    def state_dict(self) -> dict[str, Any]:
        """The monitor's windows and history (for Ignite's ``Checkpoint``)."""
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the monitor."""
        self.tracker.load_state_dict(state_dict)

    def attach(self, engine: Engine) -> None:
        """Register the handler's three events on ``engine`` (MONAI calls this for its handlers)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        """Start the epoch's meters from zero."""
        self.tracker.reset()

    def iteration_completed(self, engine: Engine) -> None:
        """Feed the iteration's features (and loss, for the monitor)."""
        features = engine_output(engine, "pred") if self.features is None else self.features(engine)
        if features is None:
            raise ValueError(
                "EffectiveRankHandler found no features: the engine's output has no 'pred'; "
                "pass features=<function of the engine>"
            )
        loss = None
        if self.tracker.monitor is not None:
            loss = engine_output(engine, "loss") if self.loss is None else self.loss(engine)
        self.tracker.update(features, loss, "EffectiveRankHandler(features=...)")

    def epoch_completed(self, engine: Engine) -> None:
        """Read the meters into ``engine.state.metrics`` (and the logger)."""
        if not self.tracker.meters:
            return
        values = {k: float(v) for k, v in self.tracker.compute().items()}
        engine.state.metrics.update(values)
        if self.logger is not None:
            text = "  ".join(f"{k}: {v:.4f}" for k, v in values.items())
            self.logger.info(f"epoch {engine.state.epoch}: {text}")
            reason = self.tracker.status_reason()
            if reason is not None:
                self.logger.info(reason)

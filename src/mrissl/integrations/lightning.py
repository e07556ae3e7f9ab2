"""A Lightning callback that logs the effective rank of chosen features every epoch.

Needs Lightning (``pip install "mrissl[lightning]"``); importing this module without it raises
an ``ImportError`` that says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from mrissl._checks import check_choice
from mrissl.diagnostics import CollapseMonitor
from mrissl.diagnostics.spectrum import RANKME_EPS
from mrissl.integrations._tracker import RankTracker, require

require("lightning", "lightning")

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

__all__ = ["EffectiveRankCallback"]

FeatureFn = Callable[[LightningModule, Any, Any], "torch.Tensor | Mapping[str, torch.Tensor]"]


class EffectiveRankCallback(Callback):
    """Log the effective rank and RankMe of chosen features, and a collapse verdict, per epoch.

    Every training (or validation) batch, the features are fed to a streaming
    [`EffectiveRankMeter`][mrissl.diagnostics.EffectiveRankMeter] (one ``D × D`` product, no
    host synchronisation); at the end of the epoch the meter is read, the values are logged
    with ``pl_module.log`` (so every Lightning logger, the progress bar and ``ModelCheckpoint``
    see them) and the meter starts over. Under DDP the meters merge their moments over all
    processes before they are read (``gather_distributed``), so every process logs the spectrum
    of the global epoch, equal to one process seeing every batch.

    Logged names, with ``prefix`` in front: ``<name>/effective_rank`` and ``<name>/rankme``
    for each feature, and with a ``monitor``, ``collapse/complete`` and
    ``collapse/dimensional`` (1.0 when flagged) from its latest
    [`CollapseStatus`][mrissl.diagnostics.CollapseStatus].

    Args:
        features: where the features of a batch come from: a function
            ``(pl_module, batch, outputs) -> (B, D) | (B, N, D)`` tensor, or a mapping of names
            to such tensors (one meter each, for example one per pyramid level); or a string,
            the key of that tensor in the dict returned by ``training_step`` /
            ``validation_step``, or else the name of an attribute of the module holding it.
        name: the name of the features when a single tensor is given.
        stage: ``"train"`` (training batches, logged at the end of each training epoch) or
            ``"validation"`` (validation batches, sanity check excluded).
        prefix: put in front of every logged name; default ``"train/"`` or ``"val/"``.
        center: subtract the running mean (spectrum of the covariance).
        eps: the ``ε`` of RankMe.
        gather_distributed: merge over all DDP processes before reading (a no-op without one).
        monitor: a [`CollapseMonitor`][mrissl.diagnostics.CollapseMonitor] stepped every
            training batch with the loss (``outputs["loss"]`` or the returned tensor) and the
            features; give it ``gather_distributed=True`` under DDP as well.
        monitor_on: the features the monitor watches, when ``features`` gives several.
        prog_bar: also show the values in the progress bar.

    The monitor's windows and history are saved in Lightning checkpoints and restored on
    resume; the meters start over every epoch.

    Raises:
        ValueError: for an unknown ``stage``; at the first batch, for features that cannot be
            found.

    Examples:
        >>> import lightning.pytorch as pl
        >>> class Module(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder = torch.nn.Linear(8, 4)
        ...     def training_step(self, batch, batch_idx):
        ...         z = self.encoder(batch[0])
        ...         return {"loss": z.pow(2).mean(), "embeddings": z}
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 8))
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      callbacks=[EffectiveRankCallback("embeddings")])
        >>> trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> sorted(trainer.callback_metrics)
        ['train/embeddings/effective_rank', 'train/embeddings/rankme']
    """

    def __init__(
        self,
        features: str | FeatureFn,
        *,
        name: str | None = None,
        stage: Literal["train", "validation"] = "train",
        prefix: str | None = None,
        center: bool = True,
        eps: float = RANKME_EPS,
        gather_distributed: bool = True,
        monitor: CollapseMonitor | None = None,
        monitor_on: str | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        check_choice(stage, "stage", ("train", "validation"))
        if not (isinstance(features, str) or callable(features)):
            raise TypeError(
                f"features must be a function (pl_module, batch, outputs) -> tensor or a name, "
                f"got {type(features).__name__}"
            )
        default_name = features if isinstance(features, str) else "features"
        self.features = features
        self.stage = stage
        self.prog_bar = prog_bar
        self.tracker = RankTracker(
            name=default_name if name is None else name,
            prefix=("train/" if stage == "train" else "val/") if prefix is None else prefix,
            center=center,
            eps=eps,
            gather_distributed=gather_distributed,
            monitor=monitor,
            monitor_on=monitor_on,
        )

    def _features(self, pl_module: LightningModule, batch: Any, outputs: Any) -> Any:
        if not isinstance(self.features, str):
            return self.features(pl_module, batch, outputs)
        key = self.features
        if isinstance(outputs, Mapping) and key in outputs:
            return outputs[key]
        if hasattr(pl_module, key):
            return getattr(pl_module, key)
        raise ValueError(
            f"features={key!r} is neither a key of the dict returned by the step "
            f"(keys: {sorted(outputs) if isinstance(outputs, Mapping) else 'not a dict'}) nor "
            f"an attribute of {type(pl_module).__name__}"
        )

    @staticmethod
    def _loss(outputs: Any) -> torch.Tensor | None:
        if isinstance(outputs, Mapping):
            loss = outputs.get("loss")
            return loss if isinstance(loss, torch.Tensor) else None
        return outputs if isinstance(outputs, torch.Tensor) else None

    def _update(self, pl_module: LightningModule, outputs: Any, batch: Any) -> None:
        source = f"EffectiveRankCallback(features={self.features!r})"
        loss = self._loss(outputs) if self.stage == "train" else None
        self.tracker.update(self._features(pl_module, batch, outputs), loss, source)

    def _log(self, pl_module: LightningModule) -> None:
        if not self.tracker.meters:
            return
        values = self.tracker.compute()
        self.tracker.reset()
        # already global (the meters merged across processes), so no second reduction
        pl_module.log_dict(
            values, on_step=False, on_epoch=True, sync_dist=False, prog_bar=self.prog_bar
        )

    def state_dict(self) -> dict[str, Any]:
        """The monitor's windows and history, saved in Lightning checkpoints."""
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the monitor from a checkpoint."""
        self.tracker.load_state_dict(state_dict)

    def on_train_batch_end(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.stage == "train":
            self._update(pl_module, outputs, batch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        if self.stage == "train":
            self._log(pl_module)

    def on_validation_batch_end(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.stage == "validation" and not trainer.sanity_checking:
            self._update(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        if self.stage == "validation" and not trainer.sanity_checking:
            self._log(pl_module)

"""Watch the effective rank of a Lightning model's embeddings, with one callback.

A small 3D encoder (``PatchEmbed3d``, a transformer layer, mean pooling) learns Barlow Twins
embeddings of two noisy views of smooth random two-modality volumes, in a plain
``LightningModule``. Two mrissl pieces watch it:

* ``EffectiveRankCallback`` reads the embeddings that ``training_step`` returns, streams them
  into a rank meter, and logs ``train/embeddings/effective_rank``, ``.../rankme`` and the
  verdict of a ``CollapseMonitor`` (``train/collapse/...``) every epoch. Under DDP the meters
  merge over all processes, so the value is that of the whole epoch.
* ``EffectiveRank``, the same meter as a ``torchmetrics.Metric``, is logged on the validation
  set the torchmetrics way (``self.log("val/effective_rank", metric)``).

The logged values go to a CSV logger and are printed at the end. Run it with
``python examples/lightning_rank_callback.py`` or ``--quick`` for a few-second smoke run
(needs ``pip install "mrissl[lightning]"``). The data are random fields, not MRI.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from mrissl.diagnostics import CollapseMonitor
from mrissl.integrations.lightning import EffectiveRankCallback
from mrissl.integrations.torchmetrics import EffectiveRank
from mrissl.losses import BarlowTwinsLoss
from mrissl.nn import PatchEmbed3d

DIM = 32


def smooth_volumes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random fields, two modalities, standing in for MRI contrasts."""
    x = torch.rand(n, 2, size, size, size, generator=generator)
    x = F.avg_pool3d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return (x - x.mean()) / x.std()


# --8<-- [start:module]
class BarlowTwinsModule(pl.LightningModule):
    """Barlow Twins on two noisy views; ``training_step`` also returns the embeddings."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.embed = PatchEmbed3d(img_size=size, patch_size=size // 2, in_chans=2, embed_dim=DIM)
        self.block = nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, batch_first=True)
        self.loss = BarlowTwinsLoss()
        self.val_rank = EffectiveRank(DIM)  # a torchmetrics.Metric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2, S, S, S)`` volumes to ``(B, DIM)`` embeddings."""
        return self.block(self.embed(x)).mean(dim=1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Two views, one loss; the embeddings go to the callback through the returned dict."""
        (x,) = batch
        z1 = self(x + 0.3 * torch.randn_like(x))
        z2 = self(x + 0.3 * torch.randn_like(x))
        loss = self.loss(z1, z2)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return {"loss": loss, "embeddings": z1}

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        """Feed the metric; Lightning computes, logs and resets it at the end of the epoch."""
        self.val_rank.update(self(batch[0]))
        self.log("val/effective_rank", self.val_rank, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=1e-3)


# --8<-- [end:module]


def main() -> None:
    """Fit for a few epochs and print what the loggers received."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size, n = (8, 128) if args.quick else (16, 512)
    epochs = args.epochs or (2 if args.quick else 10)
    pl.seed_everything(args.seed, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    g = torch.Generator().manual_seed(args.seed)
    train = torch.utils.data.TensorDataset(smooth_volumes(n, size, g))
    val = torch.utils.data.TensorDataset(smooth_volumes(n // 2, size, g))
    tmp = tempfile.TemporaryDirectory(prefix="mrissl-lightning-")
    out = Path(tmp.name)

    # --8<-- [start:trainer]
    monitor = CollapseMonitor(DIM, window=n // 32, warn=False)
    callback = EffectiveRankCallback("embeddings", monitor=monitor)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=CSVLogger(out, name="logs", version=0),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(
        BarlowTwinsModule(size),
        torch.utils.data.DataLoader(train, batch_size=32, shuffle=True),
        torch.utils.data.DataLoader(val, batch_size=32),
    )
    # --8<-- [end:trainer]

    columns = [
        "train/loss",
        "train/embeddings/effective_rank",
        "train/embeddings/rankme",
        "train/collapse/dimensional",
        "val/effective_rank",
    ]
    rows: dict[int, dict[str, str]] = {}
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["epoch"]), {}).update({k: v for k, v in row.items() if v})
    print(f"logged by the CSV logger (embedding dimension {DIM}):")
    print("epoch  " + "  ".join(f"{c.split('/', 1)[1]:>24}" for c in columns))
    for epoch, row in sorted(rows.items()):
        print(f"{epoch:>5}  " + "  ".join(f"{float(row[c]):>24.3f}" for c in columns))
    print(f"monitor: {monitor.status.reason}")
    tmp.cleanup()


if __name__ == "__main__":
    main()

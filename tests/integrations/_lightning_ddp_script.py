"""Run by test_lightning.py: Lightning DDP on the CPU with 2 gloo processes.

Lightning starts the second process by running this script again with its rank in the
environment. Each process saves the features it produced; rank 0's CSV logger writes the values
the callback and the torchmetrics wrapper logged.
Usage: ``python _lightning_ddp_script.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from mrissl.integrations.lightning import EffectiveRankCallback
from mrissl.integrations.torchmetrics import EffectiveRank


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 4)
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.metric = EffectiveRank(4)  # the torchmetrics wrapper, synced by torchmetrics

    def training_step(self, batch, batch_idx):
        z = self.encoder(batch[0])
        self.seen.setdefault(self.current_epoch, []).append(z.detach().clone())
        self.metric.update(z)
        return {"loss": z.pow(2).mean(), "embeddings": z}

    def on_train_epoch_end(self):
        self.log("torchmetrics/effective_rank", self.metric.compute(), sync_dist=False)
        self.metric.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6) * torch.linspace(0.2, 2, 6))
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=CSVLogger(out, name="logs", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EffectiveRankCallback("embeddings")],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    torch.save(module.seen, out / f"features_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()

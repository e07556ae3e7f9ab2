"""Watch the effective rank of an encoder trained with MONAI's SupervisedTrainer.

A small 3D CNN classifies smooth random four-modality volumes by which modality is the
brightest, trained with MONAI's ``SupervisedTrainer`` and checked with a
``SupervisedEvaluator`` after every epoch. ``EffectiveRankHandler`` is an Ignite handler like
MONAI's own: given in ``train_handlers`` / ``val_handlers``, it streams the pooled encoder
features of every iteration into a rank meter and, at the end of each epoch, writes
``<name>/effective_rank``, ``<name>/rankme`` and a ``CollapseMonitor`` verdict into
``engine.state.metrics``, where MONAI's ``StatsHandler`` (given after it) prints them.

The features come from a forward hook on the encoder: the handler takes any function of the
engine. Run it with ``python examples/monai_engine_rank_handler.py`` or ``--quick`` for a
few-second smoke run (needs ``pip install "mrissl[ignite]"``). The data are random fields,
not MRI.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.nn.functional as F
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import StatsHandler, ValidationHandler
from torch import nn

from mrissl.diagnostics import CollapseMonitor
from mrissl.integrations.ignite import EffectiveRankHandler

DIM = 32


def smooth_cases(n: int, size: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Smooth random four-modality volumes; the label is the brightest modality."""
    x = torch.rand(n, 4, size, size, size, generator=g)
    x = F.avg_pool3d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    x = x + 0.05 * torch.randn(n, 4, 1, 1, 1, generator=g)
    labels = x.mean(dim=(2, 3, 4)).argmax(dim=1)
    return [{"image": x[i], "label": labels[i]} for i in range(n)]


def network() -> nn.Sequential:
    """A two-stage 3D CNN encoder, pooled to ``(B, DIM)``, and a linear head."""
    encoder = nn.Sequential(
        nn.Conv3d(4, 16, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Conv3d(16, DIM, 3, stride=2, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
    )
    return nn.Sequential(encoder, nn.Linear(DIM, 4))


def main() -> None:
    """Train and validate for a few epochs; StatsHandler prints the ranks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size, n = (8, 128) if args.quick else (16, 512)
    epochs = args.epochs or (2 if args.quick else 10)
    torch.manual_seed(args.seed)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    g = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(smooth_cases(n, size, g), batch_size=32)
    val_loader = torch.utils.data.DataLoader(smooth_cases(n // 2, size, g), batch_size=32)
    device = torch.device("cpu")

    # --8<-- [start:engines]
    net = network()
    latest: dict[str, torch.Tensor] = {}
    net[0].register_forward_hook(lambda module, args, out: latest.update(z=out))

    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=net,
        val_handlers=[
            EffectiveRankHandler(lambda engine: latest["z"], name="encoder", prefix="val/"),
            StatsHandler(name="val", iteration_log=False),
        ],
    )
    monitor = CollapseMonitor(DIM, window=n // 32, warn=False)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=train_loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[
            EffectiveRankHandler(
                lambda engine: latest["z"], name="encoder", prefix="train/", monitor=monitor
            ),
            StatsHandler(name="train", iteration_log=False, tag_name="loss"),
            ValidationHandler(validator=evaluator, interval=1),
        ],
    )
    trainer.run()
    # --8<-- [end:engines]
    print(f"last epoch: {trainer.state.metrics}")
    print(f"monitor: {monitor.status.reason}")


if __name__ == "__main__":
    main()

"""Watch the effective rank of the features during training: two lines in any loop.

The two lines are the ones marked ``# <- 1`` and ``# <- 2`` below: an ``EffectiveRankMeter``
fed the features of every step, and read (then reset) once per epoch. A ``CollapseMonitor``
does the same and flags a rank that collapses.

The script trains a small 3D encoder (``PatchEmbed3d`` + two transformer-free layers) on
random smooth two-modality volumes, twice, with the same seed:

* ``aligned``: only pulls together the embeddings of two noisy views of the same volume and
  keeps each feature's standard deviation at 1 (VICReg without its covariance term). Nothing
  stops the features from becoming correlated, so they collapse into a few dimensions.
* ``decorrelated``: the same, plus a penalty on the off-diagonal covariance (VICReg's
  covariance term, the redundancy reduction Barlow Twins and E-MIM's PBT share), which keeps
  them spread over many dimensions.

It prints the effective rank per epoch for both runs, what the monitor says, and with
``--plot PATH`` saves the singular value spectra of the last epoch (and of the untrained
encoder) as in E-MIM Fig. 1b. ``--quick`` runs a few-second version. The data are random
fields, not MRI.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mrissl.diagnostics import CollapseMonitor, EffectiveRankMeter, plot_spectrum
from mrissl.nn import PatchEmbed3d

DIM = 64


def smooth_volumes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random fields, two modalities, standing in for MRI contrasts."""
    x = torch.rand(n, 2, size, size, size, generator=generator)
    for _ in range(1):
        x = F.avg_pool3d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return (x - x.mean()) / x.std()


class Encoder(nn.Module):
    """Patch embedding of 8 tokens and an MLP over them: ``(B, 2, S, S, S) -> (B, DIM)``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.embed = PatchEmbed3d(img_size=size, patch_size=size // 2, in_chans=2, embed_dim=DIM)
        self.head = nn.Sequential(
            nn.GELU(), nn.Flatten(), nn.Linear(8 * DIM, 512), nn.GELU(), nn.Linear(512, DIM)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2, S, S, S)`` volumes to ``(B, DIM)`` embeddings."""
        return self.head(self.embed(x))


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Invariance, variance (std >= 1 per feature) and covariance terms of VICReg."""
    invariance = F.mse_loss(z1, z2)
    variance = torch.zeros((), device=z1.device)
    covariance = torch.zeros((), device=z1.device)
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        variance = variance + F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()
        cov = z.T @ z / (z.shape[0] - 1)
        off_diagonal = cov - torch.diag(torch.diag(cov))
        covariance = covariance + off_diagonal.pow(2).sum() / z.shape[1]
    return invariance, variance, covariance


def train(
    name: str, data: torch.Tensor, decorrelate: bool, epochs: int, seed: int
) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Train one run; return the effective rank per epoch and the first and last spectra."""
    torch.manual_seed(seed)
    encoder = Encoder(data.shape[-1])
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    meter = EffectiveRankMeter(DIM)  # <- 1: O(DIM²) memory however many steps are fed
    monitor = CollapseMonitor(DIM, window=len(data) // 32, warn=False)
    ranks: list[float] = []
    first_spectrum = torch.empty(0)
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=g)
        for batch in order.split(32):
            x = data[batch]
            noise = 0.5 * torch.randn(2, *x.shape, generator=g)
            z1, z2 = encoder(x + noise[0]), encoder(x.flip(-1) + noise[1])
            invariance, variance, covariance = vicreg_terms(z1, z2)
            loss = 25 * invariance + 25 * variance + (10 * covariance if decorrelate else 0)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            meter.update(z1.detach())  # <- 2: one D×D product per step
            status = monitor.step(loss, z1)
        result = meter.compute()  # the spectrum of every sample of the epoch
        if epoch == 0:
            first_spectrum = result.spectrum
        ranks.append(float(result.effective_rank))
        meter.reset()
    print(f"{name:>12}: monitor says {status.reason}")
    return ranks, first_spectrum, result.spectrum


def main() -> None:
    """Train both runs, print their effective ranks, optionally plot the spectra."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--plot", metavar="PATH", default=None, help="save the spectra as PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size, n = (8, 128) if args.quick else (16, 512)
    epochs = args.epochs or (3 if args.quick else 20)

    data = smooth_volumes(n, size, torch.Generator().manual_seed(args.seed))
    runs = {
        name: train(name, data, decorrelate, epochs, args.seed)
        for name, decorrelate in (("aligned", False), ("decorrelated", True))
    }
    print(f"effective rank of {n} features of dimension {DIM}, per epoch:")
    print("epoch  " + "  ".join(f"{name:>12}" for name in runs))
    for epoch in range(epochs):
        print(f"{epoch + 1:>5}  " + "  ".join(f"{r[0][epoch]:>12.2f}" for r in runs.values()))
    if args.plot:
        spectra = {"first epoch": runs["aligned"][1]}
        spectra.update({f"{name}, last epoch": r[2] for name, r in runs.items()})
        plot_spectrum(
            spectra,
            normalize=True,
            title="Singular values of the features",
            path=args.plot,
        )
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

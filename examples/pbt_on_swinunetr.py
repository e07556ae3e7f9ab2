"""Add E-MIM's pyramid Barlow Twins loss to MONAI's SwinUNETR encoder.

SwinUNETR keeps its own code. The four Swin stages (``swinViT.layers1`` to ``layers4``) are the
pyramid levels: ``capture_intermediates`` finds them, hands each ``(B, C, D, H, W)`` stage
output back as ``(B, N, C)`` tokens in raster order, and the pyramid Barlow Twins (PBT) loss
compares the full and the masked view level by level (E-MIM eqs. 7-8). The lines that add PBT
are marked ``# PBT``; everything else is an ordinary segmentation step, so the loss here is
``L_seg + L_PBT`` (in pretraining, the segmentation term would be a reconstruction term).

1. E-MIM's hybrid mask pattern hides modalities, positions and patches of each volume.
2. The encoder runs on the full and on the masked volume, one ``with`` block each.
3. The segmentation loss uses SwinUNETR's full output on the full volume; PBT is added.
4. A few AdamW steps on smooth random four-modality volumes; each step prints the terms.

Run it with ``python examples/pbt_on_swinunetr.py`` (64³ volumes, ``feature_size=24``) or
``--quick`` for a few-second smoke run. The data are random fields, not MRI.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from mrissl.losses import PyramidBarlowTwinsLoss
from mrissl.masking import HybridMaskPattern, apply_mask
from mrissl.nn import capture_intermediates


def smooth_volumes(batch: int, modalities: int, size: tuple[int, ...], g: torch.Generator):
    """Smooth random fields, one per modality, standing in for MRI contrasts."""
    x = torch.rand(batch, modalities, *size, generator=g)
    for _ in range(2):
        x = F.avg_pool3d(x, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    return (x - x.mean()) / x.std()


def main() -> None:
    """Train a few steps of segmentation + PBT on SwinUNETR and print both terms."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    size, feature_size, depths, window, batch, steps = (64, 64, 64), 24, (2, 2, 2, 2), 7, 2, 5
    if args.quick:
        size, feature_size, depths, window, batch, steps = (32, 32, 64), 12, (1, 1, 1, 1), 4, 2, 1
    steps = args.steps or steps
    modalities, classes = 4, 3
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    net = SwinUNETR(
        in_channels=modalities,
        out_channels=classes,
        feature_size=feature_size,
        depths=depths,
        window_size=window,
    )
    # PBT: one level per Swin stage. The stages hold from N = 4096 to 8 tokens (64³ input); each
    # level's N × N term is a mean over its N² entries (the default), so the levels weigh alike.
    pbt = PyramidBarlowTwinsLoss(4)
    mask_pattern = HybridMaskPattern()  # E-MIM's default hybrid mask
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    print(f"SwinUNETR feature_size={feature_size}, volumes ({batch}, {modalities}, {size})")

    for step in range(1, steps + 1):
        x = smooth_volumes(batch, modalities, size, g)
        labels = (x[:, :1] > 0).long() + (x[:, 1:2] > 0.5).long()  # (B, 1, D, H, W) in 0..2

        mask = mask_pattern(x, patch_size=16, generator=g)  # (B, C, N), True = masked
        x_masked = apply_mask(x, mask, patch_size=16)
        with capture_intermediates(net) as full:  # PBT
            logits = net(x)
        with capture_intermediates(net) as masked:  # PBT
            net.swinViT(x_masked)  # the encoder alone: the decoder is not needed here

        seg = F.cross_entropy(logits, labels[:, 0])
        loss_pbt, per_level = pbt(full, masked, return_levels=True)  # PBT
        loss = seg + loss_pbt  # PBT

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tokens = [f"{f.shape[1]}×{f.shape[2]}" for f in full]
        levels = "  ".join(
            f"l{k}={v.item():.3f}" for k, v in zip(pbt.levels, per_level, strict=True)
        )
        if step == 1:
            print(f"stage tokens (N×C): {'  '.join(tokens)}; grids {full.grids}")
        print(f"step {step}: L_seg {seg.item():.4f}  L_PBT {loss_pbt.item():.3f}  ({levels})")


if __name__ == "__main__":
    main()

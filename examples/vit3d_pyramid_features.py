"""Pyramid features of a 3D ViT on a multi-modal volume, for the full and a masked view.

This is the input side of E-MIM's pyramid Barlow Twins loss, built from mrissl.nn and a
stock timm VisionTransformer:

1. ``PatchEmbed3d`` turns a timm ViT into a 3D encoder for ``(B, C, D, H, W)`` volumes.
2. A whole modality and some positions are hidden (zero-filled) to make the masked view.
3. ``capture_intermediates`` collects the token features of blocks 3, 6, 9 and 12
   (``pyramid_levels(12, 4)``) for both views, one ``with`` block per forward pass.
4. The script prints, per level, the mean cosine similarity between the features of the
   same patch position in the two views: the diagonal of E-MIM's matrix ``C`` (eq. 4), which
   the pyramid Barlow Twins loss drives towards 1.

Run it with ``python examples/vit3d_pyramid_features.py`` (96³ volumes, ViT-S-sized encoder)
or ``--quick`` for a few-second smoke run. The volumes are smooth random fields, not MRI; the
numbers describe an untrained encoder.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mrissl.nn import (
    PatchEmbed3d,
    capture_intermediates,
    patchify,
    pyramid_levels,
    unpatchify,
)


def smooth_volumes(batch: int, modalities: int, size: int, generator: torch.Generator):
    """Smooth random fields in [0, 1], one per modality, standing in for MRI contrasts."""
    x = torch.rand(batch, modalities, size, size, size, generator=generator)
    for _ in range(3):
        x = F.avg_pool3d(x, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    lo = x.amin(dim=(2, 3, 4), keepdim=True)
    hi = x.amax(dim=(2, 3, 4), keepdim=True)
    return (x - lo) / (hi - lo)


def main() -> None:
    """Build the encoder, mask a view, capture both pyramids and print their agreement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    size, patch, dim, depth, heads, batch = (96, 16, 384, 12, 6, 2)
    if args.quick:
        size, patch, dim, depth, heads, batch = (32, 8, 48, 4, 4, 2)
    modalities = 4
    g = torch.Generator().manual_seed(args.seed)

    vit = VisionTransformer(
        img_size=size,
        patch_size=patch,
        in_chans=modalities,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    ).eval()
    x = smooth_volumes(batch, modalities, size, g)

    # masked view: modality 0 hidden entirely, and a random half of the positions everywhere
    tokens = patchify(x, patch)  # (B, C, N, p³)
    n = tokens.shape[2]
    mask = torch.zeros(batch, modalities, n, dtype=torch.bool)
    mask[:, 0] = True
    hidden_positions = torch.rand(batch, n, generator=g).argsort(dim=1)[:, : n // 2]
    mask.scatter_(2, hidden_positions[:, None, :].expand(-1, modalities, -1), True)
    x_m = unpatchify(tokens.masked_fill(mask[..., None], 0.0), patch, size)

    levels = pyramid_levels(depth, 4)
    with torch.no_grad():
        with capture_intermediates(vit, levels) as full:
            vit(x)
        with capture_intermediates(vit, levels) as masked:
            vit(x_m)

    print(f"volume {tuple(x.shape)}, {n} tokens of {patch}^3, mask ratio {mask.float().mean():.2f}")
    print("block  tokens        cos(z_i, z_m_i)  (E-MIM eq. 4 diagonal, untrained encoder)")
    for block, z, z_m in zip(levels, full, masked, strict=True):
        cos = F.cosine_similarity(z.float(), z_m.float(), dim=-1).mean()
        print(f"{block:>5}  {tuple(z.shape)!s:<12}  {cos:.4f}")


if __name__ == "__main__":
    main()

"""Add E-MIM's pyramid Barlow Twins loss to MONAI's MaskedAutoEncoderViT.

The MAE keeps its own forward pass and reconstruction loss (a mean over the masked voxels); the
pyramid Barlow Twins (PBT) term is added on top, as E-MIM's eq. 10 does (``L = L_MIM + L_PBT``),
with its default ``reduction="mean"`` (each level a mean over its ``K × K`` entries), so that
both terms are of the same order (each step prints them):

1. The masked view is MONAI's usual forward pass. Its random token choice is replaced by keep
   indices drawn here with a ``torch.Generator`` (MONAI draws them inside ``forward`` with the
   global RNG and does not return them), so the loss knows which positions the encoder saw.
2. The full view runs the same patch embedding and blocks on every token (no decoder).
3. ``capture_intermediates`` collects blocks 3, 6, 9, 12 (``pyramid_levels(12, 4)``) of both
   views; ``PyramidBarlowTwinsLoss`` gathers the full view at the kept positions and compares
   patch positions (E-MIM eqs. 4 and 8).
4. A few AdamW steps on smooth random volumes; each step prints both loss terms.

Run it with ``python examples/pbt_on_monai_mae.py`` (96³ volumes with 4 modalities, a small ViT)
or ``--quick`` for a few-second smoke run. The data are smooth random fields, not MRI.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import MaskedAutoEncoderViT

from mrissl.losses import PyramidBarlowTwinsLoss, masked_reconstruction_loss
from mrissl.nn import capture_intermediates, gather_tokens, pyramid_levels


class MAEWithKeep(MaskedAutoEncoderViT):
    """MONAI's MAE, with the kept tokens chosen by the caller (``self.keep``, ``(B, K)``)."""

    keep: torch.Tensor

    def _masking(self, x: torch.Tensor, masking_ratio: float | None = None) -> Any:
        B, N, _ = x.shape
        mask = torch.ones(B, N, dtype=torch.int, device=x.device).scatter(1, self.keep, 0)
        return gather_tokens(x, self.keep), self.keep, mask


def encode_full(mae: MaskedAutoEncoderViT, x: torch.Tensor) -> None:
    """The encoder on every token: patch embedding, class token, blocks (hooks capture them)."""
    tokens = mae.patch_embedding(x)
    cls = mae.cls_token.expand(x.shape[0], -1, -1)
    mae.blocks(torch.cat([cls, tokens], dim=1))


def smooth_volumes(batch: int, modalities: int, size: int, generator: torch.Generator):
    """Smooth random fields in [0, 1], one per modality, standing in for MRI contrasts."""
    x = torch.rand(batch, modalities, size, size, size, generator=generator)
    for _ in range(3):
        x = F.avg_pool3d(x, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    lo = x.amin(dim=(2, 3, 4), keepdim=True)
    hi = x.amax(dim=(2, 3, 4), keepdim=True)
    return (x - lo) / (hi - lo)


def main() -> None:
    """Train a few steps of MAE + PBT and print both loss terms."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    size, patch, dim, depth, heads, batch, steps = (96, 16, 192, 12, 3, 2, 5)
    if args.quick:
        size, patch, dim, depth, heads, batch, steps = (32, 8, 48, 4, 4, 2, 3)
    steps = args.steps or steps
    modalities, mask_ratio = 4, 0.75
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    mae = MAEWithKeep(
        in_channels=modalities,
        img_size=size,
        patch_size=patch,
        hidden_size=dim,
        mlp_dim=4 * dim,
        num_layers=depth,
        num_heads=heads,
        decoder_hidden_size=dim,
        decoder_num_layers=2,
        decoder_num_heads=heads,
        masking_ratio=mask_ratio,
    )
    levels = pyramid_levels(depth, 4)
    pbt = PyramidBarlowTwinsLoss(levels)  # token mode, eq. 8 weights, mean over K × K entries
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-4)
    n_tokens = (size // patch) ** 3
    n_keep = int(n_tokens * (1 - mask_ratio))
    print(f"MONAI MaskedAutoEncoderViT: {depth} blocks, PBT on blocks {levels}")
    print(
        f"volumes ({batch}, {modalities}, {size}, {size}, {size}), {n_tokens} tokens, keep {n_keep}"
    )

    for step in range(1, steps + 1):
        x = smooth_volumes(batch, modalities, size, g)
        keep = (
            torch.rand(batch, n_tokens, generator=g).argsort(dim=1)[:, :n_keep].sort(dim=1).values
        )
        mae.keep = keep

        with capture_intermediates(mae, levels) as masked_feats:
            pred, mask = mae(x)  # pred: (B, N, C·p³) stacked tokens; mask: (B, N), 1 = masked
        with capture_intermediates(mae, levels) as full_feats:
            encode_full(mae, x)

        # MAE: error on the masked positions only, the target is the original volume
        loss = masked_reconstruction_loss(pred, x, mask.bool(), patch_size=patch)
        mim = loss.detach()
        total_pbt, per_level = pbt(full_feats, masked_feats, keep, return_levels=True)
        loss = loss + total_pbt  # E-MIM eq. 10

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        levels_txt = "  ".join(
            f"b{k}={v.item():.3f}" for k, v in zip(pbt.levels, per_level, strict=True)
        )
        print(f"step {step}: L_MIM {mim.item():.4f}  L_PBT {total_pbt.item():.3f}  ({levels_txt})")


if __name__ == "__main__":
    main()

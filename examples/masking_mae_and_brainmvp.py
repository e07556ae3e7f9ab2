"""One training step of each masking recipe: E-MIM's HMP with an MAE encoder, BrainMVP's fill.

1. ``HybridMaskPattern`` draws a ``(B, C, N)`` mask on the batch's device; ``keep_indices`` turns
   it into the kept-token indices of a per-modality MAE encoder (``PatchEmbed3d`` +
   timm ``Block``s); the decoder scores the masked patches only (``target_mask`` skips a
   missing modality).
2. ``BlockMask`` + ``cross_modal_fill`` make BrainMVP's cross-modal view, and ``apply_mask``
   with learnable templates makes the template-filled view; both reconstruct the unmasked
   batch, which is kept as a separate tensor.

The script prints the realised mask ratio next to ``expected_mask_ratio``, the pooled variance
of the voxels each mask hides (on this one batch: the loss of the best single-constant
predictor, a rough reading of E-MIM eq. 3's Var(x_m)), and the losses of one step.
Run ``python examples/masking_mae_and_brainmvp.py`` (96³, patch 16) or ``--quick``. The volumes
are smooth random fields, not MRI.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    apply_mask,
    cross_modal_fill,
    keep_indices,
    mask_to_voxels,
    target_mask,
)
from mrissl.nn import PatchEmbed3d, gather_tokens, patchify, scatter_tokens


def smooth_volumes(batch: int, modalities: int, size: int, generator: torch.Generator):
    """Smooth random fields in [0, 1], one per modality, standing in for MRI contrasts."""
    x = torch.rand(batch, modalities, size, size, size, generator=generator)
    for _ in range(3):
        x = F.avg_pool3d(x, kernel_size=5, stride=1, padding=2, count_include_pad=False)
    lo, hi = x.amin(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)
    return (x - lo) / (hi - lo)


def main() -> None:
    """Run one HMP/MAE step and one BrainMVP step and print what they did."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size, patch, block, dim, batch, C = (96, 16, 8, 192, 4, 4)
    if args.quick:
        size, patch, block, dim, batch, C = (32, 8, 4, 48, 2, 4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device).manual_seed(args.seed)
    x = smooth_volumes(batch, C, size, torch.Generator().manual_seed(args.seed)).to(device)
    available = torch.ones(batch, C, dtype=torch.bool, device=device)
    available[-1, -1] = False  # the last case lacks its last modality

    # 1. E-MIM HMP with a token-dropping (MAE) encoder, one token per modality and position
    hmp = HybridMaskPattern()
    mask = hmp(x, patch, available=available, generator=g)  # (B, C, N), True = masked
    n = mask.shape[2]
    print(
        f"HMP: realised ratio {mask.float().mean():.4f}, expected "
        f"{hmp.expected_mask_ratio(C, n):.4f} with all modalities present"
    )
    embed = PatchEmbed3d(
        size, patch_size=patch, in_chans=C, embed_dim=dim, layout="per_modality"
    ).to(device)
    encoder = nn.Sequential(*[Block(dim, num_heads=4) for _ in range(2)]).to(device)
    mask_token = nn.Parameter(torch.zeros(dim, device=device))
    head = nn.Linear(dim, patch**3).to(device)
    keep, _, padding = keep_indices(mask, pad=True)  # ragged: one case has a missing modality
    latent = encoder(gather_tokens(embed(x), keep))  # padded entries are masked tokens
    latent = torch.where(padding[..., None], mask_token.to(latent.dtype), latent)
    pred = head(scatter_tokens(latent, keep, C * n, fill=mask_token)).view(batch, C, n, -1)
    per_token = ((pred - patchify(x, patch)) ** 2).mean(dim=-1)
    loss_mae = per_token[target_mask(mask, available)].mean()  # missing modality: no target
    loss_mae.backward()

    # 2. BrainMVP: cross-modal view and template view, each reconstructing the unmasked x
    blocks = BlockMask(block, mask_ratio=0.875)
    templates = nn.Parameter(torch.zeros(1, C, size, size, size, device=device))
    cross_mask = blocks(x, available=available, generator=g)
    x_cross, source = cross_modal_fill(x, cross_mask, block, available=available, generator=g)
    x_tmpl = apply_mask(x, blocks(x, available=available, generator=g), block, fill=templates)
    decoder = nn.Conv3d(C, C, 3, padding=1).to(device)
    loss_cross = F.mse_loss(decoder(x_cross), x)
    loss_tmpl = F.mse_loss(decoder(x_tmpl), x)
    (loss_cross + loss_tmpl).backward()

    for name, m, p in (("HMP", mask, patch), ("BrainMVP blocks", cross_mask, block)):
        vox = mask_to_voxels(target_mask(m, available), p, size)
        print(f"{name}: variance of the masked voxels of this batch {x[vox].var():.4f}")
    print(f"cross-modal sources per case and modality (-1: none):\n{source.tolist()}")
    print(
        f"losses: MAE on HMP {loss_mae:.4f}, cross-modal {loss_cross:.4f}, "
        f"template {loss_tmpl:.4f}; template grad norm {templates.grad.norm():.4f}"
    )


if __name__ == "__main__":
    main()

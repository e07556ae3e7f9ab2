"""One BrainMVP pretraining step with mrissl's pieces, on phantom heads.

1. ``BlockMask`` draws BrainMVP's r³ block masks (two independent draws, one per view).
2. View f: the masked blocks take another modality of the same case (``cross_modal_fill``).
3. View g: the masked blocks take the learnable template of the input's own modality
   (``ModalityTemplates.fill``, at the crop's offset in the template canvas).
4. A small 3D network reconstructs both views; ``masked_reconstruction_loss`` against the
   unmasked input trains the network and, through view g, the templates (BrainMVP eqs. 2, 3).
5. ``info_nce`` ties the pooled features of the two views of each case (BrainMVP eqs. 4, 5).
6. One Adam step with the templates on their own learning rate, then the templates are
   exported to NIfTI in a temporary folder and read back.

BrainMVP trains on single-modality inputs: here every case of the batch is one modality of a
phantom head, cut as a random crop from a larger canvas-sized volume.

Run it with ``python examples/brainmvp_step.py`` (96³ crops from 128³ heads) or ``--quick``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

from mrissl.data import synthetic_phantom
from mrissl.losses import info_nce, masked_reconstruction_loss
from mrissl.masking import BlockMask, cross_modal_fill, mask_to_voxels
from mrissl.templates import ModalityTemplates

MODALITIES = ("t1", "t1ce", "t2", "flair")


class TinyUNet(nn.Module):
    """A stand-in encoder-decoder: pooled features for the contrastive term, a reconstruction."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv3d(1, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv3d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose3d(2 * width, width, 2, stride=2),
            nn.GELU(),
            nn.ConvTranspose3d(width, 1, 2, stride=2),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction ``(B, 1, d, h, w)`` and pooled features ``(B, 2·width)``."""
        z = self.encoder(x)
        return self.decoder(z), z.mean(dim=(2, 3, 4))


def main() -> None:
    """Build a batch, make the two views, compute the losses, step and export."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    head, crop, batch = (48, 32, 4) if args.quick else (128, 96, 4)
    g = torch.Generator().manual_seed(args.seed)

    # a batch of cases: each a random crop of one phantom head, all four modalities kept for
    # the cross-modal fill; the input of case b is its modality mods[b]
    heads = torch.stack([synthetic_phantom(head, MODALITIES, generator=i) for i in range(batch)])
    offsets = torch.randint(0, head - crop + 1, (batch, 3), generator=g)
    crops = torch.stack(
        [
            h[
                :, o0 : o0 + crop, o1 : o1 + crop, o2 : o2 + crop
            ]  # data loading, not the training step
            for h, (o0, o1, o2) in zip(heads, offsets.tolist(), strict=True)
        ]
    )
    mods = torch.randint(0, len(MODALITIES), (batch,), generator=g)
    x = crops[torch.arange(batch), mods][:, None]  # (B, 1, d, h, w), the target

    templates = ModalityTemplates(MODALITIES, shape=head)  # canvas = the head's grid
    net = TinyUNet()
    opt = torch.optim.Adam(
        [{"params": net.parameters()}, *templates.parameter_groups(5e-3)], lr=3e-4
    )

    masker = BlockMask(8, mask_ratio=0.875)
    # view f: cross-modal fill on all four channels, then keep the input's channel
    mask_f = masker(crops, generator=g)  # (B, 4, N)
    f_all, _ = cross_modal_fill(crops, mask_f, 8, generator=g)
    view_f = f_all[torch.arange(batch), mods][:, None]
    vox_f = mask_to_voxels(mask_f, 8, crop)[torch.arange(batch), mods][:, None]
    # view g: template fill at the crop's place, from the input's own modality template
    vox_g = mask_to_voxels(masker(x, generator=g), 8, crop)
    view_g = templates.fill(x, vox_g, mods, offsets)

    rec_f, feat_f = net(view_f)
    rec_g, feat_g = net(view_g)
    loss_cmr = masked_reconstruction_loss(rec_f, x, vox_f)  # BrainMVP eq. 2
    loss_md = masked_reconstruction_loss(rec_g, x, vox_g)  # BrainMVP eq. 3
    loss_cl = info_nce(feat_f, feat_g, temperature=0.1)  # BrainMVP eqs. 4, 5
    loss = loss_cmr + loss_md + loss_cl  # BrainMVP eq. 6, λ_MD = λ_CL = 1
    opt.zero_grad()
    loss.backward()
    used = int((templates.weight.grad != 0).sum())
    opt.step()

    print(f"L_CMR {loss_cmr.item():.4f}  L_MD {loss_md.item():.4f}  L_CL {loss_cl.item():.4f}")
    print(f"template voxels with a gradient: {used} of {templates.weight.numel()}")
    with tempfile.TemporaryDirectory() as folder:
        paths = templates.to_nifti(folder)
        back = ModalityTemplates.from_nifti(folder)
        same = torch.equal(back.weight, templates.weight.detach())
        print(f"exported {[p.name for p in paths]}; read back identical: {same}")


if __name__ == "__main__":
    main()

"""Whole E-MIM and BrainMVP training steps: eager against compiled, and where the time goes.

Each step is forward + backward with a small 3D ViT (timm ``VisionTransformer`` with
``mrissl.nn.PatchEmbed3d``), its masks drawn anew every call (``generator=None``: the global
RNG, the path ``torch.compile`` traces), value checks off (the default):

* E-MIM: ``HybridMaskPattern`` + ``apply_mask``; the ViT on ``x`` and on ``x_m`` with the
  block outputs of the pyramid levels; a linear head reconstructs the whole image;
  ``masked_reconstruction_loss(on="all") + PyramidBarlowTwinsLoss``; backward; then
  ``EffectiveRankMeter.update`` on the last level's tokens (eager in both variants).
* BrainMVP: single-modality inputs; ``BlockMask`` (r = P, p* = 0.875) twice,
  ``cross_modal_fill`` over the four modalities (view f), ``ModalityTemplates.fill`` at the
  crop's offsets (view g); the ViT on both views; ``info_nce`` of the pooled features plus
  ``masked_reconstruction_loss`` of each view; backward.

Cases (ratios ours/baseline):

* ``... compiled / eager``: the step's forward compiled with ``torch.compile(fullgraph=True)``
  (Inductor) against the same code eager; target <= 1.0 (the compiled step is not slower).
  The first (untimed) warm-up call compiles.
* ``... masks / step``: our masking (and for BrainMVP the two fills) alone, eager, as a fraction
  of the eager step; target < 0.02 for the ViT-B/16 step on CUDA, reported elsewhere.
* ``... PBT / step`` (E-MIM) and ``... losses / step``: the losses forward + backward on the
  step's features, as a fraction of the step; target < 0.05 for PBT in the ViT-B/16 step on
  CUDA, reported elsewhere.

The block outputs are taken by running ``vit.blocks`` in a loop (what ``capture_intermediates``
returns, checked equal before timing): ``capture_intermediates`` registers forward hooks
inside a ``with``, which Dynamo does not trace as one graph.

Run from the repository root::

    python benchmarks/bench_step.py --device cpu      # a small ViT (32³, 8³ patches, E 96, depth 4)
    python benchmarks/bench_step.py --quick           # tiny sizes, 1 repeat (CI smoke run)
    python benchmarks/bench_step.py --device cuda     # also a ViT-B/16 step at 96³ (B 8)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mrissl
from _harness import Case, compare, make_parser, parse_args
from mrissl.diagnostics import EffectiveRankMeter
from mrissl.losses import PyramidBarlowTwinsLoss, info_nce, masked_reconstruction_loss
from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    apply_mask,
    cross_modal_fill,
    mask_to_voxels,
)
from mrissl.nn import PatchEmbed3d, capture_intermediates, pyramid_levels, unpatchify
from mrissl.templates import ModalityTemplates

MODALITIES = ("t1", "t1ce", "t2", "flair")


@dataclass
class Size:
    """A ViT configuration and batch."""

    name: str
    img: int
    patch: int
    embed: int
    depth: int
    heads: int
    batch: int


def _vit(size: Size, in_chans: int, device: torch.device) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=size.img,
        patch_size=size.patch,
        in_chans=in_chans,
        embed_dim=size.embed,
        depth=size.depth,
        num_heads=size.heads,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    ).to(device)


def _block_outputs(vit: VisionTransformer, x: torch.Tensor, levels: list[int]) -> list[Any]:
    """The outputs of blocks ``levels`` (1-based) without prefix tokens, as
    ``capture_intermediates(vit, levels)`` records them during ``vit.forward_features(x)``."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    out = []
    for i, block in enumerate(vit.blocks):
        h = block(h)
        if i + 1 in levels:
            out.append(h[:, vit.num_prefix_tokens :])
    return out


def _check_block_outputs(vit: VisionTransformer, x: torch.Tensor, levels: list[int]) -> None:
    with torch.no_grad():
        with capture_intermediates(vit, levels) as captured:
            vit.forward_features(x)
        mine = _block_outputs(vit, x, levels)
    for a, b in zip(captured, mine, strict=True):
        if not torch.equal(a, b):
            raise RuntimeError("the block loop differs from capture_intermediates")


def emim_cases(size: Size, device: torch.device, compile_step: bool) -> Iterator[Case]:
    C, P, S = len(MODALITIES), size.patch, size.img
    vit = _vit(size, C, device)
    head = nn.Linear(size.embed, C * P**3).to(device)
    params = [*vit.parameters(), *head.parameters()]
    levels = pyramid_levels(size.depth, 4 if size.depth >= 4 else size.depth)
    pbt = PyramidBarlowTwinsLoss(levels)
    hmp = HybridMaskPattern()
    meter = EffectiveRankMeter(size.embed).to(device)
    x = torch.rand(size.batch, C, S, S, S, device=device)
    _check_block_outputs(vit, x, levels)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = hmp(x, P)  # (B, C, N)
        x_m = apply_mask(x, mask, P)
        full, masked = _block_outputs(vit, x, levels), _block_outputs(vit, x_m, levels)
        pred = unpatchify(head(masked[-1]), P, S)
        loss = masked_reconstruction_loss(pred, x, on="all") + pbt(full, masked)
        return loss, masked[-1]

    def make_step(fwd: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Any:
        def step() -> None:
            for p in params:
                p.grad = None
            loss, last = fwd(x)
            loss.backward()
            meter.update(last.detach().flatten(0, 1))

        return step

    eager = make_step(forward)

    def masks() -> None:
        apply_mask(x, hmp(x, P), P)

    with torch.no_grad():
        feats = _block_outputs(vit, x, levels)
    full = [f.detach().clone().requires_grad_(True) for f in feats]
    masked = [(f + 0.1 * torch.randn_like(f)).requires_grad_(True) for f in full]
    pred = torch.rand_like(x).requires_grad_(True)

    def pbt_step() -> None:
        pbt(full, masked).backward()

    def losses_step() -> None:
        (masked_reconstruction_loss(pred, x, on="all") + pbt(full, masked)).backward()

    desc = (
        f"ViT {size.name} (embed {size.embed}, depth {size.depth}, {size.heads} heads), "
        f"x ({size.batch}, {C}, {S}, {S}, {S}), patch {P}, levels {levels}"
    )
    vit_b = size.name.startswith("ViT-B") and device.type == "cuda"
    if compile_step:
        yield Case(
            f"E-MIM {size.name} compiled/eager",
            make_step(torch.compile(forward, fullgraph=True)),
            eager,
            description=f"E-MIM step, {desc}; fwd compiled with fullgraph=True (Inductor)",
            target_memory=None,
        )
    yield Case(
        f"E-MIM {size.name} masks/step",
        masks,
        eager,
        description=f"HybridMaskPattern + apply_mask as a fraction of the eager E-MIM step, {desc}",
        target_time=0.02 if vit_b else None,
        target_memory=None,
    )
    yield Case(
        f"E-MIM {size.name} PBT/step",
        pbt_step,
        eager,
        description=f"PyramidBarlowTwinsLoss fwd+bwd as a fraction of the E-MIM step, {desc}",
        target_time=0.05 if vit_b else None,
        target_memory=None,
    )
    yield Case(
        f"E-MIM {size.name} losses/step",
        losses_step,
        eager,
        description="reconstruction + PBT fwd+bwd as a fraction of the E-MIM step",
        target_time=None,
        target_memory=None,
    )


def brainmvp_cases(size: Size, device: torch.device, compile_step: bool) -> Iterator[Case]:
    C, P, S, B = len(MODALITIES), size.patch, size.img, size.batch
    vit = _vit(size, 1, device)
    head = nn.Linear(size.embed, P**3).to(device)
    templates = ModalityTemplates(MODALITIES, shape=S + 8).to(device)
    params = [*vit.parameters(), *head.parameters(), *templates.parameters()]
    masker = BlockMask(P, mask_ratio=0.875)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, C, S, S, S, device=device)  # all modalities of each case
    mods = torch.randint(0, C, (B,), generator=g).to(device)  # the input modality of each case
    offsets = torch.randint(0, 9, (B, 3), generator=g).to(device)  # crop starts in the canvas
    cases = torch.arange(B, device=device)

    def views(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x_in = x[cases, mods][:, None]  # (B, 1, S, S, S)
        mask_f = masker(x)  # (B, C, N): every modality, for the cross-modal sources
        filled, _ = cross_modal_fill(x, mask_f, P)
        view_f = filled[cases, mods][:, None]
        vox_f = mask_to_voxels(mask_f[cases, mods][:, None], P, S)
        vox_g = mask_to_voxels(masker(x_in), P, S)
        view_g = templates.fill(x_in, vox_g, mods, offsets)
        return x_in, view_f, view_g, vox_f, vox_g

    def run(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = vit.forward_features(view)[:, vit.num_prefix_tokens :]
        return unpatchify(head(tokens), P, S), tokens.mean(dim=1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_in, view_f, view_g, vox_f, vox_g = views(x)
        rec_f, z_f = run(view_f)
        rec_g, z_g = run(view_g)
        loss = info_nce(z_f, z_g, temperature=0.1)
        loss = loss + masked_reconstruction_loss(rec_f, x_in, vox_f)  # BrainMVP eq. 2
        return loss + masked_reconstruction_loss(rec_g, x_in, vox_g)  # BrainMVP eq. 3

    def make_step(fwd: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        def step() -> None:
            for p in params:
                p.grad = None
            fwd(x).backward()

        return step

    eager = make_step(forward)

    def masks_and_fills() -> None:
        views(x)

    z_f = torch.randn(B, size.embed, device=device, requires_grad=True)
    z_g = (z_f.detach() + torch.randn_like(z_f)).requires_grad_(True)
    rec = torch.rand(B, 1, S, S, S, device=device, requires_grad=True)
    x_in = x[:, :1]
    vox = mask_to_voxels(masker(x_in), P, S)

    def losses_step() -> None:
        loss = info_nce(z_f, z_g, temperature=0.1)
        loss = loss + masked_reconstruction_loss(rec, x_in, vox)
        loss = loss + masked_reconstruction_loss(rec, x_in, vox)
        loss.backward()

    desc = (
        f"ViT {size.name} (embed {size.embed}, depth {size.depth}), single-modality crops "
        f"({B}, 1, {S}, {S}, {S}) of 4 modalities, blocks {P}³"
    )
    vit_b = size.name.startswith("ViT-B") and device.type == "cuda"
    if compile_step:
        yield Case(
            f"BrainMVP {size.name} compiled/eager",
            make_step(torch.compile(forward, fullgraph=True)),
            eager,
            description=f"BrainMVP step, {desc}; fwd compiled with fullgraph=True (Inductor)",
            target_memory=None,
        )
    yield Case(
        f"BrainMVP {size.name} masks/step",
        masks_and_fills,
        eager,
        description="BlockMask x2 + cross_modal_fill + ModalityTemplates.fill as a fraction of "
        "the eager BrainMVP step",
        target_time=0.02 if vit_b else None,
        target_memory=None,
    )
    yield Case(
        f"BrainMVP {size.name} losses/step",
        losses_step,
        eager,
        description="info_nce + 2 masked_reconstruction_loss fwd+bwd as a fraction of the step",
        target_time=None,
        target_memory=None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the compiled cases (no Inductor)"
    )
    args = parse_args(parser, argv)
    if args.quick:
        sizes = [Size("tiny", 16, 8, 32, 2, 2, 2)]
    else:
        sizes = [Size("small", 32, 8, 96, 4, 4, 2)]
        if args.device.type == "cuda":
            sizes.append(Size("ViT-B/16", 96, 16, 768, 12, 12, 8))
    compile_step = not args.no_compile

    def cases() -> Iterator[Case]:
        for size in sizes:
            yield from emim_cases(size, args.device, compile_step)
            yield from brainmvp_cases(size, args.device, compile_step)

    with mrissl.checks("none"):
        compare(
            cases(),
            args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            json_path=args.json,
            title="Whole training steps: compiled vs eager, and the share of masks and losses",
        )


if __name__ == "__main__":
    main()

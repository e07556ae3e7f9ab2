"""Forward + backward of the ``mrissl.losses`` losses against lightly and MONAI.

Cases (all float32, inputs require grad, the loss is backpropagated to them):

* Feature-mode Barlow Twins, ``B = 256`` and ``D = 2048`` / ``8192``, against lightly's
  ``BarlowTwinsLoss`` (target: time ratio <= 1.0) and MONAI's ``BarlowTwinsLoss`` (reported).
  The values are checked to agree before timing (lightly to 1e-4 relative; MONAI differs by its
  unbiased normalisation and is only reported).
* Symmetric InfoNCE, ``B = 256``, ``D = 512``, τ = 0.1, against lightly's ``NTXentLoss``
  (target: time ratio <= 1.0) and MONAI's ``ContrastiveLoss`` (target: peak memory <= 0.1 of
  MONAI's). Both baselines compute SimCLR's NT-Xent over ``2B`` samples, which is the same
  batch-contrastive task; the values differ by definition.
* Token-mode pyramid Barlow Twins, 4 levels, ``E = 768``, ``B = 8``, at ``N = 216`` (96³
  volumes, 16³ patches, 4 modalities stacked in one token) and ``N = 864`` (the same volumes with
  one token per modality and position), against a ViT-B/16 forward + backward on the same batch
  (timm ``VisionTransformer`` with ``mrissl.nn.PatchEmbed3d``, depth 12, 12 heads): the time
  ratio is PBT's cost as a fraction of the encoder's (target < 0.05). The ViT cases are slow on
  a CPU; they run with at most 3 repeats.

Run from the repository root::

    python benchmarks/bench_losses.py                 # the sizes above
    python benchmarks/bench_losses.py --quick         # small sizes, 1 repeat (CI smoke run)
    python benchmarks/bench_losses.py --device cuda --json losses.json
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwins
from lightly.loss import NTXentLoss
from monai.losses import BarlowTwinsLoss as MonaiBarlowTwins
from monai.losses import ContrastiveLoss
from timm.models.vision_transformer import VisionTransformer

from _harness import Case, compare, make_parser, parse_args
from mrissl.losses import PyramidBarlowTwinsLoss, barlow_twins, info_nce
from mrissl.nn import PatchEmbed3d, capture_intermediates, pyramid_levels


def loss_step(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor
) -> Callable[[], None]:
    """One forward + backward of ``fn(a, b)``, gradients reset each call."""

    def step() -> None:
        a.grad = b.grad = None
        fn(a, b).backward()

    return step


def inputs(B: int, D: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, D, generator=g)
    b = a + torch.randn(B, D, generator=g)
    return a.to(device).requires_grad_(True), b.to(device).requires_grad_(True)


def barlow_cases(quick: bool, device: torch.device) -> Iterator[Case]:
    B, dims = (32, (256, 1024)) if quick else (256, (2048, 8192))
    for D in dims:
        a, b = inputs(B, D, device, seed=D)
        ours = partial(barlow_twins, lambda_offdiag=5e-3)
        lightly = LightlyBarlowTwins(lambda_param=5e-3)
        monai = MonaiBarlowTwins(lambd=5e-3)
        with torch.no_grad():
            got, want = ours(a, b).item(), lightly(a, b).item()
        if abs(got - want) > 1e-4 * abs(want):
            raise RuntimeError(f"Barlow Twins B={B} D={D}: ours {got} vs lightly {want}")
        desc = f"z_a, z_b ({B}, {D}) float32, λ = 5e-3"
        yield Case(
            f"BT B{B} D{D} vs lightly",
            loss_step(ours, a, b),
            loss_step(lightly, a, b),
            description=desc + "; baseline lightly.loss.BarlowTwinsLoss",
            target_memory=None,
        )
        yield Case(
            f"BT B{B} D{D} vs monai",
            loss_step(ours, a, b),
            loss_step(monai, a, b),
            description=desc + "; baseline monai.losses.BarlowTwinsLoss",
            target_time=None,
            target_memory=None,
        )


def info_nce_cases(quick: bool, device: torch.device) -> Iterator[Case]:
    B, D = (32, 64) if quick else (256, 512)
    a, b = inputs(B, D, device, seed=1)
    ours = partial(info_nce, temperature=0.1)
    desc = f"a, b ({B}, {D}) float32, τ = 0.1"
    yield Case(
        f"InfoNCE B{B} D{D} vs lightly",
        loss_step(ours, a, b),
        loss_step(NTXentLoss(temperature=0.1), a, b),
        description=desc + "; baseline lightly.loss.NTXentLoss",
        target_memory=None,
    )
    yield Case(
        f"InfoNCE B{B} D{D} vs monai",
        loss_step(ours, a, b),
        loss_step(ContrastiveLoss(temperature=0.1), a, b),
        description=desc + "; baseline monai.losses.ContrastiveLoss (target: 10x less memory)",
        target_time=None,
        target_memory=0.1,
    )


def pbt_cases(quick: bool, device: torch.device) -> Iterator[Case]:
    size, patch, embed, depth, heads, B, C = (
        (32, 8, 96, 4, 4, 2, 4) if quick else (96, 16, 768, 12, 12, 8, 4)
    )
    levels = pyramid_levels(depth, 4)
    pbt = PyramidBarlowTwinsLoss(levels)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, size, size, size, generator=g).to(device)
    for layout in ("stacked", "per_modality"):
        torch.manual_seed(0)
        vit = VisionTransformer(
            img_size=size,
            patch_size=patch,
            in_chans=C,
            embed_dim=embed,
            depth=depth,
            num_heads=heads,
            num_classes=0,
            embed_layer=partial(PatchEmbed3d, layout=layout),
        ).to(device)
        with torch.no_grad(), capture_intermediates(vit, levels) as feats:
            vit(x)
        N = feats[0].shape[1]
        full = [f.detach().clone().requires_grad_(True) for f in feats]
        masked = [(f + 0.1 * torch.randn_like(f)).requires_grad_(True) for f in full]

        def pbt_step(full: list[torch.Tensor] = full, masked: list[torch.Tensor] = masked) -> None:
            for t in (*full, *masked):
                t.grad = None
            pbt(full, masked).backward()

        def vit_step(vit: VisionTransformer = vit) -> None:
            vit.zero_grad(set_to_none=True)
            vit(x).float().pow(2).mean().backward()

        yield Case(
            f"PBT N{N} / ViT fwd+bwd",
            pbt_step,
            vit_step,
            description=(
                f"PBT: 4 levels, 2 views of ({B}, {N}, {embed}) float32, token mode, per-sample; "
                f"baseline: ViT (embed {embed}, depth {depth}, {heads} heads, PatchEmbed3d "
                f"layout={layout}) forward+backward on x ({B}, {C}, {size}, {size}, {size}); "
                f"t ratio = PBT's cost as a fraction of the encoder's (target 0.05)"
            ),
            target_time=0.05,
            target_memory=None,
        )


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    args = parse_args(parser, argv)

    def loss_cases() -> Iterator[Case]:
        yield from barlow_cases(args.quick, args.device)
        yield from info_nce_cases(args.quick, args.device)

    compare(
        loss_cases(),
        args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        json_path=args.json,
        title="mrissl.losses vs lightly / MONAI, forward+backward",
    )
    compare(
        pbt_cases(args.quick, args.device),
        args.device,
        warmup=min(args.warmup, 1),
        repeats=min(args.repeats, 3),
        json_path=args.json.replace(".json", "_pbt.json") if args.json else None,
        title="PyramidBarlowTwinsLoss as a fraction of a ViT-B/16 forward+backward",
    )


if __name__ == "__main__":
    main()

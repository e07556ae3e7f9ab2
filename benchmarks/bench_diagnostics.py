"""``EffectiveRankMeter`` against stacking features and calling ``torch.linalg.svdvals``.

Two comparisons:

1. **Streaming vs stacking.** 100,000 × 768 float32 features arrive in batches of 256 (held in
   a list before timing starts, as a training run would produce them). Ours: one
   ``EffectiveRankMeter(768)``, ``update`` per batch, then ``compute``. Baseline: ``torch.cat``
   of all batches and ``torch.linalg.svdvals`` of the stack (float32, what a script would
   write). Both give the spectrum of the same features; the meter's effective rank is checked
   against the baseline's before anything is timed. Targets: time ratio <= 1.0, peak memory
   ratio <= 0.1 (at least 10x lower).
2. **Cost of ``update`` in a training step.** ``meter.update`` on the pooled ``(B, 768)``
   features of a batch against a ViT-B forward (timm ``VisionTransformer`` with
   ``PatchEmbed3d``, 96³ volumes with 4 modalities, patch 16, 12 blocks, width 768) on the same
   batch, without gradients (bf16 autocast on CUDA). The time ratio is the fraction of a
   forward that ``update`` adds; target <= 0.05. ``update`` on all ``(B, 216, 768)`` tokens is
   shown too, without a target.
3. **The collapse floor of five masks in one pass.** ``mrissl collapse-check``'s five default
   masks (random 0.5/0.75/0.9 and HMP on patch 16, BrainMVP blocks of 8) on 16 cases of
   4 × 96³ in batches of 8, eight draws each, then the five floors. Ours: the shared pass
   (``SharedFloorPass``: one batched product over tokens for every meter); baseline: each
   ``CollapseFloorMeter.update`` on its own (the plain path). The floors are checked equal
   (1e-6 relative) before anything is timed. Target: time ratio <= 0.25 (measured on two
   CPU cores, one thread: 0.22, peak memory 0.67×).

Run from the repository root::

    python benchmarks/bench_diagnostics.py                 # full sizes (ViT batch 256 CUDA, 16 CPU)
    python benchmarks/bench_diagnostics.py --quick         # small sizes, 1 repeat (CI)
    python benchmarks/bench_diagnostics.py --device cuda --json diagnostics.json
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
from timm.models.vision_transformer import VisionTransformer

from _harness import Case, compare, make_parser, parse_args
from mrissl.diagnostics import CollapseFloorMeter, EffectiveRankMeter, effective_rank
from mrissl.diagnostics._floor_pass import SharedFloorPass
from mrissl.masking import BlockMask, HybridMaskPattern, RandomTokenMask
from mrissl.nn import PatchEmbed3d


def stream_case(quick: bool, device: torch.device) -> Case:
    n, dim, batch = (10_000, 128, 256) if quick else (100_000, 768, 256)
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -2, dim)  # an anisotropic spectrum, as trained features have
    batches = [
        (torch.randn(min(batch, n - i), dim, generator=g) * scales).to(device)
        for i in range(0, n, batch)
    ]

    def ours() -> torch.Tensor:
        meter = EffectiveRankMeter(dim).to(device)
        for b in batches:
            meter.update(b)
        return meter.compute().effective_rank

    def baseline() -> torch.Tensor:
        return torch.linalg.svdvals(torch.cat(batches))

    got, ref = float(ours()), float(effective_rank(baseline()))
    if abs(got - ref) > 1e-4 * ref:
        raise RuntimeError(f"meter and svdvals disagree: effective rank {got} vs {ref}")
    return Case(
        name=f"stream {n // 1000}k×{dim}",
        ours=ours,
        baseline=baseline,
        description=(
            f"{n} × {dim} float32 features in batches of {batch}; ours EffectiveRankMeter "
            "update+compute (float64 moments), baseline torch.cat + torch.linalg.svdvals"
        ),
        target_time=1.0,
        target_memory=0.1,
    )


def vit_cases(quick: bool, device: torch.device, batch: int) -> Iterator[Case]:
    size, dim, depth, heads = (32, 96, 2, 4) if quick else (96, 768, 12, 12)
    patch = 16 if not quick else 8
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=size,
        patch_size=patch,
        in_chans=4,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    ).to(device)
    vit.eval()
    x = torch.randn(batch, 4, size, size, size, device=device)
    amp = device.type == "cuda"

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return vit(x)

    pooled = forward().float()
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :].float()
    meter = EffectiveRankMeter(dim).to(device)

    def update(z: torch.Tensor) -> Callable[[], None]:
        return lambda: meter.update(z)

    kind = "bf16 autocast" if amp else "fp32"
    yield Case(
        name=f"update (B={batch}, {dim})",
        ours=update(pooled),
        baseline=forward,
        description=(
            f"meter.update on pooled ({batch}, {dim}) features vs a ViT forward "
            f"(depth {depth}, width {dim}, {size}³×4, patch {patch}, {kind}, no grad)"
        ),
        target_time=0.05,
        target_memory=None,
    )
    yield Case(
        name=f"update tokens ({tokens.shape[1]})",
        ours=update(tokens),
        baseline=forward,
        description=f"meter.update on all ({batch}, {tokens.shape[1]}, {dim}) tokens, same ViT",
        target_time=None,
        target_memory=None,
    )


def floor_case(quick: bool, device: torch.device) -> Case:
    n, channels, side, batch = (4, 2, 32, 2) if quick else (16, 4, 96, 8)
    g = torch.Generator().manual_seed(0)
    volumes = [torch.rand(channels, side, side, side, generator=g).to(device) for _ in range(n)]
    masks = [
        (RandomTokenMask(0.5), 16),
        (RandomTokenMask(0.75), 16),
        (RandomTokenMask(0.9), 16),
        (HybridMaskPattern(), 16),
        (BlockMask(8, mask_ratio=0.875), None),
    ]

    def meters() -> list[CollapseFloorMeter]:
        return [
            CollapseFloorMeter(gen, patch_size=patch, num_draws=8, seed=0, device=device)
            for gen, patch in masks
        ]

    def batches() -> Iterator[tuple[torch.Tensor, list[int]]]:
        for s in range(0, n, batch):
            yield torch.stack(volumes[s : s + batch]), list(range(s, min(n, s + batch)))

    def ours() -> list[float]:
        shared = SharedFloorPass(meters())
        for x, index in batches():
            shared.update(x, index=index)
        return [r.floor for r in shared.compute()]

    def baseline() -> list[float]:
        plain = meters()
        for x, index in batches():
            for meter in plain:
                meter.update(x, index=index)
        return [meter.compute().floor for meter in plain]

    got, ref = ours(), baseline()
    if any(abs(a - b) > 1e-6 * abs(b) for a, b in zip(got, ref, strict=True)):
        raise RuntimeError(f"shared pass and meters disagree: {got} vs {ref}")
    return Case(
        name=f"floor 5 masks {n}×{channels}×{side}³",
        ours=ours,
        baseline=baseline,
        description=(
            f"{n} cases of {channels}×{side}³ in batches of {batch}, five masks × 8 draws, then "
            "the floors; ours SharedFloorPass, baseline each CollapseFloorMeter.update"
        ),
        target_time=None if quick else 0.25,  # tiny quick sizes measure overheads only
        target_memory=None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--batch", type=int, default=None, help="ViT batch (256 CUDA, 16 CPU)")
    args = parse_args(parser, argv)
    batch = args.batch or (8 if args.quick else (256 if args.device.type == "cuda" else 16))

    def cases() -> Iterator[Case]:
        yield stream_case(args.quick, args.device)
        yield from vit_cases(args.quick, args.device, batch)
        yield floor_case(args.quick, args.device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the capped-rank warning of small batches
        compare(
            cases(),
            args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            json_path=args.json,
            title="mrissl.diagnostics: streaming effective rank vs stacking + svdvals",
        )


if __name__ == "__main__":
    main()

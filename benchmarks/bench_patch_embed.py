"""``mrissl.nn.PatchEmbed3d`` against MONAI's ``PatchEmbeddingBlock``: training and inference.

Both sides do the same work: a patch-16 projection of a ``(2, 4, S, S, S)`` float32 volume to
768-dim tokens plus a learnable position embedding (MONAI's block adds one, so ours is timed
with a ``(1, N, 768)`` parameter added after ``PatchEmbed3d``), then the backward pass of
``out.float().pow(2).mean()``. The input does not require grad, the parameters do. MONAI's
conv weights are copied into ours and the outputs and weight gradients are checked to agree
before anything is timed. On CUDA the cases are repeated under bf16 autocast. A last case per
size times the forward pass alone under ``torch.no_grad()`` (feature extraction, held-out
effective rank), where ``PatchEmbed3d`` copies one slab of patch rows at a time.

Run from the repository root::

    python benchmarks/bench_patch_embed.py                   # 96³ and 128³, patch 16
    python benchmarks/bench_patch_embed.py --quick           # 32³, patch 8, 1 repeat (CI)
    python benchmarks/bench_patch_embed.py --device cuda --json patch_embed.json

Targets: ours/baseline <= 1.0 for both median time and peak memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from monai.networks.blocks import PatchEmbeddingBlock
from torch import nn

from _harness import Case, compare, make_parser, parse_args
from mrissl.nn import PatchEmbed3d

BATCH, CHANS, EMBED = 2, 4, 768


class OursWithPos(nn.Module):
    """``PatchEmbed3d`` followed by a learnable position embedding, as MONAI's block."""

    def __init__(self, size: int, patch: int, pos_embed: torch.Tensor) -> None:
        super().__init__()
        self.embed = PatchEmbed3d(img_size=size, patch_size=patch, in_chans=CHANS, embed_dim=EMBED)
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x) + self.pos_embed


def make_pair(size: int, patch: int, device: torch.device) -> tuple[nn.Module, OursWithPos]:
    """MONAI's block and ours with identical weights, on ``device``."""
    torch.manual_seed(0)
    base = PatchEmbeddingBlock(
        in_channels=CHANS,
        img_size=size,
        patch_size=patch,
        hidden_size=EMBED,
        num_heads=12,
        proj_type="conv",
        pos_embed_type="learnable",
        dropout_rate=0.0,
        spatial_dims=3,
    )
    ours = OursWithPos(size, patch, base.position_embeddings)
    with torch.no_grad():
        ours.embed.proj.weight.copy_(base.patch_embeddings.weight)
        ours.embed.proj.bias.copy_(base.patch_embeddings.bias)
    return base.to(device), ours.to(device)


def forward_backward(
    model: nn.Module, x: torch.Tensor, amp: torch.dtype | None
) -> Callable[[], torch.Tensor]:
    """One training step without the optimiser; gradients are dropped at the end."""
    params = list(model.parameters())

    def step() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = model(x)
        out.float().pow(2).mean().backward()
        for p in params:
            p.grad = None
        return out

    return step


def inference(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The forward pass alone, without autograd."""

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return forward


def check_agree(
    base: nn.Module, ours: OursWithPos, x: torch.Tensor, amp: torch.dtype | None
) -> None:
    """Raise unless outputs and conv-weight gradients agree (to 1e-4 of their scale, fp32)."""
    tol = 1e-4 if amp is None else 3e-2
    pairs = []
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        outs = base(x), ours(x)
    pairs.append(("output", *(o.float() for o in outs)))
    for o in outs:
        o.float().pow(2).mean().backward()
    pairs.append(("weight grad", base.patch_embeddings.weight.grad, ours.embed.proj.weight.grad))
    for p in [*base.parameters(), *ours.parameters()]:
        p.grad = None
    for what, ref, got in pairs:
        scale = ref.abs().max().item()
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=tol, atol=tol * scale):
            err = (got - ref).abs().max().item() if got.shape == ref.shape else float("nan")
            raise RuntimeError(
                f"PatchEmbed3d and MONAI disagree on the {what} ({x.shape[-1]}³, amp={amp}): "
                f"shapes {tuple(got.shape)} vs {tuple(ref.shape)}, max |diff| {err:.3g} "
                f"vs scale {scale:.3g}"
            )


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    sizes, patch = ((32,), 8) if quick else ((96, 128), 16)
    amps: list[torch.dtype | None] = [None]
    if device.type == "cuda":
        amps.append(torch.bfloat16)
    for size in sizes:
        base, ours = make_pair(size, patch, device)
        x = torch.randn(BATCH, CHANS, size, size, size, device=device)
        for amp in amps:
            check_agree(base, ours, x, amp)
            kind = "fp32" if amp is None else "bf16 autocast"
            yield Case(
                name=f"{size}³ p{patch} {'fp32' if amp is None else 'bf16'} fwd+bwd",
                ours=forward_backward(ours, x, amp),
                baseline=forward_backward(base, x, amp),
                description=(
                    f"x ({BATCH}, {CHANS}, {size}, {size}, {size}) float32, patch {patch}, "
                    f"embed {EMBED}, {kind}; baseline monai PatchEmbeddingBlock(conv, learnable)"
                ),
            )
        yield Case(
            name=f"{size}³ p{patch} fp32 no_grad fwd",
            ours=inference(ours, x),
            baseline=inference(base, x),
            description="the same, forward only under torch.no_grad() (feature extraction)",
        )


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    args = parse_args(parser, argv)
    compare(
        cases(args.quick, args.device),
        args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        json_path=args.json,
        title="PatchEmbed3d (+ learnable pos embed) vs monai PatchEmbeddingBlock",
    )


if __name__ == "__main__":
    main()

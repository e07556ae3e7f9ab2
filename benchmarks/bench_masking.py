"""Mask generation plus mask application against the copy floor and per-sample baselines.

Cases (B = 32, C = 4, 96³ float32 volumes, patch 16, BrainMVP blocks 8³; ``--quick``: B = 2,
32³, patch 8, blocks 4³):

1. ``hmp+apply vs clone``: ``HybridMaskPattern()`` drawn on the volume's device plus
   ``apply_mask`` (zero fill) into a new tensor, against ``volume.clone()``, the
   memory-bandwidth floor of a fresh output (one read and one write of the batch). Target: at
   most 1.5x.
2. ``hmp+apply(out=) vs copy_``: the same written into a buffer reused across calls
   (``apply_mask(..., out=buffer)``, what a training loop does), against ``buffer.copy_(x)``,
   the floor with a reused buffer. Target: at most 1.5x.
3. ``hmp+apply(out=) vs loop``: ours as a training loop uses it (the buffer) against a
   straightforward per-sample loop doing the same three steps with ``randperm`` and
   boolean-index writes through a ``repeat_interleave`` voxel mask into ``x.clone()``.
   Target: at least 3x faster (ratio <= 0.33). For information, two more rows: ``hmp+apply
   vs loop`` (both allocate a new output: on the CPU the first write to fresh pages, which
   the kernel zeroes, costs more than the masking, so this ratio cannot reach 0.33) and
   ``hmp+apply(out=) vs loop(out=)`` (both write into a reused buffer). ``hmp mask only vs
   loop`` compares the mask generation alone.
4. ``block+xfill vs BrainMVP``: ``BlockMask()`` plus ``cross_modal_fill`` against a faithful
   re-implementation of the released BrainMVP approach: per case and modality, the mask of
   exactly ``floor(N·p*)`` aligned r³ blocks is built on the CPU with NumPy, expanded to
   voxels, and the source modality (uniform among the others) is written through a boolean
   index. Target: at least 5x faster (ratio <= 0.2).
5. ``block+xfill vs clone``: the same against ``volume.clone()``. Target: at most 2x. For
   information, ``block+xfill(out=) vs copy_``: into a reused buffer against
   ``buffer.copy_(x)``.
6. Fast paths against the plain path they replace, in the same run (each a private helper of
   ``mrissl/masking/fill.py`` with a test that it equals the plain path; target: faster, ratio
   < 1):

   * ``fast: row layout vs voxel mask``: ``apply_mask`` with a token mask (the mask spread
     along image rows, ``_row_layout``) against the plain path, ``mask_to_voxels`` and the same
     ``where`` on the voxel mask; constant fill 1.0, both into a reused buffer.
   * ``fast: row layout vs voxel mask (xfill)``: the same for ``cross_modal_fill`` with a
     ``BlockMask`` (same seeds, same sources).
   * ``fast: bitwise zero vs where`` and ``(out=)``: the zero fill as an integer AND
     (``_bitwise_zero_fill``) against ``torch.where(mask, 0.0, x)`` on the same row layout,
     into a new tensor and into a reused buffer.

   * ``fast: patch square sums vs square+sum``: the per-patch sums of squares of
     ``fill="noise"`` as a squared norm (``_patch_square_sums``) against squaring the volume
     and summing with einops.

   ``--only fast`` runs these alone.
7. CUDA only (``--device cuda``): HMP generation plus ``apply_mask`` against one ViT-B/16
   forward and backward pass (timm ``VisionTransformer`` with ``PatchEmbed3d``, depth 12,
   width 768, 12 heads, bf16 autocast) on the same batch. Target: under 2 % (ratio <= 0.02).

Every baseline is checked to do the same work (same mask counts, same fills) before timing.

Run from the repository root::

    python benchmarks/bench_masking.py --device cpu
    python benchmarks/bench_masking.py --quick
    python benchmarks/bench_masking.py --device cuda --json masking.json
    OMP_NUM_THREADS=1 python benchmarks/bench_masking.py --device cpu --only fast
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from einops import reduce

from _harness import Case, compare, make_parser, parse_args
from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    apply_mask,
    cross_modal_fill,
    mask_to_voxels,
)
from mrissl.masking.convert import _token_mask_5d
from mrissl.masking.fill import _bitwise_zero_fill, _patch_square_sums, _row_layout

CHANS = 4


# --- baselines written plainly, one sample at a time ----------------------------------------


def loop_hmp_masks(C: int, N: int, B: int, r_pos: float, r_patch: float, g: torch.Generator):
    """HMP token masks (one modality, positions, complementary patches), one sample at a time."""
    masks = torch.zeros(B, C, N, dtype=torch.bool)
    for b in range(B):
        m = masks[b]
        modal = int(torch.randperm(C, generator=g)[0])
        m[modal] = True
        positions = torch.randperm(N, generator=g)[: math.floor(N * r_pos + 1e-9)]
        m[:, positions] = True
        visible = [c for c in range(C) if c != modal]
        taken = set(positions.tolist())
        rest = [n for n in range(N) if n not in taken]
        base = math.floor(r_patch * len(visible) + 1e-9)
        frac = r_patch * len(visible) - base
        n_extra = math.floor(len(rest) * frac + 0.5)
        extra = set(torch.randperm(len(rest), generator=g)[:n_extra].tolist())
        for i, n in enumerate(rest):
            k = min(base + (i in extra), len(visible) - 1)
            for j in torch.randperm(len(visible), generator=g)[:k].tolist():
                m[visible[j], n] = True
    return masks


def loop_hmp_apply(
    x: torch.Tensor,
    patch: int,
    r_pos: float,
    r_patch: float,
    g: torch.Generator,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HMP masks as above, then a zero fill through a per-sample voxel mask.

    The output is ``x.clone()``, or ``out`` after ``out.copy_(x)`` when a buffer is given.
    """
    B, C, D, H, W = x.shape
    gd, gh, gw = D // patch, H // patch, W // patch
    masks = loop_hmp_masks(C, gd * gh * gw, B, r_pos, r_patch, g)
    out = x.clone() if out is None else out.copy_(x)
    for b in range(B):
        vox = (
            masks[b]
            .view(C, gd, gh, gw)
            .repeat_interleave(patch, 1)
            .repeat_interleave(patch, 2)
            .repeat_interleave(patch, 3)
        ).to(x.device)
        out[b][vox] = 0.0
    return out, masks


def brainmvp_block_fill(
    x: torch.Tensor, r: int, ratio: float, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """Released BrainMVP approach: per case and modality, a NumPy block mask and a bool scatter."""
    B, C, D, H, W = x.shape
    gd, gh, gw = D // r, H // r, W // r
    n = gd * gh * gw
    k = int(n * ratio + 1e-9)
    out = x.clone()
    counts = np.zeros((B, C), dtype=np.int64)
    for b in range(B):
        for c in range(C):
            flat = np.zeros(n, dtype=bool)
            flat[rng.permutation(n)[:k]] = True
            counts[b, c] = flat.sum()
            vox = flat.reshape(gd, gh, gw).repeat(r, 0).repeat(r, 1).repeat(r, 2)
            others = [s for s in range(C) if s != c]
            s = others[int(rng.integers(len(others)))]
            index = torch.from_numpy(vox).to(x.device)
            out[b, c][index] = x[b, s][index]
    return out, counts


# --- ours ------------------------------------------------------------------------------------


def ours_hmp(
    x: torch.Tensor, patch: int, g: torch.Generator, out: torch.Tensor | None = None
) -> Callable[[], torch.Tensor]:
    hmp = HybridMaskPattern()
    return lambda: apply_mask(x, hmp(x, patch, generator=g), patch, out=out)


def ours_block(
    x: torch.Tensor, r: int, g: torch.Generator, out: torch.Tensor | None = None
) -> Callable[[], torch.Tensor]:
    block = BlockMask(r)
    return lambda: cross_modal_fill(x, block(x, generator=g), r, generator=g, out=out)[0]


def check_same_work(x: torch.Tensor, patch: int, r: int, g: torch.Generator) -> None:
    """Raise unless ours and the baselines mask the same amounts and fill as documented."""
    hmp = HybridMaskPattern()
    mask = hmp(x, patch, generator=g)
    _, loop_masks = loop_hmp_apply(x[:2], patch, 0.5, 0.5, torch.Generator().manual_seed(0))
    if mask.float().mean().item() != loop_masks.float().mean().item():
        raise RuntimeError("HMP: the per-sample loop masks a different fraction than ours")
    looped, loop_masks = loop_hmp_apply(x[:2], patch, 0.5, 0.5, torch.Generator().manual_seed(0))
    loop_vox = mask_to_voxels(loop_masks, patch, x.shape[2:]).to(x.device)
    if not (
        bool((looped[loop_vox] == 0).all()) and torch.equal(looped[~loop_vox], x[:2][~loop_vox])
    ):
        raise RuntimeError("the per-sample loop did not zero exactly its masked voxels")
    vox = mask_to_voxels(mask, patch, x.shape[2:])
    for masked in (apply_mask(x, mask, patch), apply_mask(x, mask, patch, out=torch.empty_like(x))):
        if not (bool((masked[vox] == 0).all()) and torch.equal(masked[~vox], x[~vox])):
            raise RuntimeError("apply_mask did not zero exactly the masked voxels")
    block = BlockMask(r)(x, generator=g)
    filled, source = cross_modal_fill(x, block, r, generator=g)
    _, counts = brainmvp_block_fill(x[:1], r, 0.875, np.random.default_rng(0))
    if not (block.sum(dim=2).cpu().numpy() == counts[0, 0]).all():
        raise RuntimeError("BlockMask and the BrainMVP baseline mask different block counts")
    bvox = mask_to_voxels(block, r, x.shape[2:])
    b, c = 0, 0
    want = x[b, int(source[b, c])][bvox[b, c]]
    if not torch.equal(filled[b, c][bvox[b, c]], want):
        raise RuntimeError("cross_modal_fill did not copy the source modality")


def vit_b16_step(x: torch.Tensor) -> Callable[[], None]:
    """One ViT-B/16 forward and backward pass under bf16 autocast."""
    from timm.models.vision_transformer import VisionTransformer

    from mrissl.nn import PatchEmbed3d

    vit = VisionTransformer(
        img_size=x.shape[-1],
        patch_size=16,
        in_chans=x.shape[1],
        embed_dim=768,
        depth=12,
        num_heads=12,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    ).to(x.device)
    params = list(vit.parameters())

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = vit.forward_features(x)
        out.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

    return step


def fast_path_cases(
    x: torch.Tensor, patch: int, r: int, g: torch.Generator, buffers: tuple[torch.Tensor, ...]
) -> Iterator[Case]:
    """Each fast path of ``mrissl.masking.fill`` against the plain path it replaces."""
    ours_buffer, plain_buffer = buffers
    size = tuple(x.shape[2:])
    mask = HybridMaskPattern()(x, patch, generator=g)
    vox = lambda: mask_to_voxels(mask, patch, size)  # noqa: E731
    yield Case(
        name="fast: row layout vs voxel mask",
        ours=lambda: apply_mask(x, mask, patch, 1.0, out=ours_buffer),
        baseline=lambda: apply_mask(x, vox(), fill=1.0, out=plain_buffer),
        description="apply_mask(token mask) vs mask_to_voxels + apply_mask(voxel mask), fill 1.0",
        target_time=1.0,
        target_memory=None,
    )
    block = BlockMask(r)(x, generator=g)
    bvox = lambda: mask_to_voxels(block, r, size)  # noqa: E731
    seeded = lambda: torch.Generator(x.device).manual_seed(0)  # noqa: E731
    yield Case(
        name="fast: row layout vs voxel mask (xfill)",
        ours=lambda: cross_modal_fill(x, block, r, generator=seeded(), out=ours_buffer),
        baseline=lambda: cross_modal_fill(x, bvox(), generator=seeded(), out=plain_buffer),
        description="cross_modal_fill(block mask) vs mask_to_voxels + cross_modal_fill(voxels)",
        target_time=1.0,
        target_memory=None,
    )
    grid = (size[0] // patch, size[1] // patch, size[2] // patch)
    rows, view = _row_layout(_token_mask_5d(mask, grid), (patch,) * 3, tuple(x.shape))
    xv, zero = x.view(view), torch.zeros((), dtype=x.dtype, device=x.device)
    same = [
        (apply_mask(x, mask, patch, 1.0), apply_mask(x, vox(), fill=1.0)),
        (
            cross_modal_fill(x, block, r, generator=seeded()).volume,
            cross_modal_fill(x, bvox(), generator=seeded()).volume,
        ),
        (_bitwise_zero_fill(xv, rows, None), torch.where(rows, zero, xv)),
    ]
    pattern = "b c (gd pd) (gh ph) (gw pw) -> b c gd gh gw"
    squares = lambda: reduce(x.float().square(), pattern, "sum", pd=patch, ph=patch, pw=patch)  # noqa: E731
    if not (
        all(torch.equal(fast, plain) for fast, plain in same)
        and torch.allclose(_patch_square_sums(x, (patch,) * 3), squares(), rtol=1e-4)
    ):
        raise RuntimeError("a fast path of mrissl.masking.fill differs from its plain path")
    yield Case(
        name="fast: bitwise zero vs where",
        ours=lambda: _bitwise_zero_fill(xv, rows, None),
        baseline=lambda: torch.where(rows, zero, xv),
        description="zero fill into a new tensor, same row layout: integer AND vs where",
        target_time=1.0,
        target_memory=None,
    )
    yield Case(
        name="fast: bitwise zero vs where (out=)",
        ours=lambda: _bitwise_zero_fill(xv, rows, ours_buffer),
        baseline=lambda: torch.where(rows, zero, xv, out=plain_buffer.view(view)),
        description="the same into a reused buffer",
        target_time=1.0,
        target_memory=None,
    )
    yield Case(
        name="fast: patch square sums vs square+sum",
        ours=lambda: _patch_square_sums(x, (patch,) * 3),
        baseline=squares,
        description="float32 sum of squares per patch (fill='noise'): squared norm vs einops",
        target_time=1.0,
        target_memory=None,
    )


def cases(quick: bool, device: torch.device, only: str | None = None) -> Iterator[Case]:
    for case in _all_cases(quick, device):
        if only is None or only in case.name:
            yield case


def _all_cases(quick: bool, device: torch.device) -> Iterator[Case]:
    B, size, patch, r = (2, 32, 8, 4) if quick else (32, 96, 16, 8)
    g = torch.Generator(device).manual_seed(0)
    x = torch.rand(B, CHANS, size, size, size, generator=g, device=device)
    check_same_work(x, patch, r, g)
    shape = f"x ({B}, {CHANS}, {size}, {size}, {size}) float32 on {device}"
    loop_g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    ours_buffer, loop_buffer = torch.empty_like(x), torch.empty_like(x)
    yield Case(
        name="hmp+apply vs clone",
        ours=ours_hmp(x, patch, g),
        baseline=x.clone,
        description=f"{shape}; HybridMaskPattern() + apply_mask(zero), patch {patch}",
        target_time=1.5,
        target_memory=1.1,
    )
    yield Case(
        name="hmp+apply(out=) vs copy_",
        ours=ours_hmp(x, patch, g, out=ours_buffer),
        baseline=lambda: loop_buffer.copy_(x),
        description="both write into a buffer reused across calls (the training-loop case)",
        target_time=1.5,
        target_memory=None,
    )
    yield Case(
        name="hmp+apply(out=) vs loop",
        ours=ours_hmp(x, patch, g, out=ours_buffer),
        baseline=lambda: loop_hmp_apply(x, patch, 0.5, 0.5, loop_g),
        description=(
            "ours into a reused buffer; baseline: per-sample randperm steps, "
            "repeat_interleave voxel mask, bool write into x.clone()"
        ),
        target_time=1 / 3,
        target_memory=None,
    )
    yield Case(
        name="hmp+apply vs loop",
        ours=ours_hmp(x, patch, g),
        baseline=lambda: loop_hmp_apply(x, patch, 0.5, 0.5, loop_g),
        description="information: both allocate a new output (page zeroing dominates on CPU)",
        target_time=None,
        target_memory=None,
    )
    yield Case(
        name="hmp+apply(out=) vs loop(out=)",
        ours=ours_hmp(x, patch, g, out=ours_buffer),
        baseline=lambda: loop_hmp_apply(x, patch, 0.5, 0.5, loop_g, out=loop_buffer),
        description="information: both write into a reused buffer",
        target_time=None,
        target_memory=None,
    )
    yield Case(
        name="hmp mask only vs loop",
        ours=lambda: HybridMaskPattern()(x, patch, generator=g),
        baseline=lambda: loop_hmp_masks(CHANS, (size // patch) ** 3, B, 0.5, 0.5, loop_g),
        description="mask generation alone (information: where a per-sample loop loses time)",
        target_time=1 / 3,
        target_memory=None,
    )
    yield Case(
        name="block+xfill vs BrainMVP",
        ours=ours_block(x, r, g),
        baseline=lambda: brainmvp_block_fill(x, r, 0.875, rng),
        description=(
            f"BlockMask({r}, mask_ratio=0.875) + cross_modal_fill; baseline: released BrainMVP "
            "approach (NumPy mask per case and modality, bool-index scatter)"
        ),
        target_time=0.2,
        target_memory=None,
    )
    yield Case(
        name="block+xfill vs clone",
        ours=ours_block(x, r, g),
        baseline=x.clone,
        description="BlockMask + cross_modal_fill against the copy floor",
        target_time=2.0,
        target_memory=None,
    )
    yield Case(
        name="block+xfill(out=) vs copy_",
        ours=ours_block(x, r, g, out=ours_buffer),
        baseline=lambda: loop_buffer.copy_(x),
        description=(
            "information: both write into a reused buffer (ours makes two passes: the "
            "source copy, then the kept blocks put back)"
        ),
        target_time=None,
        target_memory=None,
    )
    yield from fast_path_cases(x, patch, r, g, (ours_buffer, loop_buffer))
    if device.type == "cuda":
        yield Case(
            name="hmp+apply vs ViT-B fwd+bwd",
            ours=ours_hmp(x, patch, g),
            baseline=vit_b16_step(x),
            description="ViT-B/16 (timm + PatchEmbed3d), bf16 autocast, forward + backward",
            target_time=0.02,
            target_memory=None,
        )


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--only", metavar="TEXT", help="run the cases whose name contains TEXT")
    args = parse_args(parser, argv)
    compare(
        cases(args.quick, args.device, args.only),
        args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        json_path=args.json,
        title="mrissl.masking: mask generation + application (ratios ours/baseline)",
    )


if __name__ == "__main__":
    main()

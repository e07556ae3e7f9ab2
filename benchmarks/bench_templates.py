"""``ModalityTemplates.fill`` against a per-sample loop with boolean indexing.

The baseline is the released BrainMVP approach: for each case, slice its modality's template
at the crop offset and copy the masked voxels with boolean indexing (``out[b][m] = crop[m]``).
Ours gathers the crop windows of the whole batch at once and writes with one ``torch.where``.
Both fill B = 8 single-modality 96³ crops (87.5 % of 8³ blocks masked) from 8 templates of
160 × 192 × 160; the outputs are checked to be equal before anything is timed. A second case
times forward + backward (the template gradient). The script also prints the Adam state size
of the templates for our canvas and for the released 8 × 240 × 240 × 155.

Run from the repository root::

    python benchmarks/bench_templates.py                 # the sizes above
    python benchmarks/bench_templates.py --quick         # 32³ crops, small canvas, 1 repeat (CI)

Target: ours at least 5x faster than the baseline on the CPU (time ratio <= 0.2).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from _harness import Case, compare, make_parser, parse_args
from mrissl.masking import BlockMask, mask_to_voxels
from mrissl.templates import ModalityTemplates

MODS = ["t1", "t1ce", "t2", "flair", "pd", "dwi", "adc", "mra"]


def baseline_fill(weight, volume, mask, ids, offsets):
    """The released approach: one case at a time, boolean indexing."""
    out = volume.clone()
    d, h, w = volume.shape[2:]
    for b in range(volume.shape[0]):
        o0, o1, o2 = (int(v) for v in offsets[b])
        crop = weight[int(ids[b])][o0 : o0 + d, o1 : o1 + h, o2 : o2 + w]
        m = mask[b, 0]
        out[b, 0][m] = crop[m]
    return out


def adam_state_mib(shape: tuple[int, ...]) -> float:
    n = 1
    for s in shape:
        n *= s
    return 2 * n * 4 / 2**20  # exp_avg and exp_avg_sq, float32


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    canvas, crop, batch = ((48, 56, 48), 32, 8) if quick else ((160, 192, 160), 96, 8)
    g = torch.Generator().manual_seed(0)
    templates = ModalityTemplates(MODS, shape=canvas, init=torch.randn(8, *canvas, generator=g))
    templates = templates.to(device)
    x = torch.rand(batch, 1, crop, crop, crop, generator=g).to(device)
    tokens = BlockMask(8, mask_ratio=0.875).sample(batch, 1, (crop // 8,) * 3, generator=g)
    mask = mask_to_voxels(tokens, 8, crop).to(device)
    ids = torch.randint(0, 8, (batch,), generator=g).to(device)
    hi = torch.tensor([c - crop for c in canvas])
    offsets = (torch.rand(batch, 3, generator=g) * (hi + 1)).long().to(device)
    weight = templates.weight

    def ours():
        with torch.no_grad():
            return templates.fill(x, mask, ids, offsets)

    def base():
        with torch.no_grad():
            return baseline_fill(weight, x, mask, ids, offsets)

    if not torch.equal(ours(), base()):
        raise RuntimeError("ours and the baseline disagree")

    def ours_bwd():
        templates.fill(x, mask, ids, offsets).sum().backward()
        weight.grad = None

    def base_bwd():
        baseline_fill(weight, x, mask, ids, offsets).sum().backward()
        weight.grad = None

    size = f"B={batch} {crop}³ from 8×{'×'.join(map(str, canvas))}"
    yield Case(f"fill fwd {crop}³", ours, base, size, target_time=0.2, target_memory=None)
    yield Case(
        f"fill fwd+bwd {crop}³", ours_bwd, base_bwd, size, target_time=1.0, target_memory=None
    )


def main() -> None:
    parser = make_parser(__doc__)
    args = parse_args(parser)
    compare(
        cases(args.quick, args.device),
        args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        json_path=args.json,
        title="ModalityTemplates.fill",
    )
    canvas = (48, 56, 48) if args.quick else (160, 192, 160)
    print(
        f"Adam state, ours 8×{'×'.join(map(str, canvas))}: "
        f"{adam_state_mib((8, *canvas)):.0f} MiB; released 8×240×240×155: "
        f"{adam_state_mib((8, 240, 240, 155)):.0f} MiB"
    )


if __name__ == "__main__":
    main()

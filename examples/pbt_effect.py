"""What PBT does: masked reconstruction with and without E-MIM's pyramid Barlow Twins term.

A small 3D ViT (timm ``VisionTransformer`` with ``PatchEmbed3d``) is trained twice from the
same initialisation, on the same batches and the same HMP masks:

(a) ``L = L_MIM``: the mean squared error over the masked voxels (the library's default);
(b) ``L = L_MIM + L_PBT``: the same, plus ``PyramidBarlowTwinsLoss(pyramid_levels(depth, 4))``
    with its defaults (each level's eq. 8 divided by the entries of its matrix).

Every ``--eval-every`` steps, on a fixed held-out set of volumes, it records the effective rank
and RankMe of the encoder's last-block token features of the unmasked volumes, and the held-out
reconstruction loss under fixed masks next to two collapse floors: the Monte Carlo Var(x_m) of
the training set (``collapsed_loss_floor``) and the held-out loss of the training set's mean
image (what a completely collapsed model scores there). At the end it keeps the singular-value
spectrum of each run. Everything is repeated for ``--seeds`` seeds; the summary gives the mean
and the spread (min … max) over seeds.

Data: the built-in phantom (``PhantomDataset``), or ``--data FOLDER`` of NIfTI cases
(``find_cases`` by modality suffix, ``preprocessing`` with a centre crop of ``--crop``, then
resampled to the training size).

Run ``python examples/pbt_effect.py`` (3 seeds × 200 steps, a few minutes on 2 CPU cores) or
``--quick`` (under a minute). ``--out DIR`` writes ``pbt_effect.json`` and ``pbt_effect.png``;
the figure of the documentation page "What PBT does" comes from
``python examples/pbt_effect.py --out docs/img``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mrissl.data import PhantomDataset
from mrissl.diagnostics import collapsed_loss_floor, effective_rank, rankme, singular_values
from mrissl.losses import PyramidBarlowTwinsLoss, masked_reconstruction_loss
from mrissl.masking import HybridMaskPattern, apply_mask
from mrissl.nn import PatchEmbed3d, capture_intermediates, pyramid_levels, unpatchify

ARMS = ("mim", "mim+pbt")
MODALITIES = ("t1", "t1ce", "t2", "flair")


def load_volumes(args: argparse.Namespace, n: int, seed: int) -> torch.Tensor:
    """``(n, C, S, S, S)`` volumes in [0, 1]: phantoms, or NIfTI cases resampled to ``S``."""
    if args.data is None:
        data = PhantomDataset(n, shape=args.size, modalities=MODALITIES, generator=seed)
        return torch.stack([data[i] for i in range(n)])
    from mrissl.data import find_cases, preprocessing

    cases = list(find_cases(args.data, MODALITIES, incomplete="ignore").cases)
    if len(cases) < 4:
        raise SystemExit(f"--data {args.data}: need at least 4 complete cases, got {len(cases)}")
    pipeline = preprocessing(load=True, crop="center", roi_size=args.crop)
    volumes = []
    for case in cases[: args.max_cases]:
        image = torch.as_tensor(pipeline({"image": dict(case.paths)})["image"]).float()
        volumes.append(F.interpolate(image[None], size=(args.size,) * 3, mode="area")[0])
    return torch.stack(volumes)


def make_encoder(args: argparse.Namespace) -> VisionTransformer:
    """A small timm ViT on 3D patches (``PatchEmbed3d``)."""
    return VisionTransformer(
        img_size=args.size,
        patch_size=args.patch,
        in_chans=len(MODALITIES),
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    )


@torch.no_grad()
def evaluate(
    encoder: VisionTransformer,
    head: nn.Module,
    held_out: torch.Tensor,
    held_out_mask: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[dict[str, float], torch.Tensor]:
    """Ranks of the held-out token features and the held-out reconstruction loss."""
    encoder.eval()
    last = [args.depth]
    with capture_intermediates(encoder, last) as full:
        encoder.forward_features(held_out)
    tokens = full[-1].flatten(0, 1).double()  # (H·N, E)
    x_m = apply_mask(held_out, held_out_mask, args.patch)
    with capture_intermediates(encoder, last) as masked:
        encoder.forward_features(x_m)
    pred = unpatchify(head(masked[-1]), args.patch, args.size)
    loss = masked_reconstruction_loss(pred, held_out, held_out_mask, patch_size=args.patch)
    encoder.train()
    values = {
        "erank": float(effective_rank(tokens)),
        "rankme": float(rankme(tokens)),
        "loss": float(loss),
    }
    return values, singular_values(tokens)


def run(
    arm: str,
    seed: int,
    train: torch.Tensor,
    held_out: torch.Tensor,
    held_out_mask: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train one arm from seed ``seed``; return its curves and final spectrum."""
    torch.manual_seed(seed)  # the same initialisation in both arms
    encoder = make_encoder(args)
    head = nn.Linear(args.dim, len(MODALITIES) * args.patch**3)  # E-MIM's g
    levels = pyramid_levels(args.depth, 4)
    pbt = PyramidBarlowTwinsLoss(levels)  # the defaults: reduction="mean", weights 1
    hmp = HybridMaskPattern()
    params = [*encoder.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    batches = torch.Generator().manual_seed(seed)  # the same batches and masks in both arms
    masks = torch.Generator().manual_seed(seed + 1)
    curve: dict[str, list[float]] = {"step": [], "erank": [], "rankme": [], "loss": []}
    train_mim, train_pbt = [], []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            values, spectrum = evaluate(encoder, head, held_out, held_out_mask, args)
            curve["step"].append(step)
            for key, value in values.items():
                curve[key].append(value)
        if step == args.steps:
            break
        x = train[torch.randint(len(train), (args.batch,), generator=batches)]
        mask = hmp(x, args.patch, generator=masks)
        x_m = apply_mask(x, mask, args.patch)
        with capture_intermediates(encoder, levels) as masked:
            encoder.forward_features(x_m)
        pred = unpatchify(head(masked[-1]), args.patch, args.size)
        l_mim = masked_reconstruction_loss(pred, x, mask, patch_size=args.patch)
        loss = l_mim
        if arm == "mim+pbt":
            with capture_intermediates(encoder, levels) as full:
                encoder.forward_features(x)
            l_pbt = pbt(full, masked)
            loss = loss + l_pbt  # E-MIM eq. 10, both terms on a per-entry scale
            train_pbt.append(float(l_pbt.detach()))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        train_mim.append(float(l_mim.detach()))
    return {
        "curve": curve,
        "train_mim_first": train_mim[0],
        "train_pbt_first": train_pbt[0] if train_pbt else None,
        "spectrum": spectrum.tolist(),
    }


def spread(values: list[float]) -> str:
    """``mean [min, max]`` of the values over seeds."""
    t = torch.tensor(values, dtype=torch.float64)
    return f"{t.mean():.3f} [{t.min():.3f}, {t.max():.3f}]"


def plot(results: dict[str, Any], floors: dict[str, float], path: Path) -> None:
    """Effective rank, held-out loss with the floors, and the final spectra, over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = {"mim": "tab:blue", "mim+pbt": "tab:red"}
    for arm in ARMS:
        runs = results["runs"][arm]
        steps = runs[0]["curve"]["step"]
        for panel, key in ((0, "erank"), (1, "loss")):
            curves = torch.tensor([r["curve"][key] for r in runs])
            axes[panel].plot(steps, curves.mean(0), color=colours[arm], label=arm)
            axes[panel].fill_between(
                steps, curves.amin(0), curves.amax(0), color=colours[arm], alpha=0.2
            )
        for i, r in enumerate(runs):
            s = torch.tensor(r["spectrum"])
            axes[2].semilogy(s / s[0], color=colours[arm], alpha=0.7, label=arm if i == 0 else None)
    axes[1].axhline(floors["train_floor"], color="k", ls="--", lw=1, label="Var(x_m), train")
    axes[1].axhline(floors["held_out_mean_image"], color="k", ls=":", lw=1, label="mean image")
    axes[0].set(xlabel="step", ylabel="effective rank", title="held-out token features")
    axes[1].set(xlabel="step", ylabel="MSE over masked voxels", title="held-out reconstruction")
    axes[1].set_yscale("log")
    axes[2].set(xlabel="index", ylabel="σ_k / σ_1", title="spectrum at the end")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Train both arms for every seed and report the ranks and losses over seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, under a minute")
    parser.add_argument("--data", type=Path, default=None, help="a folder of NIfTI cases")
    parser.add_argument("--crop", type=int, default=128, help="centre crop of NIfTI cases")
    parser.add_argument("--max-cases", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cases", type=int, default=40, help="volumes, 8 of them held out")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON and PNG here")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.dim, args.cases = 2, 20, 10, 32, 16
    # a model this small gains nothing from intra-op threads, and on a busy machine idle
    # threads spin: one thread was 25 times cheaper in CPU time per step than two
    torch.set_num_threads(args.threads)
    start = time.time()

    volumes = load_volumes(args, args.cases, seed=1234)
    held_out, train = volumes[:8], volumes[8:]
    hmp = HybridMaskPattern()
    held_out_mask = hmp(held_out, args.patch, generator=torch.Generator().manual_seed(99))
    floor = collapsed_loss_floor(
        train, hmp, patch_size=args.patch, num_draws=8, generator=torch.Generator().manual_seed(7)
    )
    mean_image = train.mean(dim=0, keepdim=True).expand_as(held_out)
    collapsed = masked_reconstruction_loss(
        mean_image, held_out, held_out_mask, patch_size=args.patch
    )
    floors = {
        "train_floor": floor.floor,
        "train_floor_std_error": floor.std_error,
        "held_out_mean_image": float(collapsed),
    }
    N = (args.size // args.patch) ** 3
    print(
        f"{len(train)} training and {len(held_out)} held-out volumes {args.size}³ × "
        f"{len(MODALITIES)}, patch {args.patch} ({N} tokens), ViT dim {args.dim} depth "
        f"{args.depth}; HMP masks {floor.masked_fraction:.0%}"
    )
    print(
        f"collapse floor Var(x_m) (train) {floor.floor:.5f} ± {floor.std_error:.5f}; "
        f"held-out loss of the training mean image {float(collapsed):.5f}"
    )

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    results["floors"] = floors
    results["runs"] = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        for arm in ARMS:
            results["runs"][arm].append(run(arm, seed, train, held_out, held_out_mask, args))
        print(f"seed {seed} done ({time.time() - start:.0f} s)")

    first = results["runs"]["mim+pbt"]
    print(
        "at step 0: L_MIM "
        + spread([r["train_mim_first"] for r in first])
        + ", L_PBT "
        + spread([r["train_pbt_first"] for r in first])
    )
    print("\nmean [min, max] over seeds, held-out set")
    print(
        f"{'step':>5}  {'erank mim':>22}  {'erank mim+pbt':>22}  {'loss mim':>22}  "
        f"{'loss mim+pbt':>22}"
    )
    steps = results["runs"]["mim"][0]["curve"]["step"]
    for i, step in enumerate(steps):
        cells = [
            spread([r["curve"][key][i] for r in results["runs"][arm]])
            for key in ("erank", "loss")
            for arm in ARMS
        ]
        print(
            f"{step:>5}  "
            + "  ".join(c.rjust(22) for c in (cells[0], cells[1], cells[2], cells[3]))
        )
    summary = {}
    for arm in ARMS:
        runs = results["runs"][arm]
        summary[arm] = {
            key: spread([r["curve"][key][-1] for r in runs]) for key in ("erank", "rankme", "loss")
        }
        print(
            f"end, {arm:>8}: effective rank {summary[arm]['erank']}, RankMe "
            f"{summary[arm]['rankme']}, held-out loss {summary[arm]['loss']}"
        )
    results["summary"] = summary
    print(f"total {time.time() - start:.0f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pbt_effect.json").write_text(json.dumps(results, indent=1))
        plot(results, floors, args.out / "pbt_effect.png")
        print(f"wrote {args.out / 'pbt_effect.json'} and {args.out / 'pbt_effect.png'}")


if __name__ == "__main__":
    main()

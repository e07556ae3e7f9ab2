"""MkDocs hook: draw the mask montages of docs/masking.md at build time.

Registered in mkdocs.yml under ``hooks:``. On every build it makes a batch of smooth random
4-modality volumes (a fixed seed, 96³, head-shaped), draws each generator's mask on it with
[`mrissl.masking.plot_masks`][mrissl.masking.plot_masks] and adds the PNGs under
``img/masking/`` as generated files: nothing is written to the source tree and no binary file
is kept in git. Needs matplotlib (the ``plot`` extra).

Run it directly to write the pictures to a folder for a look:
``python docs/_hooks/masking_figures.py /tmp/masking``.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FIGURES", "figure_png", "on_files"]

SIZE, PATCH, BLOCK = 96, 16, 8
MODALITIES = ("T1", "T1ce", "T2", "FLAIR")


def smooth_volumes(seed: int = 0) -> torch.Tensor:
    """``(1, 4, 96, 96, 96)`` smooth random fields in [0, 1] inside an ellipsoid "head"."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, len(MODALITIES), SIZE, SIZE, SIZE, generator=g)
    for _ in range(3):
        x = F.avg_pool3d(x, 9, stride=1, padding=4, count_include_pad=False)
    lo = x.amin(dim=(2, 3, 4), keepdim=True)
    hi = x.amax(dim=(2, 3, 4), keepdim=True)
    x = (x - lo) / (hi - lo)
    axis = torch.linspace(-1, 1, SIZE)
    z, y, w = torch.meshgrid(axis, axis, axis, indexing="ij")
    head = (z / 0.8) ** 2 + (y / 0.9) ** 2 + (w / 0.75) ** 2 <= 1
    return x * head


def _hmp(x: torch.Tensor, g: torch.Generator, **steps: Any) -> tuple[torch.Tensor, Any]:
    from mrissl.masking import HybridMaskPattern

    return x, HybridMaskPattern(**steps)(x, PATCH, generator=g)


def _figures() -> dict[str, Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, Any]]]:
    from mrissl.masking import BlockMask, RandomTokenMask, cross_modal_fill

    def random(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        return x, RandomTokenMask(0.75)(x, PATCH, generator=g)

    def block(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        return x, BlockMask(BLOCK)(x, generator=g)

    def cubes(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        return x, BlockMask(BLOCK).sample_cubes(1, x.shape[1], SIZE, generator=g)

    def cross(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Any]:
        mask = BlockMask(BLOCK, mask_ratio=0.5)(x, generator=g)
        filled, _ = cross_modal_fill(x, mask, BLOCK, generator=g)
        return filled, mask

    return {
        "random": random,
        "modal": lambda x, g: _hmp(x, g, position=None, patch=None),
        "position": lambda x, g: _hmp(x, g, modal=None, patch=None),
        "patch": lambda x, g: _hmp(x, g, modal=None, position=None),
        "hmp": lambda x, g: _hmp(x, g),
        "block": block,
        "cubes": cubes,
        "cross_modal": cross,
    }


FIGURES = ("random", "modal", "position", "patch", "hmp", "block", "cubes", "cross_modal")


def figure_png(name: str, x: torch.Tensor | None = None) -> bytes:
    """The PNG montage of one figure (see ``FIGURES``)."""
    from mrissl.masking import plot_masks

    x = smooth_volumes() if x is None else x
    g = torch.Generator().manual_seed(1)
    shown, mask = _figures()[name](x, g)
    patch = BLOCK if name in ("block", "cross_modal") else PATCH
    fig = plot_masks(
        shown,
        mask,
        None if mask.ndim == 5 else patch,
        modality_names=list(MODALITIES),
        alpha=0.25 if name == "cross_modal" else 0.45,
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def on_files(files: Any, config: Any) -> Any:
    """Add the generated ``img/masking/<name>.png`` files to the site."""
    from mkdocs.structure.files import File

    x = smooth_volumes()
    for name in FIGURES:
        files.append(File.generated(config, f"img/masking/{name}.png", content=figure_png(name, x)))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "masking-figures")
    out.mkdir(parents=True, exist_ok=True)
    volumes = smooth_volumes()
    for fig_name in FIGURES:
        (out / f"{fig_name}.png").write_bytes(figure_png(fig_name, volumes))

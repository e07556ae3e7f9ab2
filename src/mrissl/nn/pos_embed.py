"""Fixed 3D sine-cosine position embedding.

The 2D embedding of MAE (He et al. 2022) extended to three axes: the embedding dimension is
split into three equal parts for depth, height and width, and each part holds
``sin(pos·ω_k)`` then ``cos(pos·ω_k)`` for the frequencies ``ω_k = temperature^(-k/F)``,
``k = 0 … F-1``, ``F = dim / 6``.

Positions are token indices by default. Given the voxel spacing, positions are the physical
coordinates of the token centres in millimetres, so a grid of 1 × 1 × 3 mm voxels is encoded
as the anisotropic grid it is, and two scans of different resolution that cover the same
anatomy get comparable embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mrissl._checks import to_triple

__all__ = ["sincos_pos_embed_3d"]


def sincos_pos_embed_3d(
    grid: int | Sequence[int],
    dim: int,
    spacing: float | Sequence[float] | None = None,
    *,
    patch_size: int | Sequence[int] = 1,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build a fixed sine-cosine position embedding for a 3D token grid.

    Args:
        grid: token grid ``(gd, gh, gw)``, or one int for a cubic grid.
        dim: embedding dimension ``E``; must be a multiple of 6 (an even number of channels
            for each of the three axes).
        spacing: voxel spacing ``(sd, sh, sw)`` in millimetres, or one number. ``None`` uses
            token indices as positions. When given, the position of token ``i`` along an axis is
            ``i · patch_size · spacing`` mm.
        patch_size: patch size in voxels ``(p0, p1, p2)``, used with ``spacing`` to find the
            distance between token centres.
        temperature: the base of the frequency ladder (10000 as in Transformer and MAE).
        device: device of the returned tensor.
        dtype: dtype of the returned tensor. The angles are computed in float64 and cast at the
            end, so a ``bfloat16`` table equals the float32 one rounded.

    Returns:
        ``(N, E)`` with ``N = gd·gh·gw`` rows in raster order (depth slowest). Add it to
        ``(B, N, E)`` tokens; for per-modality tokens ``(B, C·N, E)`` use ``.repeat(C, 1)``.

    Raises:
        ValueError: if ``dim`` is not a positive multiple of 6, or a grid size, spacing or
            temperature is not positive.

    Examples:
        >>> pe = sincos_pos_embed_3d((6, 6, 6), 768)
        >>> pe.shape
        torch.Size([216, 768])
        >>> aniso = sincos_pos_embed_3d((6, 8, 8), 96, spacing=(3.0, 1.0, 1.0), patch_size=16)
        >>> aniso.shape
        torch.Size([384, 96])
    """
    gd, gh, gw = to_triple(grid, "grid")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if dim <= 0 or dim % 6:
        lower, upper = 6 * (dim // 6), 6 * (dim // 6 + 1)
        hint = f"; the nearest valid sizes are {lower} and {upper}" if lower > 0 else ""
        raise ValueError(
            f"dim must be a positive multiple of 6 to split evenly into a sine and a cosine "
            f"half for each of 3 axes, got {dim}{hint}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    patch = to_triple(patch_size, "patch_size")
    if spacing is None:
        step = (1.0, 1.0, 1.0)
    else:
        sp = _spacing_triple(spacing)
        step = (sp[0] * patch[0], sp[1] * patch[1], sp[2] * patch[2])

    f64 = torch.float64
    n_freq = dim // 6
    omega = temperature ** (-torch.arange(n_freq, dtype=f64, device=device) / n_freq)
    coords = torch.meshgrid(
        torch.arange(gd, dtype=f64, device=device) * step[0],
        torch.arange(gh, dtype=f64, device=device) * step[1],
        torch.arange(gw, dtype=f64, device=device) * step[2],
        indexing="ij",
    )
    parts = []
    for pos in coords:  # three axes, not a per-sample loop
        angle = pos.reshape(-1, 1) * omega  # (N, F)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).to(dtype)


def _spacing_triple(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        values: tuple[float, ...] = (float(spacing),) * 3
    elif isinstance(spacing, Sequence) and len(spacing) == 3:
        values = tuple(float(s) for s in spacing)
    else:
        raise ValueError(
            f"spacing must be a positive number or 3 positive numbers, got {spacing!r}"
        )
    if not all(v > 0 and v < float("inf") for v in values):
        raise ValueError(f"spacing must be positive and finite (millimetres), got {spacing!r}")
    return values[0], values[1], values[2]

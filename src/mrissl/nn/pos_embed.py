"""3D position embeddings: a fixed sine-cosine table, and resampling a learned one.

The 2D embedding of MAE (He et al. 2022) extended to three axes: the embedding dimension is
split into three equal parts for depth, height and width, and each part holds
``sin(pos·ω_k)`` then ``cos(pos·ω_k)`` for the frequencies ``ω_k = temperature^(-k/F)``,
``k = 0 … F-1``, ``F = dim / 6``.

Positions are token indices, or, given the voxel spacing, the token centres in millimetres
([Physical spacing][physical-spacing]).

[`resample_pos_embed_3d`][mrissl.nn.resample_pos_embed_3d] is the 3D counterpart of timm's
``resample_abs_pos_embed``: it interpolates a learned ``(1, P + N, E)`` position embedding from
one token grid to another (trilinear by default), keeping the ``P`` prefix tokens (class,
register) as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mrissl._checks import check_bool, check_choice, check_number, to_triple

__all__ = ["resample_pos_embed_3d", "sincos_pos_embed_3d"]


def sincos_pos_embed_3d(
    grid: int | Sequence[int],
    dim: int,
    *,
    spacing: float | Sequence[float] | None = None,
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
    check_number(dim, "dim", integer=True)
    if dim <= 0 or dim % 6:
        lower, upper = 6 * (dim // 6), 6 * (dim // 6 + 1)
        hint = f"; the nearest valid sizes are {lower} and {upper}" if lower > 0 else ""
        raise ValueError(
            f"dim must be a positive multiple of 6 to split evenly into a sine and a cosine "
            f"half for each of 3 axes, got {dim}{hint}"
        )
    check_number(temperature, "temperature", low=0, low_open=True)
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
    if isinstance(spacing, Sequence):
        if len(spacing) != 3:
            raise ValueError(
                f"spacing must be a positive number or 3 positive numbers (millimetres), got "
                f"{spacing!r}"
            )
        items: Sequence[object] = spacing
    else:
        items = (spacing, spacing, spacing)
    sd, sh, sw = (check_number(s, "spacing", low=0, low_open=True) for s in items)
    return sd, sh, sw


def resample_pos_embed_3d(
    pos_embed: torch.Tensor,
    new_grid: int | Sequence[int],
    old_grid: int | Sequence[int],
    *,
    num_prefix_tokens: int = 1,
    num_groups: int = 1,
    mode: str = "trilinear",
    align_corners: bool = False,
) -> torch.Tensor:
    """Interpolate a learned position embedding from one 3D token grid to another.

    The grid tokens of ``pos_embed`` are taken as ``num_groups`` raster-order grids of
    ``old_grid`` (one per modality for per-modality tokens, modality-major), each resampled
    to ``new_grid`` with ``torch.nn.functional.interpolate``; the prefix tokens are kept. The
    interpolation runs in float32 (or float64 for a float64 table) and the result has the
    dtype of ``pos_embed``. Gradients flow to ``pos_embed``.

    Args:
        pos_embed: ``(1, P + G·N_old, E)``, or ``(P + G·N_old, E)``.
        new_grid: the token grid ``(gd, gh, gw)`` to resample to, or one int.
        old_grid: the token grid ``pos_embed`` was built for, or one int.
        num_prefix_tokens: ``P``, the tokens before the grid (class and register tokens).
        num_groups: ``G``, the number of grids stored one after the other.
        mode: ``"trilinear"`` (default) or ``"nearest"``, ``"nearest-exact"``, ``"area"``.
        align_corners: as in ``interpolate``, for ``"trilinear"``.

    Returns:
        ``(1, P + G·N_new, E)`` (or ``(P + G·N_new, E)`` for a 2D input); ``pos_embed``
        itself when the grids are equal.

    Raises:
        ValueError: if the token count does not match ``old_grid``, ``num_prefix_tokens`` and
            ``num_groups``, or ``mode`` is unknown.

    Examples:
        >>> pe = torch.randn(1, 1 + 4 * 6 * 8, 48)  # a class token and a 4×6×8 grid
        >>> resample_pos_embed_3d(pe, (2, 6, 10), (4, 6, 8)).shape
        torch.Size([1, 121, 48])
        >>> resample_pos_embed_3d(pe, (4, 6, 8), (4, 6, 8)) is pe
        True
    """
    new = to_triple(new_grid, "new_grid")
    old = to_triple(old_grid, "old_grid")
    check_choice(mode, "mode", ("trilinear", "nearest", "nearest-exact", "area"))
    check_number(num_prefix_tokens, "num_prefix_tokens", low=0, integer=True)
    check_number(num_groups, "num_groups", low=1, integer=True)
    check_bool(align_corners, "align_corners")
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.ndim not in (2, 3):
        raise ValueError(
            f"pos_embed must be a (1, P + G·N, E) or (P + G·N, E) tensor, got "
            f"{getattr(pos_embed, 'shape', type(pos_embed))}"
        )
    table = pos_embed if pos_embed.ndim == 3 else pos_embed[None]
    n_old = old[0] * old[1] * old[2]
    expected = num_prefix_tokens + num_groups * n_old
    if table.shape[0] != 1 or table.shape[1] != expected:
        raise ValueError(
            f"pos_embed must hold num_prefix_tokens + num_groups · prod(old_grid) = "
            f"{num_prefix_tokens} + {num_groups}·{n_old} = {expected} tokens, got shape "
            f"{tuple(pos_embed.shape)}"
        )
    if new == old:
        return pos_embed
    E = table.shape[-1]
    prefix, grid_tokens = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    work = torch.float64 if table.dtype == torch.float64 else torch.float32
    # (1, G·N, E) -> (G, E, gd, gh, gw): one "batch" entry per group
    grids = grid_tokens.to(work).reshape(num_groups, *old, E).permute(0, 4, 1, 2, 3)
    corners = align_corners if mode == "trilinear" else None
    resized = F.interpolate(grids, size=new, mode=mode, align_corners=corners)
    flat = resized.permute(0, 2, 3, 4, 1).reshape(1, -1, E).to(table.dtype)
    out = torch.cat([prefix, flat], dim=1)
    return out if pos_embed.ndim == 3 else out[0]

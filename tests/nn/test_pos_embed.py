from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mrissl.nn import sincos_pos_embed_3d


def _reference(grid, dim, step=(1.0, 1.0, 1.0), temperature=10000.0):
    """Loop over tokens in raster order; per axis F sines then F cosines."""
    F = dim // 6
    rows = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                row = []
                for pos in (i * step[0], j * step[1], k * step[2]):
                    freqs = [temperature ** (-f / F) for f in range(F)]
                    row += [math.sin(pos * w) for w in freqs]
                    row += [math.cos(pos * w) for w in freqs]
                rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize(("grid", "dim"), [((2, 3, 4), 12), ((6, 6, 6), 96), ((1, 5, 2), 6)])
def test_matches_numpy_reference(grid, dim):
    got = sincos_pos_embed_3d(grid, dim, dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), _reference(grid, dim), rtol=0, atol=1e-12)


def test_spacing_places_tokens_in_millimetres():
    got = sincos_pos_embed_3d(
        (3, 2, 2), 24, spacing=(3.0, 1.0, 0.5), patch_size=(2, 4, 8), dtype=torch.float64
    )
    expected = _reference((3, 2, 2), 24, step=(6.0, 4.0, 4.0))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_anisotropic_spacing_tells_axes_apart():
    # the same grid with thicker slices must encode depth differently, the in-plane axes alike
    iso = sincos_pos_embed_3d((4, 4, 4), 48, spacing=1.0)
    aniso = sincos_pos_embed_3d((4, 4, 4), 48, spacing=(3.0, 1.0, 1.0))
    assert not torch.allclose(iso[:, :16], aniso[:, :16])
    torch.testing.assert_close(iso[:, 16:], aniso[:, 16:])


def test_rows_are_distinct_and_bounded():
    pe = sincos_pos_embed_3d((6, 6, 6), 768)
    assert pe.shape == (216, 768)
    assert pe.abs().max() <= 1.0
    assert torch.cdist(pe, pe).add(torch.eye(216) * 10).min() > 0.1


def test_device_and_dtype(device):
    pe = sincos_pos_embed_3d(4, 12, device=device, dtype=torch.bfloat16)
    assert pe.device.type == device.type
    assert pe.dtype == torch.bfloat16
    ref = sincos_pos_embed_3d(4, 12, dtype=torch.float64).to(torch.bfloat16)
    assert torch.equal(pe.cpu(), ref)


@pytest.mark.parametrize("dim", [0, 8, 100, 766])
def test_dim_not_splittable_across_three_axes_is_an_error(dim):
    with pytest.raises(ValueError, match="multiple of 6"):
        sincos_pos_embed_3d((2, 2, 2), dim)


def test_bad_spacing_and_grid_are_errors():
    with pytest.raises(ValueError, match="spacing"):
        sincos_pos_embed_3d(2, 12, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        sincos_pos_embed_3d(2, 12, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="grid"):
        sincos_pos_embed_3d((2, -1, 2), 12)
    with pytest.raises(TypeError, match="dim"):
        sincos_pos_embed_3d(2, 12.0)  # type: ignore[arg-type]

"""BlockMask: BrainMVP's exact-count block masking and the paper's random-cube variant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.masking import BlockMask
from mrissl.masking.block import _first_cover


def test_released_code_count_at_96_cubed():
    # 96³ crop, r = 8: 1728 blocks, 1512 masked (REFERENCES.md)
    mask = BlockMask()(torch.zeros(2, 4, 96, 96, 96), generator=torch.Generator().manual_seed(0))
    assert mask.shape == (2, 4, 1728)
    assert (mask.sum(dim=2) == 1512).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 200), st.floats(0, 0.99))
def test_block_mask_masks_exactly_floor_n_ratio_per_modality(B, C, N, ratio):
    mask = BlockMask(8, mask_ratio=ratio).sample(B, C, N)
    assert (mask.sum(dim=2) == math.floor(N * ratio + 1e-9)).all()


def test_modalities_draw_their_own_blocks_unless_shared():
    own = BlockMask(4, mask_ratio=0.5).sample(4, 3, 64)
    assert not (own == own[:, :1]).all()
    shared = BlockMask(4, mask_ratio=0.5, shared_across_modalities=True).sample(4, 3, 64)
    assert (shared == shared[:, :1]).all()


def test_patch_size_defaults_to_the_block_size():
    x = torch.zeros(1, 2, 32, 16, 8)
    assert BlockMask((8, 4, 4))(x).shape == (1, 2, 4 * 4 * 2)
    assert BlockMask(8)(x, (16, 16, 8)).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        BlockMask(6)(x)


def reference_first_cover(centres, size, r):
    """Paint cubes one by one: the index of the first cube covering each voxel (inf: none)."""
    D, H, W = size
    out = np.full((D, H, W), np.inf)
    for t, flat in enumerate(centres):
        z, y, x = np.unravel_index(flat, (D, H, W))
        lo = [c - r // 2 for c in (z, y, x)]
        sl = tuple(slice(max(a, 0), max(a + r, 0)) for a in lo)
        region = out[sl]
        region[np.isinf(region)] = t
    return out


@pytest.mark.parametrize(("size", "r"), [((12, 10, 9), 4), ((8, 8, 8), 3), ((6, 7, 5), 2)])
def test_first_cover_equals_painting_cubes_in_order(size, r):
    g = torch.Generator().manual_seed(1)
    num = 40
    got = _first_cover(2, size, (r, r, r), num, g, torch.device("cpu"))
    centres = torch.randint(
        size[0] * size[1] * size[2], (2, num), generator=torch.Generator().manual_seed(1)
    )
    for row in range(2):
        ref = reference_first_cover(centres[row].tolist(), size, r)
        assert np.array_equal(got[row].numpy(), ref)


def test_cubes_stop_at_the_first_cube_reaching_the_ratio():
    gen = BlockMask(4, mask_ratio=0.6)
    mask = gen.sample_cubes(3, 2, 24, generator=torch.Generator().manual_seed(0))
    covered = mask.flatten(2).sum(dim=2)
    target = math.ceil(0.6 * 24**3)
    assert (covered >= target).all()
    assert (covered < target + 4**3).all()  # one cube more than needed at most


def test_counted_cubes_cover_about_one_minus_exp_minus_ratio():
    # the literal pseudo-code: ceil(p* · V / r³) cubes, overlaps counted twice
    mask = BlockMask(4, mask_ratio=0.875).sample_cubes(
        4, 2, 32, until="counted", generator=torch.Generator().manual_seed(0)
    )
    covered = mask.float().mean().item()
    assert covered == pytest.approx(1 - math.exp(-0.875), abs=0.04)


def test_cubes_mask_missing_modalities_and_are_seeded():
    gen = BlockMask(4, mask_ratio=0.5)
    available = torch.tensor([[True, False]])
    a = gen.sample_cubes(1, 2, 16, available=available, generator=torch.Generator().manual_seed(5))
    b = gen.sample_cubes(1, 2, 16, available=available, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a[0, 1].all()
    with pytest.raises(ValueError, match="until"):
        gen.sample_cubes(1, 2, 16, until="forever")


def test_cubes_on_device(device):
    mask = BlockMask(4, mask_ratio=0.5).sample_cubes(2, 2, 16, device=device)
    assert mask.device.type == device.type
    assert (mask.flatten(2).float().mean(dim=2) >= 0.5).all()

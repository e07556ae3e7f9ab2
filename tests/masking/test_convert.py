"""mask_to_voxels, voxels_to_mask and keep_indices (mrissl.masking.convert)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.masking import HybridMaskPattern, keep_indices, mask_to_voxels, voxels_to_mask
from mrissl.nn import gather_tokens, scatter_tokens


def reference_voxels(mask, patch, size):
    """Loop over every voxel: its token is (z // p0, y // p1, x // p2) in raster order."""
    B, C, _ = mask.shape
    D, H, W = size
    gh, gw = H // patch[1], W // patch[2]
    out = np.zeros((B, C, D, H, W), dtype=bool)
    for z in range(D):
        for y in range(H):
            for x in range(W):
                n = (z // patch[0]) * gh * gw + (y // patch[1]) * gw + x // patch[2]
                out[:, :, z, y, x] = mask[:, :, n]
    return out


def test_mask_to_voxels_matches_a_voxel_loop():
    patch, size = (2, 3, 4), (4, 6, 8)
    mask = torch.rand(2, 3, 8) < 0.5
    got = mask_to_voxels(mask, patch, size)
    assert np.array_equal(got.numpy(), reference_voxels(mask.numpy(), patch, size))


def test_per_position_mask_gives_one_voxel_channel():
    mask = torch.tensor([[True, False]])
    assert mask_to_voxels(mask, 2, (2, 2, 4)).shape == (1, 1, 2, 2, 4)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from(["any", "all", "majority"]))
def test_voxels_to_mask_inverts_mask_to_voxels(B, C, rule):
    mask = torch.rand(B, C, 2 * 3 * 1) < 0.5
    voxels = mask_to_voxels(mask, (2, 2, 4), (4, 6, 4))
    assert torch.equal(voxels_to_mask(voxels, (2, 2, 4), rule=rule), mask)


def test_voxels_to_mask_rules():
    vox = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    vox[0, 0, 0] = True  # 4 of 8 voxels
    assert voxels_to_mask(vox, 2).item()
    assert not voxels_to_mask(vox, 2, rule="all").item()
    assert not voxels_to_mask(vox, 2, rule="majority").item()
    vox[0, 0, 1, 0, 0] = True  # 5 of 8
    assert voxels_to_mask(vox, 2, rule="majority").item()
    with pytest.raises(ValueError, match="rule"):
        voxels_to_mask(vox, 2, rule="most")


# --- keep_indices ---------------------------------------------------------------------------


def test_keep_indices_follow_the_per_modality_token_order():
    mask = HybridMaskPattern().sample(3, 4, 27, generator=torch.Generator().manual_seed(0))
    keep, restore, padding = keep_indices(mask)
    flat = mask.flatten(1)  # token c·N + n
    for b in range(3):
        assert keep[b].tolist() == [i for i in range(4 * 27) if not flat[b, i]]
    assert not padding.any()
    tokens = torch.randn(3, 4 * 27, 5)
    kept = gather_tokens(tokens, keep)
    assert not gather_tokens(flat[..., None], keep).any()
    # MAE's ids_restore: [kept, masked] gathered with restore is the original order
    masked_part = gather_tokens(tokens, torch.argsort(flat.to(torch.uint8), dim=1, stable=True))
    assert torch.equal(gather_tokens(masked_part, restore), tokens)
    full = scatter_tokens(kept, keep, 4 * 27, fill=0.0)
    assert torch.equal(full[~flat], tokens[~flat])


def test_keep_indices_refuses_ragged_counts_without_padding():
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="pad=True"):
        keep_indices(mask)
    keep, restore, padding = keep_indices(mask, pad=True)
    assert keep.tolist() == [[1, 2], [2, 0]]
    assert padding.tolist() == [[False, False], [False, True]]
    assert restore.tolist() == [[2, 0, 1], [1, 2, 0]]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.data())
def test_padded_keep_indices_hold_every_kept_token_once(B, L, data):
    rows = data.draw(
        st.lists(st.lists(st.booleans(), min_size=L, max_size=L), min_size=B, max_size=B)
    )
    mask = torch.tensor(rows, dtype=torch.bool)
    keep, restore, padding = keep_indices(mask, pad=True)
    for b in range(B):
        real = keep[b][~padding[b]].tolist()
        assert real == [i for i in range(L) if not rows[b][i]]
        assert all(rows[b][i] for i in keep[b][padding[b]].tolist())
    assert torch.equal(torch.argsort(restore, dim=1)[:, : keep.shape[1]], keep)

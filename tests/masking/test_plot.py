"""plot_masks: a PNG montage, one panel per modality."""

from __future__ import annotations

import pytest
import torch

from mrissl.masking import BlockMask, HybridMaskPattern, plot_masks

pytest.importorskip("matplotlib")


def test_montage_has_one_panel_per_modality_and_sample_and_writes_a_png(tmp_path):
    x = torch.rand(2, 3, 16, 16, 16)
    mask = HybridMaskPattern()(x, 8)
    path = tmp_path / "masks.png"
    fig = plot_masks(x, mask, 8, samples=[0, 1], path=str(path), title="HMP")
    assert len(fig.axes) == 6
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_montage_accepts_voxel_masks_and_single_cases():
    cubes = BlockMask(4, mask_ratio=0.5).sample_cubes(1, 2, 16)
    fig = plot_masks(torch.rand(2, 16, 16, 16), cubes[0], axis=2, slice_index=3)
    assert len(fig.axes) == 2


def test_montage_errors():
    x = torch.rand(1, 2, 16, 16, 16)
    mask = torch.zeros(1, 2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="patch_size"):
        plot_masks(x, mask)
    with pytest.raises(ValueError, match="axis"):
        plot_masks(x, mask, 8, axis=3)
    with pytest.raises(ValueError, match="slice_index"):
        plot_masks(x, mask, 8, slice_index=16)
    with pytest.raises(ValueError, match="modality_names"):
        plot_masks(x, mask, 8, modality_names=["T1"])

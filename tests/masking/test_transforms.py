"""MONAI dictionary transforms of mrissl.data.mask_transforms."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from mrissl.data.mask_transforms import RandBlockMaskd, RandHybridMaskd, RandMaskd, RandTokenMaskd
from mrissl.masking import HybridMaskPattern, apply_mask, mask_to_voxels


def test_hybrid_transform_writes_mask_and_masked_image_and_keeps_the_target():
    image = torch.rand(4, 16, 16, 16)
    t = RandHybridMaskd("image", patch_size=8, mask_key="hmp", fill=-1.0).set_random_state(0)
    out = t({"image": image})
    assert out["image"] is image  # the target is untouched
    mask = out["hmp"]
    assert mask.shape == (4, 8)
    assert mask.float().mean().item() == HybridMaskPattern().expected_mask_ratio(4, 8)
    ref = apply_mask(image[None], mask[None], 8, fill=-1.0)[0]
    assert torch.equal(out["image_masked"], ref)


def test_transforms_are_reproducible_with_monai_seeding():
    data = {"image": torch.rand(4, 16, 16, 16)}
    a = Compose([RandHybridMaskd("image", patch_size=8)]).set_random_state(3)(data)
    b = Compose([RandHybridMaskd("image", patch_size=8)]).set_random_state(3)(data)
    t = RandHybridMaskd("image", patch_size=8).set_random_state(3)
    first, second = t(data), t(data)
    assert torch.equal(a["mask"], b["mask"])
    assert not torch.equal(first["mask"], second["mask"])


def test_block_transform_fills_from_other_modalities_and_reports_the_source():
    image = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 16, 16, 16).clone()
    t = RandBlockMaskd("image", block_size=8, mask_ratio=0.5).set_random_state(0)
    out = t({"image": MetaTensor(image)})
    source, mask = out["mask_source"], out["mask"]
    vox = mask_to_voxels(mask[None], 8, 16)[0]
    for c in range(3):
        assert source[c] != c
        assert (out["image_masked"][c][vox[c]] == source[c]).all()
        assert (out["image_masked"][c][~vox[c]] == c).all()


def test_available_key_masks_missing_modalities_and_never_uses_them():
    data = {"image": torch.rand(3, 16, 16, 16), "present": torch.tensor([True, False, True])}
    out = RandBlockMaskd("image", block_size=8, available_key="present").set_random_state(0)(data)
    assert out["mask"][1].all()
    assert out["mask_source"].tolist()[1] == -1
    assert 1 not in out["mask_source"].tolist()


def test_token_transform_and_mask_only():
    t = RandTokenMaskd("image", patch_size=8, masked_postfix=None).set_random_state(0)
    out = t({"image": torch.rand(2, 16, 16, 16)})
    assert set(out) == {"image", "mask"}
    assert (out["mask"].sum(dim=1) == 6).all()


def test_transform_errors():
    with pytest.raises(TypeError, match="MaskGenerator"):
        RandMaskd("image", mask_generator="hmp")
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        RandHybridMaskd("image", patch_size=8)({"image": torch.rand(1, 4, 16, 16, 16)})

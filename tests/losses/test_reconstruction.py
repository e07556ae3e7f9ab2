from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange

from mrissl.losses import masked_reconstruction_loss
from mrissl.nn import patchify


def voxel_reference(pred, target, counted):
    """Mean of (pred - target)² over the counted voxels, with a loop over voxels."""
    pred, target, counted = pred.numpy(), target.numpy(), counted.numpy()
    total, n = 0.0, 0
    for idx in np.ndindex(*target.shape):
        if counted[idx]:
            total += float(pred[idx] - target[idx]) ** 2
            n += 1
    return total / n


def token_mask_to_voxels(mask, p, size):
    """(B, C, N) token mask -> (B, C, D, H, W), by hand."""
    B, C, N = mask.shape
    g = size // p
    out = torch.zeros(B, C, size, size, size, dtype=torch.bool)
    for b in range(B):
        for c in range(C):
            for n in range(N):
                d, h, w = n // (g * g), (n // g) % g, n % g
                out[b, c, d * p : (d + 1) * p, h * p : (h + 1) * p, w * p : (w + 1) * p] = mask[
                    b, c, n
                ]
    return out


@pytest.fixture
def data(gen):
    x = torch.rand(2, 3, 8, 8, 8, generator=gen, dtype=torch.float64)
    pred = torch.rand(2, 3, 8, 8, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 3, 8, generator=gen) < 0.5  # (B, C, N), patch 4
    return x, pred, mask


def test_token_mask_counts_the_masked_patches_only(data):
    x, pred, mask = data
    want = voxel_reference(pred, x, token_mask_to_voxels(mask, 4, 8))
    got = masked_reconstruction_loss(pred, x, mask, patch_size=4)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_the_three_pred_layouts_give_the_same_loss(data):
    x, pred, mask = data
    volume = masked_reconstruction_loss(pred, x, mask, patch_size=4)
    per_mod = masked_reconstruction_loss(patchify(pred, 4), x, mask, patch_size=4)
    stacked = masked_reconstruction_loss(patchify(pred, 4, layout="stacked"), x, mask, patch_size=4)
    assert volume.item() == pytest.approx(per_mod.item(), rel=1e-12)
    assert volume.item() == pytest.approx(stacked.item(), rel=1e-12)


def test_position_and_voxel_masks(data):
    x, pred, _ = data
    positions = torch.tensor([[True, False] * 4, [False] * 7 + [True]])
    voxels = token_mask_to_voxels(positions[:, None].expand(-1, 3, -1), 4, 8)
    want = voxel_reference(pred, x, voxels)
    assert masked_reconstruction_loss(pred, x, positions, patch_size=4).item() == pytest.approx(
        want
    )
    assert masked_reconstruction_loss(pred, x, voxels).item() == pytest.approx(want)


def test_on_all_is_the_whole_image_mse_of_emim_eq_9(data):
    x, pred, mask = data
    want = ((pred - x) ** 2).mean().item()
    assert masked_reconstruction_loss(pred, x, on="all").item() == pytest.approx(want)
    assert masked_reconstruction_loss(
        pred, x, mask, on="all", patch_size=4
    ).item() == pytest.approx(want)


def test_missing_modalities_are_never_counted(data):
    x, pred, mask = data
    available = torch.tensor([[True, False, True], [True, True, False]])
    counted = token_mask_to_voxels(mask & available[..., None], 4, 8)
    want = voxel_reference(pred, x, counted)
    got = masked_reconstruction_loss(pred, x, mask, patch_size=4, available=available)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # whatever the prediction of a missing modality, the loss does not move
    pred2 = pred.clone()
    pred2[0, 1] = 100.0
    assert masked_reconstruction_loss(pred2, x, mask, patch_size=4, available=available).item() == (
        pytest.approx(got.item(), rel=1e-12)
    )


def test_norm_pix_normalises_each_target_patch_like_mae(data):
    x, pred, mask = data
    t = patchify(x, 4)  # (B, C, N, P)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    p = patchify(pred, 4)
    w = mask[..., None].expand_as(t)
    want = ((p - t) ** 2)[w].mean().item()
    got = masked_reconstruction_loss(pred, x, mask, patch_size=4, norm_pix=True)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # stacked tokens are normalised over the whole token (all modalities), as MAE does
    ts = patchify(x, 4, layout="stacked")
    ts = (ts - ts.mean(-1, keepdim=True)) / (ts.var(-1, keepdim=True) + 1e-6).sqrt()
    ps = patchify(pred, 4, layout="stacked")
    positions = mask[:, 0]
    want_s = ((ps - ts) ** 2)[positions].mean().item()
    got_s = masked_reconstruction_loss(ps, x, positions, patch_size=4, norm_pix=True)
    assert got_s.item() == pytest.approx(want_s, rel=1e-12)


def test_nothing_masked_gives_zero_connected_to_pred(data):
    x, pred, mask = data
    pred.requires_grad_(True)
    loss = masked_reconstruction_loss(pred, x, torch.zeros_like(mask), patch_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_gradcheck(gen):
    x = torch.rand(1, 2, 4, 4, 4, generator=gen, dtype=torch.float64)
    pred = torch.rand(1, 8, 2 * 8, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 8, generator=gen) < 0.5
    assert torch.autograd.gradcheck(
        lambda p: masked_reconstruction_loss(p, x, mask, patch_size=2, norm_pix=True), (pred,)
    )


def test_runs_on_device(device, data):
    x, pred, mask = data
    got = masked_reconstruction_loss(pred.to(device), x.to(device), mask.to(device), patch_size=4)
    assert got.item() == pytest.approx(
        masked_reconstruction_loss(pred, x, mask, patch_size=4).item()
    )


def test_bad_input_names_the_argument(data):
    x, pred, mask = data
    with pytest.raises(ValueError, match="mask is required"):
        masked_reconstruction_loss(pred, x)
    with pytest.raises(ValueError, match="patch_size is required"):
        masked_reconstruction_loss(pred, x, mask)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        masked_reconstruction_loss(pred, x, mask.long(), patch_size=4)
    with pytest.raises(ValueError, match="mask must have one of the shapes"):
        masked_reconstruction_loss(pred, x, mask[:, :, :4], patch_size=4)
    with pytest.raises(ValueError, match="pred must be a volume"):
        masked_reconstruction_loss(torch.rand(2, 8, 5), x, mask, patch_size=4)
    with pytest.raises(ValueError, match="available must be a bool tensor of shape"):
        masked_reconstruction_loss(
            pred, x, mask, patch_size=4, available=torch.ones(2, 4, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="on must be one of"):
        masked_reconstruction_loss(pred, x, mask, patch_size=4, on="visible")  # type: ignore[arg-type]
    bad = pred.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pred contains NaN"):
        masked_reconstruction_loss(bad, x, on="all")
    stacked = rearrange(patchify(pred, 4), "b c n p -> b n (c p)")
    with pytest.raises(ValueError, match="patch_size"):
        masked_reconstruction_loss(stacked, x, mask, patch_size=3)


def sum_reference(pred, target, counted):
    """E-MIM eq. 9: Σ (pred − target)² over each image's counted voxels, averaged over B."""
    pred, target, counted = pred.numpy(), target.numpy(), counted.numpy()
    per_image = [0.0] * target.shape[0]
    for idx in np.ndindex(*target.shape):
        if counted[idx]:
            per_image[idx[0]] += float(pred[idx] - target[idx]) ** 2
    return sum(per_image) / len(per_image)


def test_sum_reduction_is_the_squared_norm_of_each_image_eq_9(data):
    x, pred, _ = data
    everything = torch.ones_like(x, dtype=torch.bool)
    got = masked_reconstruction_loss(pred, x, on="all", reduction="sum")
    assert got.item() == pytest.approx(sum_reference(pred, x, everything), rel=1e-12)


def test_sum_reduction_counts_masked_voxels_of_existing_modalities(data):
    x, pred, mask = data
    available = torch.tensor([[True, False, True], [True, True, True]])
    counted = token_mask_to_voxels(mask, 4, 8) & available[:, :, None, None, None]
    for layout in (pred, patchify(pred, 4, layout="stacked")):
        got = masked_reconstruction_loss(
            layout, x, mask, patch_size=4, available=available, reduction="sum"
        )
        assert got.item() == pytest.approx(sum_reference(pred, x, counted), rel=1e-12)
    with pytest.raises(ValueError, match="reduction must be one of"):
        masked_reconstruction_loss(pred, x, mask, patch_size=4, reduction="none")

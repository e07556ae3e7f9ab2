from __future__ import annotations

import pytest
import torch

import mrissl
from mrissl.losses import (
    PyramidBarlowTwinsLoss,
    PyramidLoss,
    barlow_twins,
    pyramid_barlow_twins,
)
from mrissl.nn import capture_intermediates, gather_tokens, pyramid_levels


def levels(gen, n_levels=3, B=2, N=10, E=6):
    full = [torch.randn(B, N, E, generator=gen) for _ in range(n_levels)]
    masked = [z + 0.5 * torch.randn(z.shape, generator=gen) for z in full]
    return full, masked


def test_total_is_the_weighted_sum_of_token_mode_levels_eq_7(gen):
    full, masked = levels(gen)
    total, per_level = pyramid_barlow_twins(
        full, masked, weights=[1.0, 0.5, 2.0], reduction="sum", return_levels=True
    )
    want = [barlow_twins(z, z_m, mode="token").item() for z, z_m in zip(full, masked, strict=True)]
    assert per_level.tolist() == pytest.approx(want, rel=1e-6)
    assert total.item() == pytest.approx(want[0] + 0.5 * want[1] + 2 * want[2], rel=1e-6)


def test_token_dropping_encoder_gathers_the_full_view_at_the_kept_positions(gen):
    full, _ = levels(gen)
    keep = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(2)])
    masked = [gather_tokens(z, keep) + 0.1 for z in full]
    total = pyramid_barlow_twins(full, masked, keep=keep, reduction="sum")
    want = sum(
        barlow_twins(gather_tokens(z, keep), z_m, mode="token")
        for z, z_m in zip(full, masked, strict=True)
    )
    assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_module_returns_levels_in_the_order_of_its_level_names(gen):
    full, masked = levels(gen, n_levels=4)
    pbt = PyramidBarlowTwinsLoss(pyramid_levels(12, 4), weights=[1, 1, 1, 0.0])
    result = pbt(full, masked, return_levels=True)
    assert isinstance(result, PyramidLoss)
    named = dict(zip(pbt.levels, result.per_level, strict=True))
    assert list(named) == [3, 6, 9, 12]
    assert result.total.item() == pytest.approx(
        sum(v.item() for k, v in named.items() if k != 12), rel=1e-6
    )
    assert torch.equal(pbt(full, masked), result.total)


def test_function_and_module_return_the_same_type(gen):
    full, masked = levels(gen, n_levels=3)
    pbt = PyramidBarlowTwinsLoss(3, weights=[1.0, 0.5, 2.0])
    from_module = pbt(full, masked, return_levels=True)
    from_function = pyramid_barlow_twins(full, masked, weights=[1.0, 0.5, 2.0], return_levels=True)
    assert type(from_module) is type(from_function) is PyramidLoss
    assert torch.equal(from_module.total, from_function.total)
    assert torch.equal(from_module.per_level, from_function.per_level)
    assert torch.equal(pyramid_barlow_twins(full, masked), PyramidBarlowTwinsLoss(3)(full, masked))


def test_works_on_monai_masked_autoencoder_features(gen):
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    mae = monai_nets.MaskedAutoEncoderViT(
        in_channels=2,
        img_size=16,
        patch_size=8,
        hidden_size=24,
        mlp_dim=48,
        num_layers=4,
        num_heads=2,
        decoder_hidden_size=24,
        decoder_num_heads=2,
        decoder_num_layers=1,
    )
    x = torch.rand(2, 2, 16, 16, 16, generator=gen)
    blocks = pyramid_levels(4, 2)
    with capture_intermediates(mae, blocks) as full:
        tokens = mae.patch_embedding(x)
        mae.blocks(torch.cat([mae.cls_token.expand(2, -1, -1), tokens], dim=1))
    keep = torch.tensor([[0, 2, 5], [1, 3, 7]])
    with capture_intermediates(mae, blocks) as masked:
        mae.blocks(torch.cat([mae.cls_token.expand(2, -1, -1), gather_tokens(tokens, keep)], dim=1))
    pbt = PyramidBarlowTwinsLoss(blocks)
    loss = pbt(full, masked, keep)
    loss.backward()
    assert loss.item() > 0
    assert mae.patch_embedding.patch_embeddings.weight.grad is not None


def test_gradcheck_with_keep(gen):
    full = [torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)]
    masked = [torch.randn(2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)]
    keep = torch.tensor([[0, 1, 4], [2, 3, 0]])
    assert torch.autograd.gradcheck(
        lambda a, b: pyramid_barlow_twins([a], [b], keep=keep), (full[0], masked[0])
    )


def test_bad_input_names_the_argument_and_level(gen):
    full, masked = levels(gen)
    with pytest.raises(ValueError, match="same, non-zero number of levels"):
        pyramid_barlow_twins(full, masked[:2])
    with pytest.raises(ValueError, match=r"z_a\[1\] and z_b\[1\] must have the same shape"):
        pyramid_barlow_twins(full, [masked[0], masked[1][:, :4], masked[2]])
    with pytest.raises(ValueError, match="weights must have one entry per level"):
        pyramid_barlow_twins(full, masked, weights=[1.0])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        pyramid_barlow_twins(full, masked, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"z_b\[0\] must hold one token per kept position"):
        pyramid_barlow_twins(full, masked, keep=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"z_a must hold 4 levels"):
        PyramidBarlowTwinsLoss(4)(full, masked)
    bad = [m.clone() for m in masked]
    bad[2][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"z_b\[2\] contains NaN"):
        pyramid_barlow_twins(full, bad)


def test_default_mean_reduction_divides_each_level_by_the_entries_of_its_matrix(gen):
    full, masked = levels(gen, N=10, E=6)
    total, per_level = pyramid_barlow_twins(
        full, masked, weights=[1.0, 0.5, 2.0], return_levels=True
    )
    # eq. 8 written out: Σ_ij (I − C)_ij² over the 10 × 10 cosine matrix, averaged over B
    want = []
    for z, z_m in zip(full, masked, strict=True):
        u = z / z.norm(dim=-1, keepdim=True)
        v = z_m / z_m.norm(dim=-1, keepdim=True)
        c = u @ v.transpose(1, 2)
        want.append(((torch.eye(10) - c) ** 2).sum(dim=(1, 2)).mean().item() / 100)
    assert per_level.tolist() == pytest.approx(want, rel=1e-5)
    assert total.item() == pytest.approx(want[0] + 0.5 * want[1] + 2 * want[2], rel=1e-5)


def test_mean_reduction_uses_the_kept_tokens_and_the_feature_count(gen):
    full, _ = levels(gen, n_levels=2, N=10, E=6)
    keep = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(2)])
    masked = [gather_tokens(z, keep) + 0.3 for z in full]
    mean = pyramid_barlow_twins(full, masked, keep=keep)
    summed = pyramid_barlow_twins(full, masked, keep=keep, reduction="sum")
    assert mean.item() == pytest.approx(summed.item() / 4**2, rel=1e-6)  # K × K matrices
    feat_mean = pyramid_barlow_twins(full, full, mode="feature")
    feat_sum = pyramid_barlow_twins(full, full, mode="feature", reduction="sum")
    assert feat_mean.item() == pytest.approx(feat_sum.item() / 6**2, rel=1e-6, abs=1e-9)


def test_module_default_is_the_mean_and_sum_is_eq_8_as_printed(gen):
    full, masked = levels(gen, n_levels=4)
    default = PyramidBarlowTwinsLoss(4)(full, masked)
    as_printed = PyramidBarlowTwinsLoss(4, reduction="sum")(full, masked)
    assert default.item() == pytest.approx(as_printed.item() / 10**2, rel=1e-6)


def test_mean_reduction_of_random_features_does_not_grow_with_the_number_of_positions(gen):
    small = pyramid_barlow_twins(*levels(gen, n_levels=1, N=16, E=64)).item()
    large = pyramid_barlow_twins(*levels(gen, n_levels=1, N=256, E=64)).item()
    assert large == pytest.approx(small, rel=0.3)


def test_reduction_is_checked_and_excludes_scale_by_size(gen):
    full, masked = levels(gen)
    with pytest.raises(ValueError, match="reduction must be one of"):
        pyramid_barlow_twins(full, masked, reduction="none")
    with pytest.raises(ValueError, match="scale_by_size=True divides each level by N"):
        pyramid_barlow_twins(full, masked, scale_by_size=True)
    with pytest.raises(ValueError, match="scale_by_size=True divides each level by N"):
        PyramidBarlowTwinsLoss(3, scale_by_size=True)
    total = pyramid_barlow_twins(full, masked, scale_by_size=True, reduction="sum")
    want = pyramid_barlow_twins(full, masked, reduction="sum")
    assert total.item() == pytest.approx(want.item() / 10, rel=1e-6)


def test_tensor_weights_are_used_on_the_device_without_reading_them(gen):
    full, masked = levels(gen)
    weights = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)  # e.g. learned level weights
    total, per_level = pyramid_barlow_twins(full, masked, weights=weights, return_levels=True)
    want = pyramid_barlow_twins(full, masked, weights=[1.0, 0.5, 2.0])
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    total.backward()
    torch.testing.assert_close(weights.grad, per_level.detach())
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        pyramid_barlow_twins(full, masked, weights=torch.tensor([1.0, -1.0, 1.0]))
    with mrissl.checks("none"):  # the values are not read: no synchronisation
        pyramid_barlow_twins(full, masked, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="one entry per level"):
        pyramid_barlow_twins(full, masked, weights=torch.ones(2))
    assert PyramidBarlowTwinsLoss(3, weights=torch.tensor([1.0, 0.5, 2.0])).weights == [
        1.0,
        0.5,
        2.0,
    ]

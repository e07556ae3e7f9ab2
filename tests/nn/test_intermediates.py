from __future__ import annotations

import pytest
import torch
from monai.networks.nets import MaskedAutoEncoderViT, ViT
from torch import nn

from mrissl.nn import PatchEmbed3d, capture_intermediates, find_blocks, pyramid_levels


def _timm_vit(depth=4):
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    return vision_transformer.VisionTransformer(
        img_size=16,
        patch_size=8,
        in_chans=2,
        embed_dim=24,
        depth=depth,
        num_heads=2,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    ).eval()


def _run_blocks_by_hand(x, blocks):
    """Reference: the output after every block, computed by calling the blocks one by one."""
    outs = []
    for blk in blocks:
        x = blk(x)
        x = x[0] if isinstance(x, tuple) else x
        outs.append(x)
    return outs


def test_timm_vit_features_equal_a_manual_block_by_block_run():
    vit = _timm_vit()
    x = torch.randn(2, 2, 16, 16, 16)
    with capture_intermediates(vit, [1, 3, -1]) as feats:
        vit(x)
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    ref = _run_blocks_by_hand(tokens, vit.blocks)
    assert len(feats) == 3
    for got, k in zip(feats, [1, 3, 4], strict=True):
        torch.testing.assert_close(got, ref[k - 1][:, 1:])  # class token stripped


def test_monai_vit_features_equal_its_hidden_states():
    vit = ViT(
        in_channels=3,
        img_size=16,
        patch_size=8,
        hidden_size=24,
        mlp_dim=48,
        num_layers=4,
        num_heads=2,
    ).eval()
    with capture_intermediates(vit, pyramid_levels(4, 2)) as feats:
        _, hidden = vit(torch.randn(2, 3, 16, 16, 16))
    assert torch.equal(feats[0], hidden[1])
    assert torch.equal(feats[1], hidden[3])


def test_monai_vit_with_class_token_is_stripped():
    vit = ViT(
        in_channels=1,
        img_size=16,
        patch_size=8,
        hidden_size=24,
        mlp_dim=48,
        num_layers=2,
        num_heads=2,
        classification=True,
    ).eval()
    with capture_intermediates(vit, [2]) as feats:
        _, hidden = vit(torch.randn(2, 1, 16, 16, 16))
    assert torch.equal(feats[0], hidden[1][:, 1:])


def test_monai_masked_autoencoder_counts_transformer_blocks_not_its_final_norm():
    mae = MaskedAutoEncoderViT(
        in_channels=2,
        img_size=16,
        patch_size=4,
        hidden_size=24,
        mlp_dim=48,
        num_layers=3,
        num_heads=2,
        decoder_hidden_size=12,
        decoder_mlp_dim=24,
        decoder_num_layers=1,
        decoder_num_heads=2,
    )
    mae.eval()
    assert len(find_blocks(mae)) == 3
    seen = {}
    mae.blocks[2].register_forward_hook(lambda m, a, o: seen.setdefault("last", o))
    with capture_intermediates(mae, [-1]) as feats:
        mae(torch.randn(2, 2, 16, 16, 16))
    # the encoder keeps 25% of 64 tokens plus its class token, which is stripped
    assert feats[0].shape == (2, 16, 24)
    assert torch.equal(feats[0], seen["last"][:, 1:])


class _ToyEncoder(nn.Module):
    """Any model with a `blocks` sequence; the blocks return tuples like some MAE code."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Scale(float(k + 1)) for k in range(3))

    def forward(self, x):
        for blk in self.blocks:
            x, _ = blk(x)
        return x


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s, None


def test_any_model_with_blocks_returning_tuples():
    model = _ToyEncoder()
    with capture_intermediates(model, [1, 2, 3]) as feats:
        model(torch.ones(1, 4, 2))
    assert [f[0, 0, 0].item() for f in feats] == [1.0, 2.0, 6.0]


def test_explicit_block_sequence_and_prefix_count():
    trunk = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with capture_intermediates(trunk, [1], blocks=list(trunk), num_prefix_tokens=2) as feats:
        trunk(torch.randn(2, 5, 3))
    assert feats[0].shape == (2, 3, 3)


def test_features_carry_gradients_to_the_encoder():
    vit = _timm_vit()
    with capture_intermediates(vit, [2]) as feats:
        vit(torch.randn(1, 2, 16, 16, 16))
    feats[0].pow(2).sum().backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None
    assert vit.blocks[3].attn.qkv.weight.grad is None


def test_hooks_are_removed_on_exit_and_after_an_exception():
    vit = _timm_vit()
    with capture_intermediates(vit, [1, 2]):
        assert all(len(b._forward_hooks) == 1 for b in vit.blocks[:2])
    assert all(len(b._forward_hooks) == 0 for b in vit.blocks)
    with pytest.raises(KeyError), capture_intermediates(vit, [1, 2]):
        raise KeyError("boom")
    assert all(len(b._forward_hooks) == 0 for b in vit.blocks)


def test_two_forward_passes_in_one_capture_are_an_error():
    vit = _timm_vit()
    x = torch.randn(1, 2, 16, 16, 16)
    with capture_intermediates(vit, [1]):
        vit(x)
        with pytest.raises(RuntimeError, match="one `with"):
            vit(x)


def test_activation_checkpointing_recompute_is_not_a_second_forward():
    vit = _timm_vit()
    vit.set_grad_checkpointing(True)
    vit.train()
    with capture_intermediates(vit, [2, 4]) as feats:
        out = vit.forward_features(torch.randn(1, 2, 16, 16, 16))
        (out.sum() + feats[0].sum()).backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None


def test_reading_before_the_forward_pass_is_an_error():
    vit = _timm_vit()
    with capture_intermediates(vit, [1]) as feats, pytest.raises(RuntimeError, match="not run"):
        feats[0]


@pytest.mark.parametrize("bad", [[0], [5], [-5], [1, 1], [2, -3]])
def test_bad_indices(bad):
    with pytest.raises(ValueError, match="indices"), capture_intermediates(_timm_vit(), bad):
        pass


def test_model_without_blocks_is_a_type_error():
    with pytest.raises(TypeError, match="blocks"), capture_intermediates(nn.Linear(2, 2), [1]):
        pass


@pytest.mark.parametrize(
    ("depth", "levels", "expected"),
    [
        (12, 4, [3, 6, 9, 12]),
        (12, 1, [12]),
        (12, 12, list(range(1, 13))),
        (10, 4, [3, 5, 8, 10]),
    ],
)
def test_pyramid_levels(depth, levels, expected):
    assert pyramid_levels(depth, levels) == expected


def test_pyramid_levels_errors():
    with pytest.raises(ValueError, match="at most depth"):
        pyramid_levels(4, 5)
    with pytest.raises(ValueError, match="levels"):
        pyramid_levels(4, 0)


# --- hierarchical encoders: MONAI SwinUNETR / UNETR, CNN feature maps -----------------------


# (32, 32, 64) is the smallest input whose four Swin stages all have more than one token
SIZE = (32, 32, 64)


def _swin_unetr(feature_size=12):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(
        in_channels=2,
        out_channels=2,
        feature_size=feature_size,
        depths=(1, 1, 1, 1),
        num_heads=(3, 3, 3, 3),
        window_size=4,
    )


def _raster_tokens(fmap):
    """Reference: token n of a (B, C, D, H, W) map is voxel (d, h, w), n = (d·H + h)·W + w."""
    B, C, D, H, W = fmap.shape
    out = torch.empty(B, D * H * W, C)
    for d in range(D):
        for h in range(H):
            for w in range(W):
                out[:, (d * H + h) * W + w] = fmap[:, :, d, h, w]
    return out


def test_swin_unetr_stages_are_found_without_arguments():
    net = _swin_unetr()
    assert find_blocks(net) == [getattr(net.swinViT, f"layers{k}")[0] for k in range(1, 5)]
    assert find_blocks(net.swinViT) == find_blocks(net)


def test_swin_unetr_four_stages_token_counts_match_their_grids():
    net = _swin_unetr().eval()
    fs = 12
    with capture_intermediates(net, pyramid_levels(4, 4)) as feats:
        net(torch.randn(1, 2, *SIZE))
    for k, (f, grid) in enumerate(zip(feats, feats.grids, strict=True), start=1):
        # patch embedding /2, then one patch merging per stage
        expected = tuple(s // 2 ** (k + 1) for s in SIZE)
        assert grid == expected
        assert f.shape == (1, expected[0] * expected[1] * expected[2], fs * 2**k)


def test_swin_stage_tokens_equal_monai_hidden_states_in_raster_order():
    net = _swin_unetr().eval()
    x = torch.randn(1, 2, *SIZE)
    with capture_intermediates(net, [1, 2, 3, 4]) as feats:
        hidden = net.swinViT(x, normalize=False)  # hidden[0] is the patch embedding
    for k in range(1, 5):
        torch.testing.assert_close(feats[k - 1], _raster_tokens(hidden[k]), rtol=0, atol=0)
    # SwinUNETR's decoder sees the stages after MONAI's channel-wise layer norm (proj_out)
    normed = net.swinViT(x, normalize=True)
    for k in range(1, 5):
        torch.testing.assert_close(
            torch.nn.functional.layer_norm(feats[k - 1], feats[k - 1].shape[-1:]),
            _raster_tokens(normed[k]),
        )


def test_pbt_on_swin_unetr_stages_trains_every_stage():
    from mrissl.losses import PyramidBarlowTwinsLoss

    net = _swin_unetr()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, *SIZE, generator=g)
    x_masked = x * (torch.rand(2, 1, *SIZE, generator=g) > 0.5)
    pbt = PyramidBarlowTwinsLoss(4)
    with capture_intermediates(net, [1, 2, 3, 4]) as full:
        net.swinViT(x)
    with capture_intermediates(net, [1, 2, 3, 4]) as masked:
        net.swinViT(x_masked)
    assert [f.shape for f in full] == [m.shape for m in masked]
    loss = pbt(full, masked)
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    loss.backward()
    sv = net.swinViT
    encoder = [sv.patch_embed.proj, *(getattr(sv, f"layers{k}")[0] for k in range(1, 5))]
    for module in encoder:
        grads = [p.grad for p in module.parameters()]
        assert grads
        assert all(gr is not None for gr in grads)
        assert any(gr.abs().sum() > 0 for gr in grads)
    # the decoder did not run, so it has no gradient
    assert all(p.grad is None for p in net.decoder1.parameters())


class _TinyCNN(nn.Module):
    """A CNN encoder with (B, C, D, H, W) stages, like BrainMVP's UniFormer-style encoders."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        self.encoder = nn.ModuleDict(
            {
                "down1": nn.Sequential(nn.Conv3d(8, 16, 2, stride=2), nn.GELU()),
                "down2": nn.Sequential(nn.Conv3d(16, 32, 2, stride=2), nn.GELU()),
            }
        )

    def forward(self, x):
        x = self.stem(x)
        for stage in self.encoder.values():
            x = stage(x)
        return x


def test_cnn_stages_by_name_and_by_module_give_raster_tokens():
    torch.manual_seed(0)
    cnn = _TinyCNN()
    x = torch.randn(2, 2, 8, 12, 16)
    with capture_intermediates(cnn, blocks=["encoder.down1", "encoder.down2"]) as by_name:
        out = cnn(x)
    with capture_intermediates(cnn, [2], blocks=list(cnn.encoder.values())) as by_module:
        cnn(x)
    assert by_name.indices == [1, 2]
    assert by_name.grids == [(4, 6, 8), (2, 3, 4)]
    assert by_module.grids == [(2, 3, 4)]
    torch.testing.assert_close(by_name[1], _raster_tokens(out), rtol=0, atol=0)
    torch.testing.assert_close(by_module[0], by_name[1], rtol=0, atol=0)
    stage1 = cnn.encoder["down1"](cnn.stem(x))
    torch.testing.assert_close(by_name[0], _raster_tokens(stage1))


def test_pbt_on_cnn_feature_maps_reaches_the_encoder():
    from mrissl.losses import PyramidBarlowTwinsLoss

    torch.manual_seed(0)
    cnn = _TinyCNN()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 16, 16, 16, generator=g)
    x_masked = x.masked_fill(torch.rand(3, 2, 16, 16, 16, generator=g) < 0.6, 0.0)
    names = ["encoder.down1", "encoder.down2"]
    with capture_intermediates(cnn, blocks=names) as full:
        cnn(x)
    with capture_intermediates(cnn, blocks=names) as masked:
        cnn(x_masked)
    assert full.grids == masked.grids == [(8, 8, 8), (4, 4, 4)]
    loss = PyramidBarlowTwinsLoss(2)(full, masked)
    loss.backward()
    assert cnn.stem.weight.grad is not None
    assert cnn.stem.weight.grad.abs().sum() > 0


def test_unetr_blocks_are_found_inside_its_vit():
    from monai.networks.nets import UNETR

    unetr = UNETR(
        in_channels=1,
        out_channels=2,
        img_size=32,
        feature_size=8,
        hidden_size=24,
        mlp_dim=48,
        num_heads=2,
    ).eval()
    assert find_blocks(unetr) == list(unetr.vit.blocks)
    with capture_intermediates(unetr, pyramid_levels(12, 4)) as feats:
        _, hidden = unetr.vit(torch.randn(2, 1, 32, 32, 32))
    for f, k in zip(feats, [3, 6, 9, 12], strict=True):
        assert torch.equal(f, hidden[k - 1])
    assert feats[0].shape == (2, 8, 24)  # UNETR's 16³ patches: a 2 × 2 × 2 grid
    assert feats.grids == [None] * 4


def test_block_names_that_do_not_exist_are_a_value_error():
    cnn = _TinyCNN()
    with pytest.raises(ValueError, match=r"blocks\[1\].*encoder.down9"):  # noqa: SIM117
        with capture_intermediates(cnn, blocks=["encoder.down1", "encoder.down9"]):
            pass


def test_a_single_module_for_blocks_is_a_type_error():
    cnn = _TinyCNN()
    with (
        pytest.raises(TypeError, match="wrap it in a list"),
        capture_intermediates(cnn, blocks=cnn.stem),
    ):
        pass


def test_a_block_returning_a_pooled_vector_is_a_type_error():
    head = nn.Sequential(nn.Linear(4, 4))
    with (
        capture_intermediates(head, blocks=list(head)) as feats,
        pytest.raises(TypeError, match=r"\(B, N, E\) tokens or a \(B, C, D, H, W\)"),
    ):
        head(torch.randn(2, 4))
    assert len(feats) == 1


def test_indices_none_captures_every_block():
    vit = _timm_vit(depth=3)
    with capture_intermediates(vit) as feats:
        vit(torch.randn(1, 2, 16, 16, 16))
    assert feats.indices == [1, 2, 3]

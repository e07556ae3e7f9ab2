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

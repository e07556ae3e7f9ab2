from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mrissl.nn import PatchEmbed3d, gather_tokens


def _timm_vit_class():
    return pytest.importorskip("timm.models.vision_transformer").VisionTransformer


def _conv_reference(x, weight, bias, patch):
    """The textbook patch embedding: a strided Conv3d, then tokens in raster order."""
    return F.conv3d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)


@pytest.mark.parametrize(("size", "patch"), [((16, 16, 16), 8), ((8, 12, 20), (4, 6, 5))])
def test_stacked_layout_equals_conv3d_on_the_same_weights(device, size, patch):
    embed = PatchEmbed3d(size, patch_size=patch, in_chans=3, embed_dim=10).to(device).double()
    x = torch.randn(2, 3, *size, device=device, dtype=torch.float64)
    expected = _conv_reference(x, embed.proj.weight, embed.proj.bias, embed.patch_size)
    torch.testing.assert_close(embed(x), expected)


def test_gradients_equal_those_of_conv3d():
    embed = PatchEmbed3d(8, patch_size=4, in_chans=2, embed_dim=6).double()
    x = torch.randn(3, 2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 8, 6, dtype=torch.float64)
    (embed(x) * target).sum().backward()
    ours = (x.grad, embed.proj.weight.grad, embed.proj.bias.grad)
    w = embed.proj.weight.detach().clone().requires_grad_()
    b = embed.proj.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (_conv_reference(x2, w, b, (4, 4, 4)) * target).sum().backward()
    for got, want in zip(ours, (x2.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(got, want)


def test_per_modality_layout_embeds_each_modality_with_the_shared_projection(device):
    embed = (
        PatchEmbed3d(8, patch_size=4, in_chans=3, embed_dim=6, layout="per_modality")
        .to(device)
        .double()
    )
    x = torch.randn(2, 3, 8, 8, 8, device=device, dtype=torch.float64)
    out = embed(x)
    assert out.shape == (2, 3 * 8, 6)
    assert embed.num_patches == 24
    for c in range(3):
        ref = _conv_reference(x[:, c : c + 1], embed.proj.weight, embed.proj.bias, (4, 4, 4))
        ref = ref + embed.modality_embed[c]
        torch.testing.assert_close(out[:, c * 8 : (c + 1) * 8], ref)


def test_per_modality_layout_with_one_projection_per_modality():
    embed = PatchEmbed3d(
        8,
        patch_size=4,
        in_chans=2,
        embed_dim=5,
        layout="per_modality",
        shared_proj=False,
        modality_embed=False,
    ).double()
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    # the grouped convolution holding the weights is the reference
    expected = embed.proj(x).view(1, 2, 5, 8).transpose(2, 3).flatten(1, 2)
    torch.testing.assert_close(embed(x), expected)


def test_modality_can_be_dropped_from_the_encoder_input():
    embed = PatchEmbed3d(8, patch_size=4, in_chans=3, embed_dim=6, layout="per_modality")
    x = torch.randn(2, 3, 8, 8, 8)
    mask = torch.zeros(2, 3, 8, dtype=torch.bool)
    mask[0, 1] = True  # sample 0 loses modality 1
    mask[1, 2] = True  # sample 1 loses modality 2
    keep = torch.argsort(mask.flatten(1).int(), dim=1, stable=True)[:, :16]
    kept = gather_tokens(embed(x), keep)
    # what the encoder sees equals embedding only the kept modalities
    torch.testing.assert_close(kept[0], embed(x)[0, [*range(8), *range(16, 24)]])
    x_without = x[1:, [0, 1]]
    ref = PatchEmbed3d(8, patch_size=4, in_chans=2, embed_dim=6, layout="per_modality")
    ref.load_state_dict(
        {
            "proj.weight": embed.proj.weight,
            "proj.bias": embed.proj.bias,
            "modality_embed": embed.modality_embed[[0, 1]],
        }
    )
    torch.testing.assert_close(kept[1], ref(x_without)[0])


@pytest.mark.parametrize(("fmt", "shape"), [("NCDHW", (2, 6, 2, 3, 4)), ("NDHWC", (2, 2, 3, 4, 6))])
def test_grid_output_formats(fmt, shape):
    embed = PatchEmbed3d((8, 12, 16), patch_size=4, in_chans=1, embed_dim=6, output_fmt=fmt)
    x = torch.randn(2, 1, 8, 12, 16)
    out = embed(x)
    assert out.shape == shape
    flat = PatchEmbed3d((8, 12, 16), patch_size=4, in_chans=1, embed_dim=6)
    flat.load_state_dict(embed.state_dict())
    seq = out.flatten(2).transpose(1, 2) if fmt == "NCDHW" else out.flatten(1, 3)
    torch.testing.assert_close(seq, flat(x))


def test_per_modality_grid_output():
    embed = PatchEmbed3d(
        8, patch_size=4, in_chans=3, embed_dim=6, layout="per_modality", flatten=False
    )
    assert embed(torch.randn(2, 3, 8, 8, 8)).shape == (2, 3, 6, 2, 2, 2)


def test_dynamic_img_pad_pads_the_far_end_with_zeros():
    embed = PatchEmbed3d(None, patch_size=4, in_chans=1, embed_dim=6, dynamic_img_pad=True)
    x = torch.randn(1, 1, 7, 8, 5)
    padded = F.pad(x, (0, 3, 0, 0, 0, 1))
    torch.testing.assert_close(
        embed(x), _conv_reference(padded, embed.proj.weight, embed.proj.bias, (4, 4, 4))
    )
    assert embed.dynamic_feat_size((7, 8, 5)) == (2, 2, 2)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"layout": "per_modality"},
        {"layout": "per_modality", "shared_proj": False, "modality_embed": False},
        {"norm_layer": torch.nn.LayerNorm, "output_fmt": "NDHWC", "flatten": False},
        {"dynamic_img_pad": True, "strict_img_size": False, "layout": "per_modality"},
    ],
)
def test_inference_projects_slab_by_slab_with_the_same_result(device, options):
    # without autograd the patch copy is made one slab of patch rows at a time; the tokens
    # must be those of the one-shot path (which autograd uses) in value and order
    embed = PatchEmbed3d((12, 8, 8), patch_size=(4, 4, 2), in_chans=3, embed_dim=5, **options)
    embed = embed.to(device).double()
    size = (11, 8, 7) if options.get("dynamic_img_pad") else (12, 8, 8)
    x = torch.randn(2, 3, *size, device=device, dtype=torch.float64)
    with_grad = embed(x)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = embed(x)
    with torch.inference_mode():
        inference = embed(x)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inference, with_grad.detach(), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # a channels-last volume is split without a copy of its own
        last = embed(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(last, with_grad.detach(), rtol=1e-12, atol=1e-12)


def test_norm_layer_is_applied_per_token():
    embed = PatchEmbed3d(8, patch_size=4, in_chans=1, embed_dim=6, norm_layer=torch.nn.LayerNorm)
    out = embed(torch.randn(2, 1, 8, 8, 8))
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_finite_results_close_to_float32(dtype):
    if dtype is torch.float16:
        pytest.importorskip("torch", minversion="2.4")
    embed = PatchEmbed3d(16, patch_size=8, in_chans=4, embed_dim=24)
    x = torch.rand(2, 4, 16, 16, 16)
    with torch.autocast("cpu", dtype=dtype):
        low = embed(x)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), embed(x), atol=0.05, rtol=0.05)


def test_timm_vision_transformer_runs_forward_features_on_a_volume():
    VisionTransformer = _timm_vit_class()
    vit = VisionTransformer(
        img_size=32,
        patch_size=16,
        in_chans=4,
        embed_dim=48,
        depth=2,
        num_heads=4,
        num_classes=3,
        embed_layer=PatchEmbed3d,
    )
    x = torch.randn(2, 4, 32, 32, 32)
    assert vit.forward_features(x).shape == (2, 1 + 8, 48)
    assert vit(x).shape == (2, 3)


def test_timm_vision_transformer_with_per_modality_tokens():
    VisionTransformer = _timm_vit_class()
    embed_layer = partial(PatchEmbed3d, layout="per_modality")
    vit = VisionTransformer(
        img_size=(32, 32, 16),
        patch_size=(16, 16, 8),
        in_chans=3,
        embed_dim=48,
        depth=2,
        num_heads=4,
        num_classes=0,
        embed_layer=embed_layer,
    )
    assert vit.pos_embed.shape == (1, 1 + 3 * 8, 48)
    assert vit.forward_features(torch.randn(2, 3, 32, 32, 16)).shape == (2, 25, 48)


def test_timm_at_the_paper_size():
    VisionTransformer = _timm_vit_class()
    vit = VisionTransformer(
        img_size=96,
        patch_size=16,
        in_chans=4,
        embed_dim=96,
        depth=1,
        num_heads=4,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    )
    assert vit.forward_features(torch.randn(1, 4, 96, 96, 96)).shape == (1, 217, 96)
    assert vit.feature_info[0]["reduction"] == 16


def test_set_input_size_changes_the_grid_but_not_the_patch():
    embed = PatchEmbed3d(32, patch_size=8, in_chans=1, embed_dim=6)
    embed.set_input_size((16, 32, 64))
    assert embed.grid_size == (2, 4, 8)
    assert embed.num_patches == 64
    with pytest.raises(ValueError, match="patch size"):
        embed.set_input_size(patch_size=4)


def test_input_errors_name_the_problem():
    embed = PatchEmbed3d(16, patch_size=8, in_chans=2, embed_dim=6)
    with pytest.raises(ValueError, match="in_chans = 2"):
        embed(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=r"strict_img_size=False.*adapt_timm_vit"):
        embed(torch.randn(1, 2, 16, 16, 24))
    with pytest.raises(ValueError, match="5 dimensions"):
        embed(torch.randn(2, 16, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        embed(torch.ones(1, 2, 16, 16, 16, dtype=torch.long))
    loose = PatchEmbed3d(16, patch_size=8, in_chans=2, embed_dim=6, strict_img_size=False)
    assert loose(torch.randn(1, 2, 16, 16, 24)).shape == (1, 12, 6)
    with pytest.raises(ValueError, match="width"):
        loose(torch.randn(1, 2, 16, 16, 20))


def test_constructor_errors():
    with pytest.raises(ValueError, match="layout"):
        PatchEmbed3d(layout="channels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_fmt"):
        PatchEmbed3d(output_fmt="NCHW")
    with pytest.raises(ValueError, match="height"):
        PatchEmbed3d((16, 20, 16), patch_size=16)
    with pytest.raises(ValueError, match="in_chans"):
        PatchEmbed3d(in_chans=0)

"""timm's VisionTransformer on volumes: create_model with a 3D size, dynamic sizes, resizing."""

from __future__ import annotations

import pytest
import torch

from mrissl.nn import PatchEmbed3d, adapt_timm_vit, capture_intermediates, resample_pos_embed_3d

timm = pytest.importorskip("timm")

SMALL = {"embed_dim": 48, "depth": 2, "num_heads": 4, "num_classes": 0, "pretrained": False}


def _linear_matrix(n_new: int, n_old: int) -> torch.Tensor:
    """(n_new, n_old) weights of 1D linear resampling, half-pixel centres, edges clamped."""
    m = torch.zeros(n_new, n_old, dtype=torch.float64)
    for i in range(n_new):
        src = max((i + 0.5) * n_old / n_new - 0.5, 0.0)
        i0 = min(int(src), n_old - 1)
        i1 = min(i0 + 1, n_old - 1)
        w = src - i0
        m[i, i0] += 1 - w
        m[i, i1] += w
    return m


def _reference_resample(grid_tokens: torch.Tensor, old, new) -> torch.Tensor:
    """Separable trilinear resampling of (N_old, E) raster-order tokens to (N_new, E)."""
    g = grid_tokens.double().reshape(*old, -1)
    md, mh, mw = (_linear_matrix(n, o) for n, o in zip(new, old, strict=True))
    out = torch.einsum("ad,bh,cw,dhwe->abce", md, mh, mw, g)
    return out.reshape(-1, g.shape[-1])


def _vit(img_size, patch_size=8, in_chans=2, **kwargs):
    return timm.create_model(
        "vit_small_patch16_224",
        patch_size=patch_size,
        in_chans=in_chans,
        embed_layer=PatchEmbed3d.for_timm(img_size, **kwargs.pop("embed_kwargs", {})),
        **SMALL,
        **kwargs,
    )


def test_create_model_non_cubic():
    vit = _vit((16, 24, 32))
    assert vit.patch_embed.img_size == (16, 24, 32)
    assert vit.patch_embed.grid_size == (2, 3, 4)
    assert vit.pos_embed.shape == (1, 1 + 24, 48)
    assert vit.forward_features(torch.randn(2, 2, 16, 24, 32)).shape == (2, 25, 48)
    assert vit(torch.randn(2, 2, 16, 24, 32)).shape == (2, 48)


def test_resample_matches_reference_trilinear():
    gen = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 2 * 3 * 4, 12, generator=gen)
    for new in [(4, 3, 2), (3, 5, 7), (1, 1, 1), (2, 3, 4)]:
        got = resample_pos_embed_3d(pe, new, (2, 3, 4))
        assert torch.equal(got[:, :1], pe[:, :1])  # the class token is kept
        ref = _reference_resample(pe[0, 1:], (2, 3, 4), new)
        torch.testing.assert_close(got[0, 1:].double(), ref, rtol=1e-5, atol=1e-6)


def test_resample_groups_and_dtype():
    gen = torch.Generator().manual_seed(1)
    pe = torch.randn(2 + 3 * 8, 6, generator=gen, dtype=torch.float64)  # 2 prefix, 3 grids
    got = resample_pos_embed_3d(pe, (3, 2, 4), 2, num_prefix_tokens=2, num_groups=3)
    assert got.shape == (2 + 3 * 24, 6)
    assert got.dtype == torch.float64
    for c in range(3):
        ref = _reference_resample(pe[2 + 8 * c : 2 + 8 * (c + 1)], (2, 2, 2), (3, 2, 4))
        torch.testing.assert_close(got[2 + 24 * c : 2 + 24 * (c + 1)], ref)
    half = resample_pos_embed_3d(pe[None].bfloat16(), 3, 2, num_prefix_tokens=2, num_groups=3)
    assert half.dtype == torch.bfloat16


def test_resample_errors():
    pe = torch.randn(1, 9, 6)
    with pytest.raises(ValueError, match="1 \\+ 1·8 = 9"):
        resample_pos_embed_3d(torch.randn(1, 10, 6), 3, 2)
    with pytest.raises(ValueError, match="mode"):
        resample_pos_embed_3d(pe, 3, 2, mode="bicubic")
    with pytest.raises(ValueError, match="num_groups"):
        resample_pos_embed_3d(pe, 3, 2, num_groups=0)
    with pytest.raises(ValueError, match="pos_embed"):
        resample_pos_embed_3d(torch.randn(9), 3, 2)


def test_dynamic_img_size_two_input_sizes_end_to_end():
    """A non-cubic 3D ViT from create_model, run at its size and another; checked against a
    fixed-size ViT holding the same weights and the reference-resampled position table."""
    torch.manual_seed(0)
    vit = adapt_timm_vit(_vit((16, 24, 32), dynamic_img_size=True)).eval()
    x1 = torch.randn(2, 2, 16, 24, 32)
    x2 = torch.randn(2, 2, 32, 16, 24)  # grid (4, 2, 3) instead of (2, 3, 4)

    fixed1 = _vit((16, 24, 32)).eval()
    fixed1.load_state_dict(vit.state_dict())
    torch.testing.assert_close(vit.forward_features(x1), fixed1.forward_features(x1))

    fixed2 = _vit((32, 16, 24)).eval()
    state = vit.state_dict()
    pe = state["pos_embed"]
    grid = _reference_resample(pe[0, 1:], (2, 3, 4), (4, 2, 3)).float()
    state["pos_embed"] = torch.cat([pe[:, :1], grid[None]], dim=1)
    fixed2.load_state_dict(state)
    out = vit.forward_features(x2)
    assert out.shape == (2, 1 + 24, 48)
    torch.testing.assert_close(out, fixed2.forward_features(x2), rtol=1e-4, atol=1e-5)


def test_dynamic_gradients_reach_pos_embed_and_hooks_work():
    vit = adapt_timm_vit(_vit((16, 16, 16), dynamic_img_size=True))
    with capture_intermediates(vit, [1, 2]) as feats:
        out = vit(torch.randn(1, 2, 24, 16, 8))
    assert [f.shape for f in feats] == [(1, 3 * 2 * 1, 48)] * 2
    out.pow(2).sum().backward()  # (a plain sum of a LayerNorm output has zero gradient)
    assert vit.pos_embed.grad is not None
    assert vit.pos_embed.grad.abs().sum() > 0


def test_dynamic_per_modality_prefix_variants():
    """Per-modality tokens (one grid per modality), register tokens, no_embed_class."""
    vit = _vit(
        (16, 16, 16),
        dynamic_img_size=True,
        reg_tokens=2,
        no_embed_class=True,
        embed_kwargs={"layout": "per_modality"},
    )
    adapt_timm_vit(vit).eval()
    assert vit.pos_embed.shape == (1, 2 * 8, 48)  # no rows for the 3 prefix tokens
    x = torch.randn(1, 2, 8, 16, 24)  # grid (1, 2, 3) per modality
    out = vit.forward_features(x)
    assert out.shape == (1, 3 + 2 * 6, 48)
    # reference: embed, add the per-modality reference-resampled table, prepend the prefix
    tokens = vit.patch_embed(x).reshape(1, -1, 48)
    table = vit.pos_embed.detach()[0]
    ref_pe = torch.cat(
        [_reference_resample(table[8 * c : 8 * c + 8], (2, 2, 2), (1, 2, 3)) for c in range(2)]
    )
    seq = torch.cat([vit.cls_token, vit.reg_token, tokens + ref_pe.float()[None]], dim=1)
    ref = vit.norm(vit.blocks(vit.norm_pre(seq)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_set_input_size_resamples_in_3d():
    vit = adapt_timm_vit(_vit((16, 24, 32)))
    before = vit.pos_embed.detach().clone()
    vit.set_input_size((32, 24, 16))
    assert vit.patch_embed.grid_size == (4, 3, 2)
    ref = _reference_resample(before[0, 1:], (2, 3, 4), (4, 3, 2)).float()
    torch.testing.assert_close(vit.pos_embed.detach()[0, 1:], ref, rtol=1e-5, atol=1e-6)
    assert isinstance(vit.pos_embed, torch.nn.Parameter)
    assert vit.pos_embed.requires_grad
    assert vit.forward_features(torch.randn(1, 2, 32, 24, 16)).shape == (1, 25, 48)


def test_errors_say_what_to_do():
    dynamic = _vit((16, 16, 16), dynamic_img_size=True)
    with pytest.raises(ValueError, match="adapt_timm_vit"):
        dynamic(torch.randn(1, 2, 16, 16, 16))
    fixed = adapt_timm_vit(_vit((16, 16, 16)))
    with pytest.raises(NotImplementedError, match="capture_intermediates"):
        fixed.forward_intermediates(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        fixed(torch.randn(1, 2, 16, 16, 24))
    with pytest.raises(TypeError, match="PatchEmbed3d"):
        adapt_timm_vit(torch.nn.Linear(2, 2))


def test_factory_conflicts():
    # a 3D img_size for create_model fails in timm after the build, whatever the factory holds
    for size in [(16, 16, 24), (16, 16, 16)]:
        with pytest.raises(ValueError, match=r"give the 3D size to PatchEmbed3d\.for_timm only"):
            timm.create_model(
                "vit_small_patch16_224",
                img_size=size,
                patch_size=8,
                in_chans=2,
                embed_layer=PatchEmbed3d.for_timm((16, 16, 16)),
                **SMALL,
            )
    # outside create_model a ViT built directly passes its own 3D size: it must agree
    with pytest.raises(ValueError, match="differs"):
        PatchEmbed3d.for_timm((16, 16, 16))(img_size=(16, 16, 24), patch_size=8, in_chans=2)
    with pytest.raises(ValueError, match="in_chans"):
        _vit((16, 16, 16), embed_kwargs={"in_chans": 3})
    assert "per_modality" in repr(PatchEmbed3d.for_timm(16, layout="per_modality"))


def test_literal_create_model_call_with_a_3d_img_size_names_the_working_call():
    # timm records img_size with a 2D check after building the model and rejects (D, H, W);
    # the error comes before the build and shows the call that works
    with pytest.raises(ValueError, match=r"PatchEmbed3d\.for_timm\(\(16, 24, 32\)\)"):
        timm.create_model(
            "vit_small_patch16_224",
            img_size=(16, 24, 32),
            patch_size=8,
            in_chans=2,
            embed_layer=PatchEmbed3d,
            **SMALL,
        )
    vit = timm.create_model(
        "vit_small_patch16_224",
        patch_size=8,
        in_chans=2,
        embed_layer=PatchEmbed3d.for_timm((16, 24, 32)),
        **SMALL,
    )
    assert vit.patch_embed.grid_size == (2, 3, 4)


def test_create_model_without_a_3d_size_names_the_working_call():
    # timm passes the model's default (224, 224) when no img_size is given
    for kwargs in [{}, {"img_size": (16, 24)}]:
        with pytest.raises(ValueError, match=r"2D size .*PatchEmbed3d\.for_timm\(\(D, H, W\)\)"):
            timm.create_model(
                "vit_small_patch16_224",
                patch_size=8,
                in_chans=2,
                embed_layer=PatchEmbed3d,
                **SMALL,
                **kwargs,
            )


def test_create_model_with_a_cube_size_and_the_plain_layer_works():
    vit = timm.create_model(
        "vit_small_patch16_224",
        img_size=16,
        patch_size=8,
        in_chans=2,
        embed_layer=PatchEmbed3d,
        **SMALL,
    )
    assert vit.patch_embed.img_size == (16, 16, 16)
    assert vit(torch.randn(1, 2, 16, 16, 16)).shape == (1, 48)


def test_vision_transformer_built_directly_takes_a_3d_img_size():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=(16, 24, 32),
        patch_size=8,
        in_chans=2,
        embed_layer=PatchEmbed3d,
        embed_dim=48,
        depth=1,
        num_heads=4,
        num_classes=0,
    )
    assert vit.patch_embed.grid_size == (2, 3, 4)
    assert vit(torch.randn(1, 2, 16, 24, 32)).shape == (1, 48)

"""apply_mask and cross_modal_fill (mrissl.masking.fill), and its fast paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import reduce
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    apply_mask,
    cross_modal_fill,
    mask_to_voxels,
)
from mrissl.masking.convert import _token_mask_5d
from mrissl.masking.fill import _bitwise_zero_fill, _patch_square_sums, _row_layout


def reference_voxels(mask, patch, size):
    """Each token repeated over its patch with NumPy (raster order, depth slowest)."""
    B, C, _ = mask.shape
    grid = [s // p for s, p in zip(size, patch, strict=True)]
    out = mask.reshape(B, C, *grid)
    for axis, p in zip((2, 3, 4), patch, strict=True):
        out = out.repeat(p, axis=axis)
    return out


# --- apply_mask ---------------------------------------------------------------------------------


def reference_apply(x, voxel_mask, fill_values):
    out = x.copy()
    out[voxel_mask] = fill_values[voxel_mask]
    return out


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, 16, generator=g)
    mask = HybridMaskPattern().sample(2, 3, (2, 2, 4), generator=g)
    return x, mask, mask_to_voxels(mask, 4, (8, 8, 16))


def test_apply_mask_constant_fill_matches_reference(batch, device):
    x, mask, vox = batch
    got = apply_mask(x.to(device), mask.to(device), 4, fill=-1.5).cpu()
    ref = reference_apply(x.numpy(), vox.numpy(), np.full(x.shape, -1.5, dtype=np.float32))
    assert np.array_equal(got.numpy(), ref)
    assert torch.equal(apply_mask(x, mask, 4), apply_mask(x, vox, fill=0.0))


def test_apply_mask_mean_fill_uses_the_unmasked_voxels_of_each_case_and_modality(batch):
    x, mask, vox = batch
    got = apply_mask(x, mask, 4, fill="mean")
    xn, vn = x.numpy(), vox.numpy()
    means = np.zeros(x.shape, dtype=np.float32)
    for b in range(2):
        for c in range(3):
            visible = xn[b, c][~vn[b, c]]
            means[b, c] = visible.mean() if visible.size else 0.0
    assert np.allclose(got.numpy(), reference_apply(xn, vn, means), atol=1e-6)
    assert torch.allclose(got, apply_mask(x, vox, fill="mean"), atol=1e-6)


def test_apply_mask_noise_fill_matches_visible_statistics_and_is_seeded():
    x = torch.rand(1, 2, 16, 16, 16) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1, 1) + 3
    mask = torch.zeros(1, 2, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    a = apply_mask(x, mask, 8, fill="noise", generator=torch.Generator().manual_seed(0))
    b = apply_mask(x, mask, 8, fill="noise", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    vox = mask_to_voxels(mask, 8, 16)
    for c in range(2):
        visible = x[0, c][~vox[0, c]]
        noise = a[0, c][vox[0, c]]
        assert noise.mean().item() == pytest.approx(visible.mean().item(), abs=0.05 * (c * 4 + 1))
        assert noise.std().item() == pytest.approx(visible.std().item(), rel=0.05)
    assert torch.equal(a[~vox], x[~vox])


def test_apply_mask_tensor_fill_and_gradients(batch):
    x, mask, vox = batch
    template = torch.randn(1, 3, 8, 8, 16, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    out = apply_mask(xg, mask, 4, fill=template)
    ref = torch.where(vox, template.detach().expand_as(x), x)
    assert torch.equal(out.detach(), ref)
    out.sum().backward()
    assert torch.equal(template.grad[0], vox.sum(dim=0).float())
    assert torch.equal(xg.grad, (~vox).float())


def test_apply_mask_per_position_mask_hides_every_modality():
    x = torch.ones(1, 3, 4, 4, 4)
    out = apply_mask(x, torch.tensor([[True] + [False] * 7]), 2)
    assert (out[:, :, :2, :2, :2] == 0).all()
    assert out.sum() == 3 * (64 - 8)


def test_apply_mask_keeps_the_dtype_under_autocast():
    x = torch.rand(1, 2, 8, 8, 8, dtype=torch.bfloat16)
    mask = torch.ones(1, 2, 8, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apply_mask(x, mask, 4, fill="noise")
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


def test_apply_mask_errors(batch):
    x, mask, _ = batch
    with pytest.raises(ValueError, match="needs patch_size"):
        apply_mask(x, mask)
    with pytest.raises(TypeError, match="bool"):
        apply_mask(x, mask.float(), 4)
    with pytest.raises(ValueError, match="tokens"):
        apply_mask(x, mask, 2)
    with pytest.raises(ValueError, match="fill"):
        apply_mask(x, mask, 4, fill="median")
    with pytest.raises(ValueError, match="broadcast"):
        apply_mask(x, mask, 4, fill=torch.zeros(5))
    with pytest.raises(TypeError, match="floating"):
        apply_mask(x.long(), mask, 4)
    with pytest.raises(ValueError, match="batch size"):
        apply_mask(x, mask[:1], 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_apply_mask_zero_fill_is_exact_for_every_value_and_dtype(dtype, device):
    # the zero fill of a token mask runs as a bitwise AND; it must match a plain where()
    # bit for bit, including NaN, inf and -0.0 in the kept and masked voxels
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 8, generator=g).to(dtype)
    x.view(-1)[::7] = float("nan")
    x.view(-1)[::11] = float("inf")
    x.view(-1)[::13] = -0.0
    mask = torch.rand(2, 3, 8, generator=g) < 0.6
    vox = mask_to_voxels(mask, (2, 4, 4), (4, 8, 8))
    want = torch.where(vox, torch.zeros((), dtype=dtype), x)
    got = apply_mask(x.to(device), mask.to(device), (2, 4, 4)).cpu()
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # same bits
    buffer = torch.full_like(x, 7.0).to(device)
    assert apply_mask(x.to(device), mask.to(device), (2, 4, 4), out=buffer) is buffer
    assert torch.equal(buffer.cpu().view(torch.uint8), want.view(torch.uint8))


def test_apply_mask_negative_zero_fill_is_negative_zero(batch):
    x, mask, vox = batch
    out = apply_mask(x, mask, 4, fill=-0.0)
    assert torch.equal(torch.signbit(out), vox)  # x is in [0, 1): only the fill is negative


@pytest.mark.parametrize("fill", [0.0, -1.5, "mean", "noise", "tensor"])
def test_apply_mask_out_matches_the_fresh_result(batch, fill, device):
    x, mask, _ = batch
    x, mask = x.to(device), mask.to(device)
    value = torch.randn(1, 3, 8, 8, 16).to(device) if fill == "tensor" else fill
    want = apply_mask(x, mask, 4, value, generator=torch.Generator(device).manual_seed(0))
    buffer = torch.empty_like(x)
    got = apply_mask(
        x, mask, 4, value, generator=torch.Generator(device).manual_seed(0), out=buffer
    )
    assert got is buffer
    assert torch.equal(buffer, want)
    vox = mask_to_voxels(mask, 4, (8, 8, 16))  # a voxel mask takes the other code path
    want = apply_mask(x, vox, fill=value, generator=torch.Generator(device).manual_seed(0))
    got = apply_mask(
        x, vox, fill=value, generator=torch.Generator(device).manual_seed(0), out=buffer
    )
    assert got is buffer
    assert torch.equal(buffer, want)


def test_apply_mask_zero_fill_keeps_gradients_to_the_volume(batch):
    x, mask, vox = batch
    xg = x.clone().requires_grad_(True)
    out = apply_mask(xg, mask, 4)
    assert torch.equal(out.detach(), torch.where(vox, 0.0, x))
    out.sum().backward()
    assert torch.equal(xg.grad, (~vox).float())


def test_apply_mask_out_errors(batch):
    x, mask, _ = batch
    with pytest.raises(TypeError, match=r"out must be a torch\.Tensor"):
        apply_mask(x, mask, 4, out=np.zeros(x.shape))
    with pytest.raises(ValueError, match="shape, dtype and device"):
        apply_mask(x, mask, 4, out=torch.empty(2, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="shape, dtype and device"):
        apply_mask(x, mask, 4, out=torch.empty_like(x, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        apply_mask(x, mask, 4, out=torch.empty(2, 3, 16, 8, 8).transpose(2, 4))
    with pytest.raises(ValueError, match="shares memory"):
        apply_mask(x, mask, 4, out=x)
    with pytest.raises(ValueError, match="autograd"):
        apply_mask(x.clone().requires_grad_(True), mask, 4, out=torch.empty_like(x))
    template = torch.zeros(1, 3, 8, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="autograd"):
        apply_mask(x, mask, 4, fill=template, out=torch.empty_like(x))
    with torch.no_grad():  # no graph, no problem
        apply_mask(x, mask, 4, fill=template, out=torch.empty_like(x))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from([(1, 1, 1), (2, 2, 2), (1, 2, 4), (4, 4, 1)]),
    st.sampled_from([0.0, 2.5]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_apply_mask_property_kept_voxels_unchanged_masked_voxels_filled(
    B, C, patch, fill, use_out, seed
):
    g = torch.Generator().manual_seed(seed)
    size = (4, 4, 8)
    x = torch.randn(B, C, *size, generator=g)
    N = (size[0] // patch[0]) * (size[1] // patch[1]) * (size[2] // patch[2])
    mask = torch.rand(B, C, N, generator=g) < 0.5
    before = x.clone()
    out = apply_mask(x, mask, patch, fill, out=torch.empty_like(x) if use_out else None)
    vox = torch.from_numpy(reference_voxels(mask.numpy(), patch, size))
    assert torch.equal(out[~vox], x[~vox])
    assert bool((out[vox] == fill).all())
    assert torch.equal(x, before)  # the input is never written


# --- cross_modal_fill -------------------------------------------------------------------------


def reference_cross_fill(x, vox, source, fallback):
    out = x.copy()
    B, C = source.shape
    for b in range(B):
        for c in range(C):
            s = source[b, c]
            fill = x[b, s] if s >= 0 else np.full(x.shape[2:], fallback, dtype=x.dtype)
            out[b, c][vox[b, c]] = fill[vox[b, c]]
    return out


@pytest.mark.parametrize("ratio", [0.3, 0.875])  # both code paths: mostly kept, mostly masked
def test_cross_modal_fill_matches_reference(ratio, device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 8, 8, 8, generator=g)
    available = torch.tensor([[True] * 4, [True, False, True, True], [False, False, True, False]])
    mask = BlockMask(4, mask_ratio=ratio).sample(3, 4, 8, available=available, generator=g)
    gd = torch.Generator(device).manual_seed(1)
    filled, source = cross_modal_fill(
        x.to(device), mask.to(device), 4, available=available, generator=gd, fallback=-1.0
    )
    vox = mask_to_voxels(mask, 4, 8).numpy()
    ref = reference_cross_fill(x.numpy(), vox, source.cpu().numpy(), -1.0)
    assert np.array_equal(filled.cpu().numpy(), ref)
    # voxel-mask input gives the same result for the same sources
    vfilled, vsource = cross_modal_fill(
        x, torch.from_numpy(vox), available=available, generator=torch.Generator().manual_seed(1)
    )
    if device.type == "cpu":
        assert torch.equal(vsource, source)
        assert torch.equal(
            vfilled, torch.from_numpy(reference_cross_fill(x.numpy(), vox, vsource.numpy(), 0.0))
        )


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_missing_modality_is_never_a_source(B, C, data):
    rows = st.lists(st.booleans(), min_size=C, max_size=C).filter(any)
    available = torch.tensor(data.draw(st.lists(rows, min_size=B, max_size=B)), dtype=torch.bool)
    x = torch.zeros(B, C, 2, 2, 2)
    mask = torch.ones(B, C, 1, dtype=torch.bool)
    _, source = cross_modal_fill(x, mask, 2, available=available)
    for b in range(B):
        present = int(available[b].sum())
        for c in range(C):
            s = int(source[b, c])
            if available[b, c] and present >= 2:
                assert s != c
                assert available[b, s]
            else:
                assert s == -1


def test_sources_are_uniform_among_the_other_modalities():
    x = torch.zeros(3000, 4, 2, 2, 2)
    mask = torch.ones(3000, 4, 1, dtype=torch.bool)
    _, source = cross_modal_fill(x, mask, 2, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(source[:, 0], minlength=4).float() / 3000
    assert counts[0] == 0
    assert torch.allclose(counts[1:], torch.full((3,), 1 / 3), atol=0.03)


def test_cross_modal_fill_errors():
    x = torch.zeros(1, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="needs patch_size"):
        cross_modal_fill(x, torch.ones(1, 2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="voxel mask"):
        cross_modal_fill(x, torch.ones(1, 2, 4, 4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="available"):
        cross_modal_fill(
            x,
            torch.ones(1, 2, 8, dtype=torch.bool),
            2,
            available=torch.ones(1, 3, dtype=torch.bool),
        )


@pytest.mark.parametrize("kind", ["blocks", "voxels"])
def test_cross_modal_fill_out_matches_the_fresh_result(kind, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, 8, generator=g).to(device)
    available = torch.tensor([[True] * 4, [True, False, True, True], [False, False, True, False]])
    mask = BlockMask(4, mask_ratio=0.5)(x, generator=torch.Generator(device).manual_seed(0))
    patch = 4
    if kind == "voxels":
        mask, patch = mask_to_voxels(mask, 4, (8, 8, 8)), None
    available = available.to(device)

    def run(out=None):
        gen = torch.Generator(device).manual_seed(1)
        return cross_modal_fill(
            x, mask, patch, available=available, generator=gen, fallback=-2.0, out=out
        )

    want, want_source = run()
    buffer = torch.full_like(x, 9.0)
    got, source = run(buffer)
    assert got is buffer
    assert torch.equal(source, want_source)
    assert torch.equal(buffer, want)
    assert bool((source[2] == -1).all())  # one present modality: the fallback, not the buffer
    with pytest.raises(ValueError, match="shares memory"):
        cross_modal_fill(x, mask, patch, out=x)
    with pytest.raises(ValueError, match="autograd"):
        cross_modal_fill(x.clone().requires_grad_(True), mask, patch, out=buffer)


# --- fast paths: each equals the plain path it replaces ----------------------------------------


@pytest.mark.parametrize("patch", [(1, 1, 1), (2, 2, 2), (1, 2, 4), (4, 4, 1)])
@pytest.mark.parametrize("per_position", [False, True])
def test_row_layout_spreads_to_the_voxel_mask(patch, per_position):
    B, C, size = 2, 3, (4, 4, 8)
    grid = tuple(s // p for s, p in zip(size, patch, strict=True))
    N = grid[0] * grid[1] * grid[2]
    mask = torch.rand(B, 1 if per_position else C, N, generator=torch.Generator().manual_seed(0))
    mask = mask < 0.5
    tokens = _token_mask_5d(mask[:, 0] if per_position else mask, grid)
    rows, view = _row_layout(tokens, patch, (B, C, *size))
    assert rows.numel() * patch[0] * patch[1] == mask.shape[1] * B * size[0] * size[1] * size[2]
    spread = torch.broadcast_to(rows, view).reshape(B, C, *size)
    want = np.broadcast_to(reference_voxels(mask.numpy(), patch, size), (B, C, *size))
    assert np.array_equal(spread.numpy(), want)


@pytest.mark.parametrize("fill", [0.0, -1.5, "mean", "noise", "tensor"])
def test_token_mask_gives_the_voxel_mask_result(batch, fill):
    # the row layout of a token mask against the plain path: its voxel mask
    x, mask, vox = batch
    value = torch.randn(1, 3, 8, 8, 16) if fill == "tensor" else fill
    fast = apply_mask(x, mask, 4, value, generator=torch.Generator().manual_seed(0))
    plain = apply_mask(x, vox, fill=value, generator=torch.Generator().manual_seed(0))
    if isinstance(fill, str):  # statistics summed per patch or per voxel: float rounding
        assert torch.allclose(fast, plain, atol=1e-6)
    else:
        assert torch.equal(fast, plain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_bitwise_zero_fill_equals_where_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 2, 8, generator=g).to(dtype)
    x.view(-1)[::5] = float("nan")
    x.view(-1)[::7] = float("-inf")
    x.view(-1)[::9] = -0.0
    mask = torch.rand(2, 3, 4, 1, 8, generator=g) < 0.5  # broadcasts over one axis
    want = torch.where(mask, torch.zeros((), dtype=dtype), x).view(torch.uint8)
    assert torch.equal(_bitwise_zero_fill(x, mask, None).view(torch.uint8), want)
    buffer = torch.full_like(x, 7.0)
    assert _bitwise_zero_fill(x, mask, buffer) is buffer
    assert torch.equal(buffer.view(torch.uint8), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_patch_square_sums_equal_the_plain_sum_of_squares(dtype):
    x = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    plain = reduce(
        x.float().square(), "b c (gd pd) (gh ph) (gw pw) -> b c gd gh gw", "sum", pd=2, ph=4, pw=2
    )
    fast = _patch_square_sums(x, (2, 4, 2))
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, plain, rtol=1e-5)


def test_noise_fill_works_on_float64_volumes(batch):
    x, mask, vox = batch
    out = apply_mask(x.double(), mask, 4, fill="noise", generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64
    assert torch.equal(out[~vox], x.double()[~vox])

"""Scale-free losses give the same value for features around 1e30 or 1e-30 as at unit size.

Cosines, correlations and L2 normalisations are invariant to the scale of their inputs, but in
float32 a square of 1e30 overflows and a square of 1e-30 underflows. The reference is the same
loss on the inputs rescaled to unit size; an absolute ``eps`` (the smallest norm or standard
deviation divided by, in the units of the input) is rescaled with them.
"""

from __future__ import annotations

import pytest
import torch

from mrissl.losses import barlow_twins, consistency_loss, info_nce, pyramid_barlow_twins

SCALES = [1e30, 1e-30]


def pair(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g)
    return a, a + 0.5 * torch.randn(*shape, generator=g)


def close(got, want):
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(16, 8), (3, 16), (4, 3, 8)])  # C, Gram path, tokens
def test_feature_mode_barlow_twins_at_1e30_equals_unit_scale(shape):
    # the case: the standardisation overflowed and every C_ij became 0 (loss = D)
    a, b = pair(*shape)
    close(barlow_twins(1e30 * a, 1e30 * b), barlow_twins(a, b))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "feature"},
        {"mode": "token"},
        {"mode": "token", "batch_mode": "joint"},
        {"mode": "token", "scale_by_size": True},
    ],
)
def test_barlow_twins_is_scale_free_with_eps_in_the_units_of_the_input(scale, kwargs):
    a, b = pair(2, 6, 8)
    want = barlow_twins(a, b, **kwargs)
    close(barlow_twins(scale * a, scale * b, eps=1e-6 * scale, **kwargs), want)


@pytest.mark.parametrize("scale", SCALES)
def test_token_mode_gram_path_is_scale_free(scale):
    a, b = pair(2, 20, 4)  # 2E < N: sum of squares from E x E Gram matrices
    want = barlow_twins(a, b, mode="token")
    close(barlow_twins(scale * a, scale * b, mode="token", eps=1e-6 * scale), want)


def test_barlow_twins_is_free_of_the_scale_of_each_feature_and_token():
    # feature mode standardises each feature, token mode normalises each token: scaling a
    # column (a feature) or a token by anything from 1e-30 to 1e30 changes nothing
    a, b = pair(16, 6)
    col = torch.tensor([1e30, 1e-30, 1.0, 3e20, 1e-25, 7.0])
    close(barlow_twins(a * col, b * col, eps=1e-40), barlow_twins(a, b))
    z, z_m = pair(2, 6, 8)
    row = torch.tensor([1e30, 1e-30, 1.0, 3e20, 1e-25, 7.0])[None, :, None]
    close(
        barlow_twins(z * row, z_m * row, mode="token", eps=1e-40),
        barlow_twins(z, z_m, mode="token"),
    )


def test_barlow_twins_gradient_is_rescaled_exactly():
    # L(c·a) = L(a)  =>  dL/d(c·a) = (dL/da) / c
    a, b = pair(16, 8)
    for kwargs in ({"mode": "feature"}, {"mode": "token"}):
        x, y = a.reshape(2, 8, 8), b.reshape(2, 8, 8)
        x1 = x.clone().requires_grad_()
        barlow_twins(x1, y, **kwargs).backward()
        x2 = (1e30 * x).requires_grad_()
        barlow_twins(x2, 1e30 * y, eps=1e24, **kwargs).backward()
        torch.testing.assert_close(x2.grad * 1e30, x1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_pyramid_barlow_twins_is_scale_free(scale):
    full = [pair(2, 6, 8, seed=s)[0] for s in range(2)]
    masked = [pair(2, 6, 8, seed=s)[1] for s in range(2)]
    want = pyramid_barlow_twins(full, masked)
    got = pyramid_barlow_twins(
        [scale * z for z in full], [scale * z for z in masked], eps=1e-6 * scale
    )
    close(got, want)


@pytest.mark.parametrize("scale", SCALES)
def test_info_nce_is_scale_free(scale):
    # the case: every logit became 0 and the loss log(B)
    a, b = pair(8, 16)
    want = info_nce(a, b)
    assert abs(want.item() - torch.log(torch.tensor(8.0)).item()) > 0.1
    close(info_nce(scale * a, scale * b), want)
    negatives = pair(5, 16, seed=1)[0]
    close(
        info_nce(scale * a, scale * b, negatives=scale * negatives),
        info_nce(a, b, negatives=negatives),
    )


def test_info_nce_uses_the_direction_of_each_row_whatever_its_length():
    a, b = pair(8, 16)
    rows = torch.tensor([1e30, 1e-30, 1.0, 1e-20, 1e20, 5.0, 1e-35, 1e35])[:, None]
    close(info_nce(a * rows, b * rows.flip(0)), info_nce(a, b))


def test_info_nce_gradient_is_rescaled_exactly():
    a, b = pair(8, 16)
    x1 = a.clone().requires_grad_()
    info_nce(x1, b).backward()
    x2 = (1e-30 * a).requires_grad_()
    info_nce(x2, 1e-30 * b).backward()
    torch.testing.assert_close(x2.grad * 1e-30, x1.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale", SCALES)
def test_consistency_l2_scales_linearly(scale):
    f1, f2 = pair(4, 3, 5)
    want = consistency_loss(f1, f2)
    got = consistency_loss(scale * f1, scale * f2)
    close(got / scale, want)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.bfloat16, 1e30), (torch.bfloat16, 1e-30)])
def test_autocast_inputs_at_extreme_scale_give_the_unit_scale_value(dtype, scale):
    # bf16 has the exponent range of float32: its features can be this large or small
    a, b = pair(8, 16)
    x, y = (scale * a).to(dtype), (scale * b).to(dtype)
    unit_x, unit_y = x.float() / scale, y.float() / scale
    with torch.autocast("cpu", dtype=dtype):
        got_bt = barlow_twins(x, y, eps=1e-6 * scale)
        got_nce = info_nce(x, y)
        got_tok = barlow_twins(x.reshape(2, 4, 16), y.reshape(2, 4, 16), mode="token", eps=1e-40)
    close(got_bt, barlow_twins(unit_x, unit_y))
    close(got_nce, info_nce(unit_x, unit_y))
    close(got_tok, barlow_twins(unit_x.reshape(2, 4, 16), unit_y.reshape(2, 4, 16), mode="token"))


def test_overflowing_values_without_a_finite_answer_are_reported():
    # with normalize=False the logits themselves are ~1e60: there is no float32 answer
    a, b = pair(8, 16)
    with pytest.raises(ValueError, match="overflow float32"):
        info_nce(1e30 * a, 1e30 * b, normalize=False)
    with pytest.raises(ValueError, match="overflow float32"):
        consistency_loss(1e30 * a, 1e30 * b, metric="mse")

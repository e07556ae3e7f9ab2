"""Every loss under bf16/fp16 autocast: finite and within 1e-2 relative of float32."""

from __future__ import annotations

import pytest
import torch

from mrissl.losses import (
    barlow_twins,
    consistency_loss,
    info_nce,
    masked_reconstruction_loss,
    pyramid_barlow_twins,
)

B, N, E = 16, 12, 32


def features(device, constant_dim: bool):
    """Token features made by a linear layer, the way an encoder makes them."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(E, E).to(device)
    x = torch.randn(B, N, E, generator=g).to(device)
    x_m = (x + 0.7 * torch.randn(B, N, E, generator=g)).to(device)
    if constant_dim:
        with torch.no_grad():
            layer.weight[3] = 0.0  # feature 3 is the bias: constant, zero variance
    return layer, x, x_m


LOSSES = {
    "barlow_feature_pooled": lambda z, z_m: barlow_twins(z.mean(1), z_m.mean(1)),
    "barlow_feature_tokens": lambda z, z_m: barlow_twins(z, z_m),
    "barlow_token": lambda z, z_m: barlow_twins(z, z_m, mode="token"),
    "barlow_token_joint": lambda z, z_m: barlow_twins(z, z_m, mode="token", batch_mode="joint"),
    "pyramid": lambda z, z_m: pyramid_barlow_twins([z, 2 * z], [z_m, z_m - 1]),
    "info_nce": lambda z, z_m: info_nce(z.mean(1), z_m.mean(1), temperature=0.1),
    "consistency": lambda z, z_m: consistency_loss(z, z_m),
    "reconstruction": lambda z, z_m: masked_reconstruction_loss(
        z.reshape(B, N, 1, 2, 4, 4).permute(0, 2, 1, 3, 4, 5).reshape(B, 1, N * 2, 4, 4),
        z_m.reshape(B, 1, N * 2, 4, 4).float(),
        on="all",
    ),
}


@pytest.mark.parametrize("constant_dim", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_autocast_is_finite_and_close_to_float32(name, dtype, constant_dim, device):
    layer, x, x_m = features(device, constant_dim)
    loss_fn = LOSSES[name]
    want = loss_fn(layer(x), layer(x_m))
    with torch.autocast(device.type, dtype=dtype):
        z, z_m = layer(x), layer(x_m)
        assert z.dtype == dtype
        got = loss_fn(z, z_m)
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-2)
    got.backward()
    assert torch.isfinite(layer.weight.grad).all()

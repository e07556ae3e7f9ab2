"""Whole training steps read nothing on the host: one E-MIM step and one BrainMVP step.

Each step runs forward and backward with the value checks off (``mrissl.checks("none")``, the
library's default) inside ``forbid_host_sync()``, which raises on ``bool(t)``, ``t.item()``,
``t.tolist()``, ``int(t)``, ``float(t)``, ``t.__index__()`` and ``nonzero``: every way Python
code reads a device tensor, so the test sees on the CPU what would stall a CUDA stream. On a
CUDA device the same steps also run under ``torch.cuda.set_sync_debug_mode("error")``, which
catches synchronisations inside torch's own kernels too.

* E-MIM: ``HybridMaskPattern``, ``apply_mask``, a timm 3D ViT with ``PatchEmbed3d`` seen through
  ``capture_intermediates``, ``PyramidBarlowTwinsLoss``, ``masked_reconstruction_loss``,
  backward, ``EffectiveRankMeter.update``.
* BrainMVP: ``BlockMask``, ``cross_modal_fill``, ``ModalityTemplates.fill``, ``info_nce`` and
  ``masked_reconstruction_loss``, backward (the templates get their gradient).

The ``stand-in`` variants replace the losses and the meter by plain sync-free computations
written here, so that they check the masking, template and nn pieces on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from _sync_guard import HostSyncError, forbid_host_sync
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mrissl
from mrissl.diagnostics import EffectiveRankMeter
from mrissl.losses import PyramidBarlowTwinsLoss, info_nce, masked_reconstruction_loss
from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    apply_mask,
    cross_modal_fill,
    mask_to_voxels,
)
from mrissl.nn import PatchEmbed3d, capture_intermediates, pyramid_levels, unpatchify
from mrissl.templates import ModalityTemplates

B, C, S, P, E, DEPTH = 2, 4, 16, 8, 32, 4
MODALITIES = ["t1", "t1ce", "t2", "flair"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _checks_off() -> Iterator[None]:
    with mrissl.checks("none"):
        yield


# --- plain sync-free stand-ins for the losses and the meter ----------------------------------


def _mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    err = (pred - target).square()
    if mask is None:
        return err.mean()
    w = mask.to(err.dtype)
    return (err * w).sum() / w.sum().clamp(min=1)


def _cross_correlation_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    za = (a - a.mean(0)) / (a.std(0) + 1e-6)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-6)
    c = za.T @ zb / a.shape[0]
    eye = torch.eye(c.shape[0], device=c.device)
    return (c - eye).square().sum()


class _GramMeter:
    def __init__(self, dim: int, device: torch.device) -> None:
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, z: torch.Tensor) -> None:
        x = z.detach().double()
        self.gram += x.T @ x


# --- the two steps -------------------------------------------------------------------------


def emim_step(device: torch.device, losses: str) -> Callable[[], Any]:
    """Build the models once; the returned step draws its masks anew on every call."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=S,
        patch_size=P,
        in_chans=C,
        embed_dim=E,
        depth=DEPTH,
        num_heads=2,
        num_classes=0,
        embed_layer=PatchEmbed3d,
    ).to(device)
    head = nn.Linear(E, C * P**3).to(device)
    levels = pyramid_levels(DEPTH, 2)
    pbt = PyramidBarlowTwinsLoss(levels)
    meter: Any = EffectiveRankMeter(E).to(device) if losses == "mrissl" else _GramMeter(E, device)
    hmp = HybridMaskPattern()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(B, C, S, S, S, device=device)

    def step() -> torch.Tensor:
        mask = hmp(x, P, generator=g)  # (B, C, N)
        x_m = apply_mask(x, mask, P)
        with capture_intermediates(vit, levels) as full:
            vit.forward_features(x)
        with capture_intermediates(vit, levels) as masked:
            vit.forward_features(x_m)
        pred = unpatchify(head(masked[-1]), P, S)  # (B, C, D, H, W)
        if losses == "mrissl":
            loss = masked_reconstruction_loss(pred, x, on="all") + pbt(full, masked)
        else:
            pairs = zip(full, masked, strict=True)
            pbt_like = sum(_cross_correlation_loss(f.mean(1), m.mean(1)) for f, m in pairs)
            loss = _mse(pred, x) + pbt_like
        loss.backward()
        meter.update(masked[-1].detach().flatten(0, 1))
        return loss.detach()

    return step


def brainmvp_step(device: torch.device, losses: str) -> Callable[[], Any]:
    """Build the network and templates once; the step masks, fills and trains."""
    torch.manual_seed(0)
    net = nn.Conv3d(1, 8, 4, stride=4).to(device)
    templates = ModalityTemplates(MODALITIES, shape=24).to(device)
    masker = BlockMask(4, mask_ratio=0.75)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(B, C, S, S, S, device=device)  # every modality of each case
    mods = torch.tensor([0, 2], device=device)  # the input modality of each case
    offsets = torch.tensor([[0, 4, 8], [8, 8, 8]], device=device)  # crops in the 24³ canvas
    cases = torch.arange(B, device=device)
    available = torch.tensor([[True, True, False, True], [True] * 4], device=device)

    def step() -> torch.Tensor:
        x_in = x[cases, mods][:, None]  # (B, 1, D, H, W): BrainMVP's single-modality input
        mask_f = masker(x, generator=g)  # (B, C, N)
        filled, _ = cross_modal_fill(x, mask_f, 4, available=available, generator=g)
        view_f = filled[cases, mods][:, None]
        vox_g = mask_to_voxels(masker(x_in, generator=g), 4, S)
        view_g = templates.fill(x_in, vox_g, mods, offsets)  # BrainMVP eq. 3
        z_f = net(view_f).mean(dim=(2, 3, 4))
        z_g = net(view_g).mean(dim=(2, 3, 4))
        if losses == "mrissl":
            loss = info_nce(z_f, z_g, temperature=0.1)
            loss = loss + masked_reconstruction_loss(view_g, x_in, vox_g)
        else:
            logits = nn.functional.normalize(z_f, dim=1) @ nn.functional.normalize(z_g, dim=1).T
            loss = nn.functional.cross_entropy(logits / 0.1, cases) + _mse(view_g, x_in, vox_g)
        loss.backward()
        return loss.detach()

    return step


STEPS = {"emim": emim_step, "brainmvp": brainmvp_step}


def _run_guarded(step: Callable[[], Any]) -> None:
    step()  # a first step outside the guard: lazy initialisation is not the step path
    with forbid_host_sync():
        loss = step()  # new masks, new fills, the same work
    assert torch.isfinite(loss).all()


# --- the guard itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "read",
    [
        lambda t: bool(t.sum() > 0),
        lambda t: t.sum().item(),
        lambda t: t.tolist(),
        lambda t: int(t.sum()),
        lambda t: float(t.sum()),
        lambda t: [0, 1][t.argmax()],  # __index__
        lambda t: t.nonzero(),
        lambda t: torch.nonzero(t),
    ],
)
def test_the_guard_catches_every_host_read_and_is_restored(read: Callable[[Any], Any]) -> None:
    t = torch.tensor([0.0, 2.0])
    with pytest.raises(HostSyncError), forbid_host_sync():
        read(t)
    read(t)  # restored


# --- the steps -----------------------------------------------------------------------------


@pytest.mark.parametrize("step", list(STEPS))
def test_step_with_stand_in_losses_reads_nothing_on_the_host(step: str) -> None:
    _run_guarded(STEPS[step](torch.device("cpu"), "stand-in"))


def test_brainmvp_step_reads_nothing_on_the_host() -> None:
    _run_guarded(brainmvp_step(torch.device("cpu"), "mrissl"))


def test_emim_step_reads_nothing_on_the_host() -> None:
    _run_guarded(emim_step(torch.device("cpu"), "mrissl"))


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("losses", ["mrissl", "stand-in"])
@pytest.mark.parametrize("step", list(STEPS))
def test_cuda_step_does_not_synchronise(step: str, losses: str) -> None:
    run = STEPS[step](torch.device("cuda"), losses)
    run()  # warm-up: cuBLAS handles, allocator, lazy modules
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with forbid_host_sync():
            run()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()

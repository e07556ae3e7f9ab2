"""Bad inputs per public function: each is a TypeError or ValueError that names the argument.

One table, one row per bad call: the module, a short name, the call, the exception type and a
word the message must contain (the argument's name, or the reason). None of these may surface
as an exception from inside torch, MONAI or nibabel, nor return a silent NaN. The value checks
(NaN/Inf) are on in every test (root ``conftest.py``); the offline paths check them always.

The rows are grouped by module; ``test_rows_cover_every_module`` counts them.
"""

from __future__ import annotations

import gzip
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pytest
import torch

from mrissl import diagnostics, losses, masking, templates
from mrissl import nn as mnn
from mrissl.data import PhantomDataset, find_cases, load_case, synthetic_phantom


class Row(NamedTuple):
    module: str
    name: str
    call: Callable[[], Any]
    error: type[Exception]
    says: str


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


X = torch.rand(2, 4, 8, 8, 8, generator=_g())  # (B, C, D, H, W), patch 4 -> 8 tokens
MASK = torch.rand(2, 4, 8, generator=_g()) < 0.5  # (B, C, N) token mask
VMASK = masking.mask_to_voxels(MASK, 4, 8)  # (B, C, D, H, W)
Z = torch.randn(16, 8, generator=_g())  # (B, E) features
TOKENS = torch.randn(2, 8, 6, generator=_g())  # (B, N, E)
LEVELS = [torch.randn(4, 8, 16, generator=_g()) for _ in range(2)]


def _with(value: float, like: torch.Tensor = Z) -> torch.Tensor:
    out = like.clone()
    out.view(-1)[3] = value
    return out


def _nifti(data: np.ndarray) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mrissl-bad-"))
    path = folder / "sub1_t1.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes()))
    return path


def _nan_volume() -> np.ndarray:
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    return data


def _pe(**kw: Any) -> mnn.PatchEmbed3d:
    return mnn.PatchEmbed3d(img_size=8, patch_size=4, in_chans=4, embed_dim=8, **kw)


def _floor(data: Any, **kw: Any) -> Any:
    kw.setdefault("patch_size", 4)
    return diagnostics.collapsed_loss_floor(data, masking.RandomTokenMask(0.5), **kw)


def _mix() -> templates.TemplateMix:
    t = templates.ModalityTemplates(["t1", "t1ce", "t2", "flair"], shape=8)
    return templates.TemplateMix(t, modalities=["t1", "t1ce", "t2", "flair"])


ROWS: list[Row] = [
    # ---------------------------------------------------------------- masking
    Row("masking", "ratio above 1", lambda: masking.RandomTokenMask(1.5), ValueError, "mask_ratio"),
    Row(
        "masking", "ratio below 0", lambda: masking.RandomTokenMask(-0.1), ValueError, "mask_ratio"
    ),
    Row(
        "masking",
        "ratio NaN",
        lambda: masking.RandomTokenMask(float("nan")),
        ValueError,
        "mask_ratio",
    ),
    Row(
        "masking", "ratio as text", lambda: masking.RandomTokenMask("0.5"), TypeError, "mask_ratio"
    ),  # type: ignore[arg-type]
    Row("masking", "position ratio 1", lambda: masking.PositionMask(1.0), ValueError, "mask_ratio"),
    Row("masking", "modal count 0", lambda: masking.ModalMask(0), ValueError, "num_masked"),
    Row(
        "masking",
        "generator as int seed",
        lambda: masking.RandomTokenMask(0.5)(X, 4, generator=0),  # type: ignore[arg-type]
        TypeError,
        "torch.Generator().manual_seed(0)",
    ),
    Row(
        "masking",
        "generator as text",
        lambda: masking.HybridMaskPattern()(X, 4, generator="seed"),  # type: ignore[arg-type]
        TypeError,
        "generator",
    ),
    Row(
        "masking",
        "sample with int generator",
        lambda: masking.PatchMask(0.5).sample(2, 4, 8, generator=1),  # type: ignore[arg-type]
        TypeError,
        "generator",
    ),
    Row(
        "masking",
        "block mask with int generator",
        lambda: masking.BlockMask(4, mask_ratio=0.5)(X, generator=0),  # type: ignore[arg-type]
        TypeError,
        "generator",
    ),
    Row(
        "masking",
        "patch not dividing",
        lambda: masking.RandomTokenMask(0.5)(X, 3),
        ValueError,
        "patch_size",
    ),
    Row(
        "masking",
        "4-D volume",
        lambda: masking.RandomTokenMask(0.5)(X[0], 4),
        ValueError,
        "volume",
    ),
    Row(
        "masking",
        "available wrong shape",
        lambda: masking.RandomTokenMask(0.5)(X, 4, available=torch.ones(2, 3, dtype=torch.bool)),
        ValueError,
        "available",
    ),
    Row(
        "masking",
        "available float",
        lambda: masking.RandomTokenMask(0.5)(X, 4, available=torch.ones(2, 4)),
        TypeError,
        "available",
    ),
    Row(
        "masking",
        "available row all False",
        lambda: masking.ModalMask(1)(X, 4, available=torch.zeros(2, 4, dtype=torch.bool)),
        ValueError,
        "available",
    ),
    Row(
        "masking",
        "apply unknown fill",
        lambda: masking.apply_mask(X, MASK, 4, "bogus"),
        ValueError,
        "fill",
    ),  # type: ignore[arg-type]
    Row(
        "masking",
        "apply integer volume",
        lambda: masking.apply_mask(X.long(), MASK, 4),
        TypeError,
        "volume",
    ),
    Row(
        "masking", "apply int mask", lambda: masking.apply_mask(X, MASK.int(), 4), TypeError, "mask"
    ),
    Row(
        "masking",
        "apply noise with int generator",
        lambda: masking.apply_mask(X, MASK, 4, "noise", generator=0),  # type: ignore[arg-type]
        TypeError,
        "generator",
    ),
    Row(
        "masking",
        "cross fill with int generator",
        lambda: masking.cross_modal_fill(X, MASK, 4, generator=0),  # type: ignore[arg-type]
        TypeError,
        "generator",
    ),
    Row(
        "masking",
        "cross fill token mask without patch",
        lambda: masking.cross_modal_fill(X, MASK),
        ValueError,
        "patch_size",
    ),
    Row(
        "masking",
        "cross fill mask of 3 modalities",
        lambda: masking.cross_modal_fill(X, MASK[:, :3], 4),
        ValueError,
        "mask",
    ),
    Row(
        "masking",
        "cross fill out with grad",
        lambda: masking.cross_modal_fill(
            X.clone().requires_grad_(), MASK, 4, out=torch.empty_like(X)
        ),
        ValueError,
        "out=",
    ),
    Row(
        "masking",
        "keep_indices float mask",
        lambda: masking.keep_indices(MASK.float()),
        TypeError,
        "mask",
    ),
    Row(
        "masking",
        "keep_indices negative num_kept",
        lambda: masking.keep_indices(MASK, num_kept=-1),
        ValueError,
        "num_kept",
    ),
    Row(
        "masking",
        "keep_indices ragged without pad",
        lambda: masking.keep_indices(torch.tensor([[True, False], [False, False]])),
        ValueError,
        "pad=True",
    ),
    Row(
        "masking",
        "mask_to_voxels patch not dividing",
        lambda: masking.mask_to_voxels(MASK, 3, 8),
        ValueError,
        "patch",
    ),
    Row(
        "masking",
        "voxels_to_mask unknown rule",
        lambda: masking.voxels_to_mask(VMASK, 4, rule="some"),
        ValueError,
        "rule",
    ),  # type: ignore[arg-type]
    Row(
        "masking",
        "target_mask available wrong shape",
        lambda: masking.target_mask(MASK, torch.ones(3, 4, dtype=torch.bool)),
        ValueError,
        "available",
    ),
    Row(
        "masking",
        "generator on an empty batch",
        lambda: masking.HybridMaskPattern()(X[:0], 4),
        ValueError,
        "volume must hold at least one case",
    ),
    # ---------------------------------------------------------------- losses
    Row("losses", "barlow shapes differ", lambda: losses.barlow_twins(Z, Z[:8]), ValueError, "z_b"),
    Row(
        "losses",
        "barlow integer features",
        lambda: losses.barlow_twins(Z.long(), Z.long()),
        TypeError,
        "z_a",
    ),
    Row(
        "losses",
        "barlow NaN",
        lambda: losses.barlow_twins(_with(float("nan")), Z),
        ValueError,
        "z_a",
    ),
    Row(
        "losses",
        "barlow Inf",
        lambda: losses.barlow_twins(Z, _with(float("inf"))),
        ValueError,
        "z_b",
    ),
    Row(
        "losses",
        "barlow unknown mode",
        lambda: losses.barlow_twins(Z, Z, mode="x"),
        ValueError,
        "mode",
    ),  # type: ignore[arg-type]
    Row(
        "losses",
        "barlow negative lambda",
        lambda: losses.barlow_twins(Z, Z, lambda_offdiag=-1.0),
        ValueError,
        "lambda_offdiag",
    ),
    Row(
        "losses",
        "barlow module unknown mode",
        lambda: losses.BarlowTwinsLoss(mode="x"),
        ValueError,
        "mode",
    ),  # type: ignore[arg-type]
    Row(
        "losses",
        "info_nce zero temperature",
        lambda: losses.info_nce(Z, Z, temperature=0.0),
        ValueError,
        "temperature",
    ),
    Row(
        "losses",
        "info_nce NaN temperature",
        lambda: losses.info_nce(Z, Z, temperature=float("nan")),
        ValueError,
        "temperature",
    ),
    Row("losses", "info_nce dims differ", lambda: losses.info_nce(Z, Z[:, :3]), ValueError, "z_b"),
    Row(
        "losses", "info_nce NaN", lambda: losses.info_nce(_with(float("nan")), Z), ValueError, "z_a"
    ),
    Row(
        "losses",
        "info_nce module negative temperature",
        lambda: losses.InfoNCELoss(temperature=-1.0),
        ValueError,
        "temperature",
    ),
    Row(
        "losses",
        "consistency shapes differ",
        lambda: losses.consistency_loss(Z, Z[:2]),
        ValueError,
        "z_b",
    ),
    Row(
        "losses",
        "consistency unknown metric",
        lambda: losses.consistency_loss(Z, Z, metric="l1"),
        ValueError,
        "metric",
    ),  # type: ignore[arg-type]
    Row(
        "losses",
        "norm_pix over one voxel",
        lambda: losses.masked_reconstruction_loss(
            X, X, MASK.repeat_interleave(64, 2), patch_size=1, norm_pix=True
        ),
        ValueError,
        "variance",
    ),
    Row(
        "losses",
        "norm_pix stacked one modality one voxel",
        lambda: losses.masked_reconstruction_loss(
            torch.rand(2, 512, 1), X[:, :1], patch_size=1, norm_pix=True, on="all"
        ),
        ValueError,
        "norm_pix",
    ),
    Row(
        "losses",
        "reconstruction token mask without patch",
        lambda: losses.masked_reconstruction_loss(X, X, MASK),
        ValueError,
        "patch_size",
    ),
    Row(
        "losses",
        "reconstruction NaN pred",
        lambda: losses.masked_reconstruction_loss(_with(float("nan"), X), X, VMASK),
        ValueError,
        "pred",
    ),
    Row(
        "losses",
        "reconstruction float mask",
        lambda: losses.masked_reconstruction_loss(X, X, MASK.float(), patch_size=4),
        TypeError,
        "mask",
    ),
    Row(
        "losses",
        "pyramid no levels",
        lambda: losses.pyramid_barlow_twins([], []),
        ValueError,
        "levels",
    ),
    Row(
        "losses",
        "pyramid keep of floats",
        lambda: losses.pyramid_barlow_twins(LEVELS, LEVELS, keep=[[0.5, 1.0]] * 4),
        TypeError,
        "keep",
    ),
    Row(
        "losses",
        "pyramid keep ragged list",
        lambda: losses.pyramid_barlow_twins(LEVELS, LEVELS, keep=[[0, 1], [2]]),
        TypeError,
        "keep",
    ),
    Row(
        "losses",
        "pyramid keep out of range",
        lambda: losses.pyramid_barlow_twins(LEVELS, [t[:, :2] for t in LEVELS], keep=[[0, 99]] * 4),
        ValueError,
        "keep",
    ),
    Row(
        "losses",
        "pyramid keep 1-D",
        lambda: losses.pyramid_barlow_twins(LEVELS, LEVELS, keep=[0, 1]),
        ValueError,
        "keep",
    ),
    Row(
        "losses",
        "pyramid weights wrong length",
        lambda: losses.pyramid_barlow_twins(LEVELS, LEVELS, weights=[1.0]),
        ValueError,
        "weights",
    ),
    Row(
        "losses",
        "pyramid module zero levels",
        lambda: losses.PyramidBarlowTwinsLoss(levels=0),
        ValueError,
        "levels",
    ),
    # ---------------------------------------------------------------- nn
    Row(
        "nn",
        "fp16 input, fp32 weights",
        lambda: _pe()(X.half()),
        TypeError,
        "x has dtype torch.float16",
    ),
    Row("nn", "bf16 input, fp32 weights", lambda: _pe()(X.bfloat16()), TypeError, "autocast"),
    Row("nn", "wrong channel count", lambda: _pe()(X[:, :3]), ValueError, "in_chans"),
    Row("nn", "integer input", lambda: _pe()(X.long()), TypeError, "x"),
    Row("nn", "patch size 0", lambda: mnn.PatchEmbed3d(patch_size=0), ValueError, "patch_size"),
    Row(
        "nn", "negative embed_dim", lambda: mnn.PatchEmbed3d(embed_dim=-1), ValueError, "embed_dim"
    ),
    Row("nn", "patchify not dividing", lambda: mnn.patchify(X, 3), ValueError, "patch"),
    Row(
        "nn",
        "patchify unknown layout",
        lambda: mnn.patchify(X, 4, layout="x"),
        ValueError,
        "layout",
    ),  # type: ignore[arg-type]
    Row(
        "nn",
        "unpatchify wrong size",
        lambda: mnn.unpatchify(mnn.patchify(X, 4), 4, 12),
        ValueError,
        "patches",
    ),
    Row("nn", "pos embed odd dim", lambda: mnn.sincos_pos_embed_3d(4, 10), ValueError, "dim"),
    Row("nn", "pos embed empty grid", lambda: mnn.sincos_pos_embed_3d(0, 12), ValueError, "grid"),
    Row("nn", "pyramid_levels zero", lambda: mnn.pyramid_levels(12, 0), ValueError, "levels"),
    Row(
        "nn", "pyramid_levels beyond depth", lambda: mnn.pyramid_levels(2, 4), ValueError, "levels"
    ),
    Row(
        "nn",
        "gather float list",
        lambda: mnn.gather_tokens(TOKENS, [[0.5], [1.0]]),
        TypeError,
        "index",
    ),
    Row(
        "nn",
        "gather index out of range",
        lambda: mnn.gather_tokens(TOKENS, [[0], [9]]),
        ValueError,
        "index",
    ),
    Row(
        "nn",
        "gather bool index",
        lambda: mnn.gather_tokens(TOKENS, torch.ones(2, 1, dtype=torch.bool)),
        TypeError,
        "index",
    ),
    Row(
        "nn",
        "scatter length too short",
        lambda: mnn.scatter_tokens(TOKENS, [[0] * 8] * 2, 1),
        ValueError,
        "length",
    ),
    Row(
        "nn",
        "scatter fill as text",
        lambda: mnn.scatter_tokens(TOKENS, [[0] * 8] * 2, 8, fill="0"),  # type: ignore[arg-type]
        TypeError,
        "fill",
    ),
    Row("nn", "grid not dividing", lambda: mnn.grid_size(8, 3), ValueError, "patch"),
    # ---------------------------------------------------------------- diagnostics
    Row(
        "diagnostics", "floor NaN voxel", lambda: _floor(_with(float("nan"), X)), ValueError, "data"
    ),
    Row(
        "diagnostics", "floor Inf voxel", lambda: _floor(_with(float("inf"), X)), ValueError, "data"
    ),
    Row(
        "diagnostics",
        "floor empty tensor",
        lambda: _floor(X[:0]),
        ValueError,
        "data must hold at least one volume",
    ),
    Row(
        "diagnostics", "floor int generator", lambda: _floor(X, generator=0), TypeError, "generator"
    ),
    Row("diagnostics", "floor two draws", lambda: _floor(X, num_draws=2), ValueError, "num_draws"),
    Row(
        "diagnostics",
        "floor NaN in a dataset",
        lambda: _floor([_with(float("nan"), X[0])]),
        ValueError,
        "NaN",
    ),
    Row(
        "diagnostics",
        "floor meter NaN",
        lambda: diagnostics.CollapseFloorMeter(masking.RandomTokenMask(0.5), patch_size=4).update(
            _with(float("nan"), X)
        ),
        ValueError,
        "volume",
    ),
    Row(
        "diagnostics",
        "floor meter int generator",
        lambda: diagnostics.CollapseFloorMeter(
            masking.RandomTokenMask(0.5), patch_size=4, generator=3
        ),
        TypeError,
        "generator",
    ),  # type: ignore[arg-type]
    Row(
        "diagnostics",
        "singular values NaN",
        lambda: diagnostics.singular_values(_with(float("nan"))),
        ValueError,
        "z",
    ),
    Row(
        "diagnostics",
        "singular values 1-D",
        lambda: diagnostics.singular_values(Z[0]),
        ValueError,
        "z",
    ),
    Row(
        "diagnostics",
        "effective rank negative spectrum",
        lambda: diagnostics.effective_rank(torch.tensor([-1.0, 2.0])),
        ValueError,
        "spectrum",
    ),
    Row(
        "diagnostics",
        "effective rank empty spectrum",
        lambda: diagnostics.effective_rank(torch.zeros(0)),
        ValueError,
        "spectrum",
    ),
    Row(
        "diagnostics",
        "rankme negative eps",
        lambda: diagnostics.rankme(Z, eps=-1.0),
        ValueError,
        "eps",
    ),
    Row(
        "diagnostics",
        "std of integer features",
        lambda: diagnostics.std_of_l2_normalized(Z.long()),
        TypeError,
        "z",
    ),
    Row(
        "diagnostics",
        "meter zero dim",
        lambda: diagnostics.EffectiveRankMeter(0),
        ValueError,
        "dim",
    ),
    Row(
        "diagnostics",
        "meter wrong dim",
        lambda: diagnostics.EffectiveRankMeter(4).update(Z),
        ValueError,
        "z",
    ),
    Row(
        "diagnostics",
        "meter NaN",
        lambda: diagnostics.EffectiveRankMeter(8).update(_with(float("nan"))),
        ValueError,
        "z",
    ),
    Row(
        "diagnostics",
        "monitor negative tolerance",
        lambda: diagnostics.CollapseMonitor(8, tolerance=-1.0),
        ValueError,
        "tolerance",
    ),
    # ---------------------------------------------------------------- templates
    Row(
        "templates",
        "init tensor NaN",
        lambda: templates.ModalityTemplates(
            ["t1"], shape=4, init=torch.full((1, 4, 4, 4), float("nan"))
        ),
        ValueError,
        "init",
    ),
    Row(
        "templates",
        "init tensor Inf",
        lambda: templates.ModalityTemplates(
            ["t1"], shape=4, init=_with(float("inf"), torch.zeros(1, 4, 4, 4))
        ),
        ValueError,
        "init",
    ),
    Row(
        "templates",
        "init number NaN",
        lambda: templates.ModalityTemplates(["t1"], shape=4, init=float("nan")),
        ValueError,
        "init",
    ),
    Row(
        "templates",
        "init unknown text",
        lambda: templates.ModalityTemplates(["t1"], shape=4, init="ones"),
        ValueError,
        "init",
    ),  # type: ignore[arg-type]
    Row(
        "templates",
        "init integer tensor",
        lambda: templates.ModalityTemplates(
            ["t1"], shape=4, init=torch.zeros(1, 4, 4, 4, dtype=torch.long)
        ),
        TypeError,
        "init",
    ),
    Row(
        "templates",
        "canvas 0",
        lambda: templates.ModalityTemplates(["t1"], shape=0),
        ValueError,
        "shape",
    ),
    Row(
        "templates",
        "unknown modality",
        lambda: templates.ModalityTemplates(["t7"], shape=4),
        ValueError,
        "t7",
    ),
    Row(
        "templates",
        "fill unknown modality",
        lambda: templates.ModalityTemplates(["t1"], shape=8).fill(X[:, :1], VMASK[:, :1], ["t2"]),
        ValueError,
        "t2",
    ),
    Row("templates", "mix int generator", lambda: _mix()(X, generator=0), TypeError, "generator"),  # type: ignore[arg-type]
    Row(
        "templates",
        "template_fill float mask",
        lambda: templates.template_fill(
            X, VMASK.float(), torch.zeros(4, 8, 8, 8), torch.arange(4).expand(2, 4)
        ),
        TypeError,
        "voxel_mask",
    ),
    Row(
        "templates",
        "crop offsets out of canvas",
        lambda: templates.crop_templates(
            torch.zeros(4, 8, 8, 8), torch.arange(4).expand(2, 4), [6, 6, 6], 4
        ),
        ValueError,
        "offsets",
    ),
    # ---------------------------------------------------------------- data
    Row("data", "phantom shape 0", lambda: synthetic_phantom(0), ValueError, "shape"),
    Row(
        "data",
        "phantom no dwi contrast",
        lambda: synthetic_phantom(8, ["dwi"]),
        ValueError,
        "modalities",
    ),
    Row(
        "data",
        "phantom generator as text",
        lambda: synthetic_phantom(8, generator="x"),
        TypeError,
        "generator",
    ),  # type: ignore[arg-type]
    Row(
        "data",
        "phantom negative noise",
        lambda: synthetic_phantom(8, noise=-1.0),
        ValueError,
        "noise",
    ),
    Row("data", "phantom dataset negative n", lambda: PhantomDataset(-1), ValueError, "n"),
    Row("data", "load_case empty mapping", lambda: load_case({}), ValueError, "paths"),
    Row("data", "load_case list", lambda: load_case(["a.nii.gz"]), TypeError, "paths"),  # type: ignore[arg-type]
    Row(
        "data",
        "load_case NaN voxel",
        lambda: load_case({"t1": _nifti(_nan_volume())}),
        ValueError,
        "NaN",
    ),
    Row(
        "data",
        "load_case complex voxels",
        lambda: load_case({"t1": _nifti(np.zeros((3, 3, 3), np.complex64))}),
        ValueError,
        "real numbers",
    ),
    Row(
        "data",
        "load_case 2-D image",
        lambda: load_case({"t1": _nifti(np.zeros((3, 3), np.float32))}),
        ValueError,
        "3D",
    ),
    Row(
        "data",
        "find_cases missing folder",
        lambda: find_cases("/nonexistent/mrissl", ["t1"]),
        FileNotFoundError,
        "does not exist",
    ),
    Row(
        "data",
        "find_cases unknown modality",
        lambda: find_cases(tempfile.gettempdir(), ["t7"]),
        ValueError,
        "t7",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.module}: {r.name}" for r in ROWS])
def test_bad_input_is_a_clear_error(row: Row) -> None:
    with pytest.raises(row.error, match=re.escape(row.says)) as info:
        row.call()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    # raised by mrissl's own checks, not from inside torch, MONAI or nibabel
    frames = [f for f in info.traceback if "site-packages" not in str(f.path)]
    assert "mrissl" in str(frames[-1].path), info.traceback[-1]


def test_rows_cover_every_module() -> None:
    counts = Counter(r.module for r in ROWS)
    assert set(counts) == {"masking", "losses", "nn", "diagnostics", "templates", "data"}
    assert min(counts.values()) >= 8, counts


# ---------------------------------------------------------------- what users naturally pass


def test_keep_as_a_list_equals_keep_as_a_tensor() -> None:
    keep = [[0, 1, 5], [2, 3, 7], [1, 4, 6], [0, 2, 3]]
    masked = [t[:, :3] for t in LEVELS]
    as_list = losses.pyramid_barlow_twins(LEVELS, masked, keep=keep)
    as_tensor = losses.pyramid_barlow_twins(LEVELS, masked, keep=torch.tensor(keep))
    assert torch.equal(as_list, as_tensor)


def test_gather_tokens_accepts_a_list_of_positions() -> None:
    picked = mnn.gather_tokens(TOKENS, [[2], [0]])
    assert torch.equal(picked[:, 0], torch.stack([TOKENS[0, 2], TOKENS[1, 0]]))


@pytest.mark.parametrize("layout", ["stacked", "per_modality"])
@pytest.mark.parametrize("grad", [True, False])
def test_patch_embed_on_an_empty_batch_gives_no_tokens(layout: str, grad: bool) -> None:
    pe = _pe(layout=layout)
    with torch.set_grad_enabled(grad):
        tokens = pe(X[:0])
    expected = pe(X[:1])
    assert tokens.shape == (0, *expected.shape[1:])


def test_patch_embed_half_input_runs_under_autocast() -> None:
    pe = _pe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pe(X.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), pe(X), atol=0.1)


def test_keep_indices_on_an_empty_batch_keeps_nothing() -> None:
    keep, restore, padding = masking.keep_indices(MASK[:0])
    assert keep.shape == (0, 0)
    assert restore.shape == (0, 32)
    assert padding.shape == (0, 0)
    assert masking.keep_indices(MASK[:0], num_kept=5).keep.shape == (0, 5)


@pytest.mark.parametrize("mask", [MASK, VMASK], ids=["token mask", "voxel mask"])
def test_cross_modal_fill_carries_gradients(mask: torch.Tensor) -> None:
    x = X.clone().requires_grad_()
    filled, source = masking.cross_modal_fill(x, mask, 4, generator=_g())
    plain, plain_source = masking.cross_modal_fill(X, mask, 4, generator=_g())
    assert torch.equal(filled, plain)
    assert torch.equal(source, plain_source)
    filled.sum().backward()
    # every output voxel copies one input voxel: the gradient counts how often each is copied
    counts = torch.zeros_like(X)
    voxels = mask if mask.ndim == 5 else masking.mask_to_voxels(mask, 4, 8)
    for b in range(2):
        for c in range(4):
            s = int(source[b, c])
            counts[b, c] += (~voxels[b, c]).float()
            if s >= 0:
                counts[b, s] += voxels[b, c].float()
    assert torch.equal(x.grad, counts)


def test_scatter_tokens_accepts_a_list_as_the_mask_token() -> None:
    index = [[0, 2, 4, 6, 8, 10, 12, 14]] * 2
    as_list = mnn.scatter_tokens(TOKENS, index, 16, fill=[0.5] * 6)
    as_tensor = mnn.scatter_tokens(TOKENS, torch.tensor(index), 16, fill=torch.full((6,), 0.5))
    assert torch.equal(as_list, as_tensor)


def test_cross_modal_fill_on_an_empty_batch_fills_nothing() -> None:
    for mask in (MASK[:0], VMASK[:0]):
        filled, source = masking.cross_modal_fill(X[:0], mask, 4)
        assert filled.shape == X[:0].shape
        assert source.shape == (0, 4)

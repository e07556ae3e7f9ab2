from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mrissl.templates import ModalityTemplates, crop_templates, template_fill

MODS = ["t1", "t1ce", "t2", "flair"]


def _reference_fill(volume, mask, canvas, ids, offsets, padding="error"):
    """A plain NumPy loop over cases, channels and voxels."""
    v, m, T = volume.numpy(), mask.numpy(), canvas.detach().numpy()
    ids, offsets = ids.numpy(), offsets.numpy()
    out = v.copy()
    B, C, d, h, w = v.shape
    _, D, H, W = T.shape
    for b in range(B):
        for c in range(C):
            for i in range(d):
                for j in range(h):
                    for k in range(w):
                        if not m[b, c if m.shape[1] > 1 else 0, i, j, k]:
                            continue
                        p = offsets[b] + (i, j, k)
                        if padding == "border":
                            p = np.clip(p, 0, (D - 1, H - 1, W - 1))
                        inside = all(0 <= p[a] < (D, H, W)[a] for a in range(3))
                        out[b, c, i, j, k] = T[ids[b, c], p[0], p[1], p[2]] if inside else 0.0
    return out


def _setup(gen, B=3, C=2, crop=(4, 5, 3), canvas=(7, 8, 6)):
    T = torch.randn(4, *canvas, generator=gen)
    x = torch.rand(B, C, *crop, generator=gen)
    mask = torch.rand(B, C, *crop, generator=gen) < 0.6
    ids = torch.randint(0, 4, (B, C), generator=gen)
    hi = torch.tensor([c - s for c, s in zip(canvas, crop, strict=True)])
    offsets = (torch.rand(B, 3, generator=gen) * (hi + 1)).long()
    return T, x, mask, ids, offsets


def test_fill_matches_numpy_reference(gen, device):
    T, x, mask, ids, offsets = _setup(gen)
    out = template_fill(x.to(device), mask.to(device), T.to(device), ids.to(device), offsets)
    np.testing.assert_array_equal(out.cpu().numpy(), _reference_fill(x, mask, T, ids, offsets))


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_padding_rules_match_reference(gen, padding):
    T, x, mask, ids, _ = _setup(gen)
    offsets = torch.tensor([[-2, 0, 0], [5, 6, 4], [1, -3, 5]])
    out = template_fill(x, mask, T, ids, offsets, padding=padding)
    np.testing.assert_array_equal(out.numpy(), _reference_fill(x, mask, T, ids, offsets, padding))


def test_only_masked_voxels_change(gen):
    templates = ModalityTemplates(MODS, shape=(8, 8, 8), init=5.0)
    x = torch.rand(2, 4, 6, 6, 6, generator=gen)
    mask = torch.rand(2, 4, 6, 6, 6, generator=gen) < 0.3
    out = templates.fill(x, mask, MODS, offsets=torch.tensor([[0, 1, 2], [2, 2, 2]]))
    assert torch.equal(out[~mask], x[~mask])
    assert bool((out[mask] == 5.0).all())


def test_gradients_reach_exactly_the_used_template_voxels(gen, device):
    T, x, mask, ids, offsets = _setup(gen)
    ids[1] = ids[0]  # two cases reading one template, overlapping crops: counts add up
    offsets[1] = offsets[0]
    canvas = T.to(device).requires_grad_(True)
    out = template_fill(x.to(device), mask.to(device), canvas, ids.to(device), offsets)
    out.sum().backward()
    expected = np.zeros(T.shape)
    for b, c, i, j, k in zip(*np.nonzero(mask.numpy()), strict=True):
        o = offsets[b].numpy()
        expected[ids[b, c], o[0] + i, o[1] + j, o[2] + k] += 1
    np.testing.assert_array_equal(canvas.grad.cpu().numpy(), expected)


def test_gradients_with_zero_padding_skip_outside_voxels(gen):
    canvas = torch.zeros(1, 4, 4, 4, requires_grad=True)
    x = torch.zeros(1, 1, 4, 4, 4)
    mask = torch.ones_like(x, dtype=torch.bool)
    ids, offsets = torch.tensor([0]), torch.tensor([2, 0, 0])
    template_fill(x, mask, canvas, ids, offsets, padding="zeros").sum().backward()
    assert int(canvas.grad.sum()) == 2 * 16
    assert bool((canvas.grad[0, 2:] == 1).all())
    assert bool((canvas.grad[0, :2] == 0).all())


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    C=st.integers(1, 3),
    crop=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    seed=st.integers(0, 2**16),
)
def test_fill_is_where_of_crops(B, C, crop, extra, seed):
    g = torch.Generator().manual_seed(seed)
    canvas = tuple(c + e for c, e in zip(crop, extra, strict=True))
    T, x, mask, ids, offsets = _setup(g, B, C, crop, canvas)
    out = template_fill(x, mask, T, ids, offsets)
    crops = crop_templates(T, ids, offsets, crop)
    assert torch.equal(out, torch.where(mask, crops, x))
    np.testing.assert_array_equal(out.numpy(), _reference_fill(x, mask, T, ids, offsets))


def test_none_offsets_centre_the_crop():
    T = torch.arange(6.0**3).view(1, 6, 6, 6)
    crops = crop_templates(T, torch.zeros(1, 1, dtype=torch.long), None, 2)
    assert torch.equal(crops[0, 0], T[0, 2:4, 2:4, 2:4])


def test_fill_under_autocast_keeps_volume_dtype(device):
    templates = ModalityTemplates(MODS, shape=8, init=0.25).to(device)
    x = torch.rand(2, 1, 4, 4, 4, device=device, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 4, 4, 4, dtype=torch.bool, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = templates.fill(x, mask, templates.index(["t2", "flair"]), offsets=[1, 1, 1])
    assert out.dtype == torch.bfloat16
    assert bool((out == 0.25).all())


# ---- normalisation ---------------------------------------------------------------------


def test_sigmoid_normalisation_is_safe_at_zero_init():
    templates = ModalityTemplates(["t1"], shape=6, normalize="sigmoid")
    x, mask = torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4, 4, dtype=torch.bool)
    out = templates.fill(x, mask, ["t1"])
    assert bool((out == 0.5).all())
    out.sum().backward()
    assert bool(torch.isfinite(templates.weight.grad).all())
    assert float(templates.weight.grad.max()) == pytest.approx(0.25)


def test_minmax_normalisation_is_safe_for_a_constant_template():
    templates = ModalityTemplates(["t1", "t2"], shape=6, normalize="minmax", eps=1e-2)
    x, mask = torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 4, 4, 4, dtype=torch.bool)
    out = templates.fill(x, mask, torch.tensor([0, 1]))
    assert bool((out == 0).all())
    out.square().sum().backward()  # upstream gradient 0 at the output 0
    ((templates.fill(x, mask, torch.tensor([0, 1])) - 1).square().sum()).backward()
    grad = templates.weight.grad
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().max()) <= 2 * 64 / 1e-2 * 2  # bounded by 1/eps, not 1e9


def test_minmax_normalisation_maps_to_unit_range():
    w = torch.linspace(-3, 5, 2 * 4**3).view(2, 4, 4, 4)
    templates = ModalityTemplates(["t1", "t2"], shape=4, init=w, normalize="minmax")
    norm = templates.normalized()
    assert torch.allclose(norm.amin(dim=(1, 2, 3)), torch.zeros(2))
    assert torch.allclose(norm.amax(dim=(1, 2, 3)), torch.ones(2))
    crops = templates.crop(torch.tensor([[1, 0]]), 2, offsets=[1, 1, 1])
    assert torch.allclose(crops[0, 0], norm[1, 1:3, 1:3, 1:3])


# ---- names, bad input ------------------------------------------------------------------


def test_names_are_case_insensitive_with_aliases():
    templates = ModalityTemplates(["T1", "T1Gd", "T2", "t2f"], shape=4)
    assert templates.modalities == ("t1", "t1ce", "t2", "flair")
    assert templates.index(["t1c", "FLAIR", "t1-gd"]).tolist() == [1, 3, 1]


def test_unknown_modality_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown modality 'swi'.*known modalities: t1"):
        ModalityTemplates(["t1", "swi"], shape=4)
    with pytest.raises(ValueError, match=r"has no template; the templates are \['t1', 't2'\]"):
        ModalityTemplates(["t1", "t2"], shape=4).index("flair")


def test_offsets_outside_the_canvas_raise(gen):
    templates = ModalityTemplates(MODS, shape=8)
    x, mask = torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 4, 4, 4, dtype=torch.bool)
    for bad in ([[0, 0, 0], [5, 0, 0]], [[0, -1, 0], [0, 0, 0]]):
        with pytest.raises(ValueError, match=r"offsets put crops .* outside the template canvas"):
            templates.fill(x, mask, torch.tensor([0, 1]), offsets=torch.tensor(bad))


def test_crop_larger_than_canvas_raises():
    templates = ModalityTemplates(MODS, shape=(8, 8, 8))
    x, mask = torch.zeros(1, 1, 9, 4, 4), torch.ones(1, 1, 9, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"crop \(9, 4, 4\) is larger than the template canvas"):
        templates.fill(x, mask, ["t1"])


def test_bad_arguments_name_themselves():
    templates = ModalityTemplates(MODS, shape=8)
    x, mask = torch.zeros(2, 2, 4, 4, 4), torch.ones(2, 2, 4, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="modality_ids must have shape"):
        templates.fill(x, mask, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="modality_ids must index the 4 templates"):
        templates.fill(x, mask, torch.full((2, 2), 4))
    with pytest.raises(TypeError, match="voxel_mask must be a bool"):
        templates.fill(x, mask.float(), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="voxel_mask must have shape"):
        templates.fill(x, mask[:, :, :2], torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="normalize must be one of"):
        ModalityTemplates(MODS, shape=8, normalize="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init tensor must have the template shape"):
        ModalityTemplates(MODS, shape=8, init=torch.zeros(3, 8, 8, 8))


# ---- optimiser, state, files -----------------------------------------------------------


def test_parameter_groups_give_templates_their_own_lr_without_duplicates():
    model = nn.ModuleDict({"net": nn.Linear(3, 3), "templates": ModalityTemplates(MODS, shape=4)})
    groups = model["templates"].parameter_groups(5e-3, model=model)
    opt = torch.optim.Adam(groups, lr=3e-4)
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 5e-3]
    assert opt.param_groups[1]["params"][0] is model["templates"].weight
    assert len(opt.param_groups[0]["params"]) == 2


def test_state_dict_round_trip_with_weights_only_load(tmp_path):
    w = torch.randn(2, 3, 4, 5)
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    t = ModalityTemplates(
        ["T1Gd", "t2f"], shape=(3, 4, 5), init=w, normalize="sigmoid", affine=affine
    )
    model = nn.ModuleDict({"encoder": nn.Linear(2, 2), "templates": t})
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    back = ModalityTemplates.from_state_dict(state)
    same = ModalityTemplates.from_state_dict(state["model"], prefix="templates.")
    for r in (back, same):
        assert r.modalities == ("t1ce", "flair")
        assert r.normalize == "sigmoid"
        assert torch.equal(r.weight, w)
        assert torch.equal(r.affine, affine)
    fresh = ModalityTemplates(["t1ce", "flair"], shape=(3, 4, 5))
    fresh.load_state_dict(t.state_dict())
    assert torch.equal(fresh.weight, w)
    assert fresh.normalize == "sigmoid"


def test_states_and_files_saved_with_the_old_normalise_spelling_still_load(tmp_path):
    import nibabel as nib

    w = torch.randn(1, 3, 3, 3)
    t = ModalityTemplates(["t1"], shape=3, init=w, normalize="minmax")
    state = t.state_dict()
    extra = dict(state["_extra_state"])
    extra["normalise"] = extra.pop("normalize")  # as written before the rename
    state["_extra_state"] = extra
    assert ModalityTemplates.from_state_dict(state).normalize == "minmax"
    fresh = ModalityTemplates(["t1"], shape=3)
    fresh.load_state_dict(state)
    assert fresh.normalize == "minmax"
    (path,) = t.to_nifti(tmp_path, normalized=False)
    img = nib.load(path)
    descrip = bytes(img.header["descrip"]).split(b"\0")[0].decode()
    assert descrip.endswith("normalize=minmax")
    img.header["descrip"] = descrip.replace("normalize=", "normalise=").encode()
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), path)
    back = ModalityTemplates.from_nifti(tmp_path)
    assert back.normalize == "minmax"
    assert torch.equal(back.weight, w)


def test_load_state_dict_with_other_modalities_raises():
    t = ModalityTemplates(["t1", "t2"], shape=4)
    with pytest.raises(ValueError, match=r"holds templates for \['t1', 't2'\]"):
        ModalityTemplates(["t1", "flair"], shape=4).load_state_dict(t.state_dict())


def test_from_state_dict_without_templates_raises():
    with pytest.raises(ValueError, match="holds no ModalityTemplates"):
        ModalityTemplates.from_state_dict(nn.Linear(2, 2).state_dict())


def test_nifti_round_trip_preserves_data_affine_and_names(tmp_path, gen):
    w = torch.randn(3, 4, 5, 6, generator=gen)
    affine = torch.tensor(
        [[0, -1.0, 0, 90], [1.0, 0, 0, -126], [0, 0, 1.2, -72], [0, 0, 0, 1]], dtype=torch.float64
    )
    t = ModalityTemplates(["flair", "t1", "T1Gd"], shape=(4, 5, 6), init=w, affine=affine)
    paths = t.to_nifti(tmp_path)
    assert [p.name for p in paths] == ["flair.nii.gz", "t1.nii.gz", "t1ce.nii.gz"]
    back = ModalityTemplates.from_nifti(tmp_path)
    assert back.modalities == ("flair", "t1", "t1ce")  # template order, not file order
    assert torch.equal(back.weight, w)
    assert torch.allclose(back.affine, affine)
    picked = ModalityTemplates.from_nifti(tmp_path, ["t1c", "FLAIR"])
    assert picked.modalities == ("t1ce", "flair")
    assert torch.equal(picked.weight, w[[2, 0]])


def test_nifti_export_of_normalised_templates_fills_alike(tmp_path, gen):
    w = torch.randn(1, 6, 6, 6, generator=gen)
    t = ModalityTemplates(["t1"], shape=6, init=w, normalize="sigmoid")
    t.to_nifti(tmp_path)
    back = ModalityTemplates.from_nifti(tmp_path)
    assert back.normalize == "none"
    x, mask = torch.zeros(1, 1, 3, 3, 3), torch.rand(1, 1, 3, 3, 3, generator=gen) < 0.5
    offsets = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(t.fill(x, mask, ["t1"], offsets), back.fill(x, mask, ["t1"], offsets))


def test_from_nifti_reports_missing_modalities(tmp_path):
    ModalityTemplates(["t1"], shape=4).to_nifti(tmp_path)
    with pytest.raises(ValueError, match=r"has no file for \['t2'\]"):
        ModalityTemplates.from_nifti(tmp_path, ["t1", "t2"])


def test_from_nifti_rejects_files_on_different_grids_naming_both(tmp_path):
    ModalityTemplates(["t1"], shape=4).to_nifti(tmp_path)
    ModalityTemplates(["t2"], shape=(4, 4, 5)).to_nifti(tmp_path)
    with pytest.raises(ValueError, match=r"t2\.nii\.gz .*shape \(4, 4, 5\), but .*t1\.nii\.gz"):
        ModalityTemplates.from_nifti(tmp_path, ["t1", "t2"])
    shifted = torch.eye(4, dtype=torch.float64)
    shifted[0, 3] = 0.5  # half a millimetre: beyond the 1e-3 tolerance of load_case
    ModalityTemplates(["flair"], shape=4, affine=shifted).to_nifti(tmp_path)
    with pytest.raises(ValueError, match=r"flair\.nii\.gz .*affine that differs .* by up to 0\.5"):
        ModalityTemplates.from_nifti(tmp_path, ["t1", "flair"])


def test_from_nifti_names_plain_files_by_their_name_after_the_recorded_ones(tmp_path):
    import nibabel as nib

    for name, value in (("T2w.nii.gz", 2.0), ("t1.nii", 1.0)):  # no mrissl header
        nib.save(nib.Nifti1Image(np.full((3, 3, 3), value, np.float32), np.eye(4)), tmp_path / name)
    plain = ModalityTemplates.from_nifti(tmp_path)
    assert plain.modalities == ("t1", "t2")  # canonical names, sorted
    assert plain.weight[:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert plain.normalize == "none"
    ModalityTemplates(["t2f"], shape=3, init=3.0).to_nifti(tmp_path)  # recorded as 1/1
    mixed = ModalityTemplates.from_nifti(tmp_path)
    assert mixed.modalities == ("flair", "t1", "t2")
    assert mixed.weight[:, 0, 0, 0].tolist() == [3.0, 1.0, 2.0]

"""HybridMaskPattern: the composition of E-MIM's three steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.masking import HybridMaskPattern, ModalMask, PatchMask, PositionMask

# E-MIM Table III: (modal, position, patch) per row, and the call that builds it
TABLE_III = [
    ((True, False, False), dict(position=None, patch=None)),
    ((False, True, False), dict(modal=None, patch=None)),
    ((False, False, True), dict(modal=None, position=None)),
    ((True, True, False), dict(patch=None)),
    ((True, False, True), dict(position=None)),
    ((False, True, True), dict(modal=None)),
    ((True, True, True), dict()),
]


def reference_hmp(rng, C, N, n_modal, r_pos, r_patch):
    """E-MIM HMP for one sample, plainly: numpy loops over positions and modalities."""
    mask = np.zeros((C, N), dtype=bool)
    modal = set()
    if n_modal:
        modal = set(rng.permutation(C)[: min(n_modal, C - 1)].tolist())
        for c in modal:
            mask[c] = True
    positions = set()
    if r_pos is not None:
        positions = set(rng.permutation(N)[: math.floor(N * r_pos + 1e-9)].tolist())
        for n in positions:
            mask[:, n] = True
    if r_patch is not None:
        visible = [c for c in range(C) if c not in modal]
        V = len(visible)
        rest = [n for n in range(N) if n not in positions]
        base = math.floor(r_patch * V + 1e-9)
        frac = r_patch * V - base
        extra = set(rng.permutation(rest)[: math.floor(len(rest) * frac + 0.5)].tolist())
        for n in rest:
            k = max(min(base + (n in extra), V - 1), 0)
            for c in rng.permutation(visible)[:k]:
                mask[c, n] = True
    return mask


@pytest.mark.parametrize(("row", "kwargs"), TABLE_III)
def test_each_table_iii_row_is_one_constructor_call(row, kwargs):
    hmp = HybridMaskPattern(**kwargs)
    names = tuple(n for n, on in zip(("modal", "position", "patch"), row, strict=True) if on)
    assert hmp.steps == names
    assert (hmp.modal is not None, hmp.position is not None, hmp.patch is not None) == row


@pytest.mark.parametrize(("row", "kwargs"), TABLE_III)
def test_each_row_applies_exactly_its_steps(row, kwargs):
    modal_on, position_on, patch_on = row
    mask = HybridMaskPattern(**kwargs).sample(64, 4, 50, generator=torch.Generator().manual_seed(0))
    whole_modality = mask.all(dim=2).any(dim=1)  # some modality hidden everywhere
    whole_position = mask.all(dim=1).any(dim=1)  # some position hidden in every modality
    partial = (mask.any(dim=1) & ~mask.all(dim=1)).any(dim=1)  # complementary positions
    assert bool(whole_modality.all()) == modal_on
    assert bool(whole_position.all()) == position_on
    # with the modal step alone every position is partial (one modality of four hidden)
    assert bool(partial.all()) == (patch_on or modal_on)
    if modal_on and not patch_on:
        assert (mask.sum(dim=1)[~mask.all(dim=1)] == 1).all()


def test_all_steps_off_is_rejected_and_points_to_mae():
    with pytest.raises(ValueError, match="RandomTokenMask"):
        HybridMaskPattern(modal=None, position=None, patch=None)


def test_steps_accept_objects_and_numbers():
    hmp = HybridMaskPattern(modal=ModalMask(probability=0.5), position=0.3, patch=PatchMask(0.25))
    assert isinstance(hmp.position, PositionMask)
    assert hmp.position.mask_ratio == 0.3
    with pytest.raises(TypeError, match="modal"):
        HybridMaskPattern(modal=0.5)
    with pytest.raises(TypeError, match="position"):
        HybridMaskPattern(position="half")


@pytest.mark.parametrize("C", [2, 3, 4, 6])
def test_default_ratio_is_exact_in_every_sample(C):
    hmp = HybridMaskPattern()
    mask = hmp.sample(16, C, 216)
    ratio = mask.float().mean(dim=(1, 2))
    assert torch.allclose(ratio, torch.full_like(ratio, hmp.expected_mask_ratio(C, 216)))


def test_documented_default_ratios():
    hmp = HybridMaskPattern()
    assert hmp.expected_mask_ratio(4, 216) == 0.8125
    assert hmp.expected_mask_ratio(2, 216) == 0.75
    assert hmp.expected_mask_ratio(3, 216) == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    ("n_modal", "r_pos", "r_patch"),
    [(1, 0.5, 0.5), (None, 0.4, 0.3), (2, None, 0.6), (1, 0.25, None), (None, None, 0.5)],
)
def test_matches_a_plain_reference_in_distribution(n_modal, r_pos, r_patch):
    C, N, trials = 5, 24, 1500
    rng = np.random.default_rng(0)
    ref = np.stack([reference_hmp(rng, C, N, n_modal, r_pos, r_patch) for _ in range(trials)])
    hmp = HybridMaskPattern(modal=n_modal, position=r_pos, patch=r_patch)
    ours = hmp.sample(trials, C, N, generator=torch.Generator().manual_seed(0)).numpy()
    # the same marginal per modality and position, and the same per-position count histogram
    assert np.allclose(ours.mean(axis=0), ref.mean(axis=0), atol=0.08)  # 4.5 standard errors
    assert ours.mean() == pytest.approx(ref.mean(), abs=0.005)
    hist = [np.bincount(m.sum(axis=1).ravel(), minlength=C + 1) / (trials * N) for m in (ours, ref)]
    assert np.allclose(hist[0], hist[1], atol=0.02)
    assert ours.mean() == pytest.approx(hmp.expected_mask_ratio(C, N), abs=0.005)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 6),
    st.integers(1, 30),
    st.floats(0, 0.95),
    st.floats(0, 0.95),
    st.data(),
)
def test_hmp_invariants(B, C, N, r_pos, r_patch, data):
    rows = st.lists(st.booleans(), min_size=C, max_size=C).filter(any)
    available = torch.tensor(data.draw(st.lists(rows, min_size=B, max_size=B)), dtype=torch.bool)
    hmp = HybridMaskPattern(position=r_pos, patch=r_patch)
    mask = hmp.sample(B, C, N, available=available)
    present = available[:, :, None]
    assert mask[~available].all()  # missing modalities masked
    # a position not hidden by the position step keeps at least one present modality
    all_hidden = mask.all(dim=1)
    assert (all_hidden.sum(dim=1) == math.floor(N * r_pos + 1e-9)).all()
    assert ((~mask & present).any(dim=1) | all_hidden).all()
    # with two or more present, the modal step hides one whole present modality
    multi = available.sum(dim=1) >= 2
    assert ((mask.all(dim=2) & available).sum(dim=1)[multi] >= 1).all()
    # and every sample shows the encoder something
    assert (~mask & present).any(dim=2).any(dim=1).all()


def test_single_present_modality_gets_only_the_position_step():
    available = torch.tensor([[False, True, False, False]])
    mask = HybridMaskPattern().sample(1, 4, 40, available=available)
    present = mask[0, 1]
    assert int(present.sum()) == 20  # positions only
    assert mask[0, [0, 2, 3]].all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_agree_in_distribution():
    hmp = HybridMaskPattern(modal=ModalMask(probability=0.5))
    kwargs = dict(available=torch.tensor([[True, True, False, True]] * 2000))
    cpu = hmp.sample(2000, 4, 27, generator=torch.Generator().manual_seed(0), **kwargs)
    gpu = hmp.sample(
        2000, 4, 27, generator=torch.Generator("cuda").manual_seed(0), device="cuda", **kwargs
    )
    assert gpu.device.type == "cuda"
    # per-(modality, position) frequencies and the per-sample count histogram agree
    assert torch.allclose(cpu.float().mean(0), gpu.cpu().float().mean(0), atol=0.06)
    hist = [
        torch.bincount(m.sum(dim=(1, 2)).cpu(), minlength=109).float() / 2000 for m in (cpu, gpu)
    ]
    assert torch.allclose(hist[0], hist[1], atol=0.04)


# E-MIM Table III, C = 4 modalities: the masked fraction of each row, from the row's steps
# written out (modal hides 1 of 4; position r of the positions in all modalities; patch half
# of the modalities still visible at every position the earlier steps left)
def table_iii_fraction(modal, position, patch, C=4):
    hidden_modal = 1 if modal else 0
    r_pos = (0.75 if (not modal and not patch) else 0.5) if position else 0.0
    visible = C - hidden_modal
    per_position = hidden_modal + (C - hidden_modal) * r_pos
    if patch:
        per_position += (1 - r_pos) * visible * 0.5
    return per_position / C


@pytest.mark.parametrize("row", [row for row, _ in TABLE_III])
def test_table_iii_row_masks_the_fraction_of_its_steps(row, gen):
    hmp = HybridMaskPattern.table_iii_row(*row)
    names = tuple(n for n, on in zip(("modal", "position", "patch"), row, strict=True) if on)
    assert hmp.steps == names
    mask = hmp.sample(16, 4, 216, generator=gen)
    want = table_iii_fraction(*row)
    assert mask.float().mean().item() == pytest.approx(want, abs=1e-9)
    assert hmp.expected_mask_ratio(4, 216) == pytest.approx(want, abs=1e-12)


def test_table_iii_position_only_row_is_the_papers_mae_at_75_percent(gen):
    mae = HybridMaskPattern.table_iii_row(False, True, False)
    mask = mae.sample(8, 4, 216, generator=gen)
    # MAE on stacked tokens: the same 162 of 216 positions hidden in every modality
    assert (mask == mask[:, :1]).all()
    assert mask[:, 0].sum(dim=1).tolist() == [162] * 8


def test_table_iii_empty_row_is_not_defined():
    with pytest.raises(ValueError, match="position-only row"):
        HybridMaskPattern.table_iii_row(False, False, False)

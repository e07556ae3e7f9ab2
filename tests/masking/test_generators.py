"""RandomTokenMask, ModalMask, PositionMask, PatchMask and the shared generator contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    ModalMask,
    PatchMask,
    PositionMask,
    RandomTokenMask,
    target_mask,
)

ALL_GENERATORS = [
    RandomTokenMask(0.75),
    RandomTokenMask(0.6, shared_across_modalities=False),
    ModalMask(),
    ModalMask(probability=0.4),
    PositionMask(0.5),
    PatchMask(0.5),
    HybridMaskPattern(),
    HybridMaskPattern(modal=ModalMask(probability=0.5)),
    BlockMask(),
]


def available_strategy(B: int, C: int) -> st.SearchStrategy[torch.Tensor]:
    """(B, C) bool with at least one True per row."""
    rows = st.lists(st.booleans(), min_size=C, max_size=C).filter(any)
    return st.lists(rows, min_size=B, max_size=B).map(lambda r: torch.tensor(r, dtype=torch.bool))


# --- the contract shared by every generator -------------------------------------------------


@pytest.mark.parametrize("gen", ALL_GENERATORS, ids=repr)
def test_sample_and_call_give_bool_masks_of_shape_b_c_n(gen, device):
    mask = gen.sample(3, 4, (2, 3, 4), device=device)
    assert mask.shape == (3, 4, 24)
    assert mask.dtype == torch.bool
    assert mask.device.type == device.type
    x = torch.zeros(3, 4, 16, 16, 32, device=device)
    assert gen(x, 8).shape == (3, 4, 2 * 2 * 4)


@pytest.mark.parametrize("gen", ALL_GENERATORS, ids=repr)
def test_same_seed_gives_same_mask(gen):
    a = gen.sample(4, 4, 64, generator=torch.Generator().manual_seed(3))
    b = gen.sample(4, 4, 64, generator=torch.Generator().manual_seed(3))
    c = gen.sample(4, 4, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("gen", ALL_GENERATORS, ids=repr)
def test_a_given_generator_leaves_the_global_rng_alone(gen):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    gen.sample(2, 4, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("gen", ALL_GENERATORS, ids=repr)
def test_empirical_ratio_matches_expected_mask_ratio(gen, device):
    # exact-count generators match to rounding; the others within 5 standard errors
    C, N = 4, 216
    mask = gen.sample(400, C, N, generator=torch.Generator(device).manual_seed(0), device=device)
    per_sample = mask.float().mean(dim=(1, 2))
    se = per_sample.std().item() / math.sqrt(per_sample.numel())
    assert abs(per_sample.mean().item() - gen.expected_mask_ratio(C, N)) <= 5 * se + 1e-6


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.integers(1, 30), st.data())
def test_missing_modalities_are_always_masked(B, C, N, data):
    available = data.draw(available_strategy(B, C))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    for gen in ALL_GENERATORS:
        mask = gen.sample(B, C, N, available=available, generator=g)
        assert mask[~available].all(), repr(gen)


def test_target_mask_skips_missing_modalities():
    available = torch.tensor([[True, False, True]])
    mask = HybridMaskPattern().sample(1, 3, 10, available=available)
    target = target_mask(mask, available)
    assert not target[:, 1].any()
    assert torch.equal(target[:, [0, 2]], mask[:, [0, 2]])


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("cls", [RandomTokenMask, PositionMask, PatchMask])
def test_ratio_outside_unit_interval_is_rejected(cls, ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be a finite number >= 0 and < 1"):
        cls(ratio)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"BlockMask.*\[0, 1\)|mask_ratio"):
        BlockMask(8, mask_ratio=1.0)
    with pytest.raises(TypeError, match="mask_ratio"):
        RandomTokenMask("0.5")
    with pytest.raises(ValueError, match="available must have shape"):
        RandomTokenMask().sample(2, 4, 8, available=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="available must be a bool"):
        RandomTokenMask().sample(2, 4, 8, available=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"cases \[1\] have none"):
        RandomTokenMask().sample(2, 2, 8, available=torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="num_modalities >= 2"):
        ModalMask().sample(2, 1, 8)
    with pytest.raises(ValueError, match="num_modalities >= 3"):
        ModalMask(2).sample(2, 2, 8)
    with pytest.raises(ValueError, match="num_modalities >= 2"):
        HybridMaskPattern().sample(2, 1, 8)
    with pytest.raises(ValueError, match="num_modalities >= 2"):
        PatchMask().sample(2, 1, 8)
    with pytest.raises(ValueError, match="candidates"):
        ModalMask(candidates=[0, 5]).sample(1, 4, 8)
    with pytest.raises(ValueError, match="distinct"):
        ModalMask(candidates=[1, 1])
    with pytest.raises(ValueError, match="does not divide"):
        RandomTokenMask()(torch.zeros(1, 2, 30, 32, 32), 16)
    with pytest.raises(ValueError, match="needs patch_size"):
        RandomTokenMask()(torch.zeros(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="grid"):
        RandomTokenMask().sample(1, 2, 0)
    with pytest.raises(ValueError, match=r"must have 5 dimensions"):
        RandomTokenMask()(torch.zeros(2, 32, 32, 32), 16)


def test_a_generator_on_another_device_type_is_rejected():
    meta_gen = torch.Generator(device="cpu")
    with pytest.raises(ValueError, match="generator is on cpu"):
        RandomTokenMask().sample(1, 2, 8, generator=meta_gen, device="meta")


# --- RandomTokenMask ------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 300), st.floats(0, 0.99))
def test_random_token_mask_masks_exactly_floor_n_ratio(B, C, N, ratio):
    mask = RandomTokenMask(ratio).sample(B, C, N)
    assert (mask.sum(dim=2) == math.floor(N * ratio + 1e-9)).all()
    assert (mask == mask[:, :1]).all()


def test_random_token_mask_counts_the_masked_tokens_as_mae_at_usual_sizes():
    # MAE keeps int(N · (1 - r)) tokens: 216 · 0.25 = 54 at 96³ / 16³ with r = 0.75
    mask = RandomTokenMask(0.75).sample(2, 1, 216)
    assert (216 - mask.sum(dim=2) == 54).all()


def test_independent_random_token_mask_draws_per_modality():
    mask = RandomTokenMask(0.5, shared_across_modalities=False).sample(8, 4, 64)
    assert (mask.sum(dim=2) == 32).all()
    assert not (mask == mask[:, :1]).all()


def test_random_token_mask_positions_are_uniform():
    mask = RandomTokenMask(0.25).sample(4000, 1, 8, generator=torch.Generator().manual_seed(0))
    freq = mask[:, 0].float().mean(dim=0)
    assert torch.allclose(freq, torch.full((8,), 0.25), atol=0.03)


# --- ModalMask ------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 6), st.integers(1, 3), st.data())
def test_modal_mask_masks_whole_modalities_and_keeps_one_present(B, C, k, data):
    available = data.draw(available_strategy(B, C))
    gen = ModalMask(min(k, C - 1))
    mask = gen.sample(B, C, 5, available=available)
    whole = mask.all(dim=2)
    assert torch.equal(mask.any(dim=2), whole)  # whole modalities only
    chosen = whole & available
    for b in range(B):
        present = int(available[b].sum())
        assert int(chosen[b].sum()) == min(gen.num_masked, present - 1)
        assert (available[b] & ~whole[b]).any()  # one present modality is kept


def test_modal_mask_chooses_uniformly_among_candidates():
    mask = ModalMask(candidates=[1, 3]).sample(
        4000, 4, 1, generator=torch.Generator().manual_seed(0)
    )
    freq = mask[:, :, 0].float().mean(dim=0)
    assert freq[0] == 0
    assert freq[2] == 0
    assert torch.allclose(freq[[1, 3]], torch.full((2,), 0.5), atol=0.03)


def test_modal_mask_with_probability_never_hides_every_present_modality():
    gen = ModalMask(probability=0.9)
    available = torch.tensor([[True, True, False]] * 500)
    mask = gen.sample(500, 3, 2, available=available, generator=torch.Generator().manual_seed(0))
    assert (~mask[:, :2, 0]).any(dim=1).all()


def test_modal_mask_expected_ratio_with_probability_matches_enumeration():
    p, C = 0.3, 3
    expected = 0.0
    for hits in range(C + 1):
        prob = math.comb(C, hits) * p**hits * (1 - p) ** (C - hits)
        expected += prob * min(hits, C - 1)
    assert ModalMask(probability=p).expected_mask_ratio(C, 10) == pytest.approx(expected / C)


# --- PositionMask ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 100), st.floats(0, 0.99))
def test_position_mask_hides_the_same_positions_in_every_modality(B, C, N, ratio):
    mask = PositionMask(ratio).sample(B, C, N)
    assert (mask == mask[:, :1]).all()
    assert (mask[:, 0].sum(dim=1) == math.floor(N * ratio + 1e-9)).all()


# --- PatchMask ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(1, 40), st.floats(0, 0.99), st.data())
def test_patch_mask_never_hides_every_modality_of_a_position(B, C, N, ratio, data):
    available = data.draw(available_strategy(B, C))
    mask = PatchMask(ratio).sample(B, C, N, available=available)
    kept_present = (~mask) & available[:, :, None]
    assert kept_present.any(dim=1).all()


def test_patch_mask_hides_half_of_four_modalities_at_every_position():
    mask = PatchMask(0.5).sample(5, 4, 30)
    assert (mask.sum(dim=1) == 2).all()


def test_patch_mask_count_per_sample_is_fixed():
    # three modalities, r = 0.5: 1 or 2 hidden per position, 1.5 · N in total per sample
    mask = PatchMask(0.5).sample(20, 3, 40)
    assert set(mask.sum(dim=1).unique().tolist()) == {1, 2}
    assert (mask.sum(dim=(1, 2)) == 60).all()


def test_patch_mask_hides_each_modality_equally_often():
    mask = PatchMask(0.5).sample(3000, 3, 4, generator=torch.Generator().manual_seed(0))
    freq = mask.float().mean(dim=(0, 2))
    assert torch.allclose(freq, torch.full((3,), 0.5), atol=0.02)


def test_patch_mask_with_one_present_modality_does_nothing_to_it():
    available = torch.tensor([[False, True, False]])
    mask = PatchMask(0.75).sample(1, 3, 10, available=available)
    assert not mask[0, 1].any()
    assert mask[0, [0, 2]].all()


def test_patch_mask_matches_a_plain_reference_distribution():
    # reference: a numpy loop drawing k per position as documented, fresh RNG
    rng = np.random.default_rng(0)
    C, N, r, trials = 4, 6, 0.3, 3000
    ref = np.zeros(C + 1)
    for _ in range(trials):
        extra_positions = rng.permutation(N)[: math.floor(N * (r * C % 1) + 0.5)]
        for n in range(N):
            k = min(math.floor(r * C) + (n in extra_positions), C - 1)
            ref[k] += 1
    ref /= ref.sum()
    mask = PatchMask(r).sample(trials, C, N, generator=torch.Generator().manual_seed(0))
    got = torch.bincount(mask.sum(dim=1).flatten(), minlength=C + 1).double()
    got /= got.sum()
    assert np.allclose(got.numpy(), ref, atol=0.02)

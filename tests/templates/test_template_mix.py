from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrissl.data.template_transforms import TemplateMixd
from mrissl.masking import BlockMask, mask_to_voxels
from mrissl.templates import MixedView, ModalityTemplates, TemplateMix, TemplateMixViews

MODS = ["t1", "t1ce", "t2", "flair"]


def _templates(C=4, size=12):
    # template c is the constant -(c + 1): every replaced voxel says where it came from
    init = -torch.arange(1.0, C + 1).view(C, 1, 1, 1).expand(C, size, size, size)
    return ModalityTemplates(MODS[:C], shape=size, init=init)


@settings(max_examples=30, deadline=None)
@given(
    present=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    max_replaced=st.one_of(st.none(), st.integers(1, 3)),
)
def test_never_replaces_every_present_modality(present, seed, max_replaced):
    available = torch.tensor(present)
    available[available.sum(dim=1) == 0, 0] = True
    mix = TemplateMix(_templates(), modalities=MODS, max_replaced=max_replaced)
    x = torch.rand(len(present), 4, 8, 8, 8)
    views = mix(x, available=available, generator=torch.Generator().manual_seed(seed))
    for _, replaced, _ in views:
        assert not bool((replaced & ~available).any())  # missing: never replaced
        counts, A = replaced.sum(dim=1), available.sum(dim=1)
        multi = A >= 2
        assert bool((counts[multi] <= A[multi] - 1).all())
        assert bool((counts[multi] >= 1).all())
        assert bool((counts[~multi] == 0).all())
        if max_replaced is not None:
            assert bool((counts <= max_replaced).all())


def test_views_duplicate_the_input_channel_by_channel(gen):
    """Each copy is the whole case with some channels swapped (not interleaved channels)."""
    mix = TemplateMix(_templates(), modalities=["T1", "T1Gd", "T2", "FLAIR"])
    x = torch.rand(5, 4, 8, 8, 8, generator=gen)
    views = mix(x, generator=gen)
    for view, replaced, _ in views:
        assert view.shape == x.shape
        for b in range(5):
            for c in range(4):
                if replaced[b, c]:
                    assert bool((view[b, c] == -(c + 1)).all())
                else:
                    assert torch.equal(view[b, c], x[b, c])


def test_result_is_two_mixed_views_of_volume_replaced_blocks(gen):
    mix = TemplateMix(_templates(), modalities=MODS, block_mask=BlockMask(4, mask_ratio=0.5))
    x = torch.rand(2, 4, 8, 8, 8, generator=gen)
    available = torch.tensor([[True, True, True, True], [False, True, False, False]])
    views = mix(x, available=available, generator=gen)
    assert type(views) is TemplateMixViews
    assert views._fields == ("first", "second")
    first, second = views
    for view in (first, second):
        assert type(view) is MixedView
        assert view._fields == ("volume", "replaced", "blocks")
        assert view.volume.shape == x.shape
        assert view.replaced.shape == (2, 4)
        assert view.replaced.dtype == torch.bool
        assert view.blocks is not None
        assert view.blocks.shape == (2, 4, 8)
    assert views.first is first
    assert views.second is second
    # multi-modality case 0: no blocks; single-modality case 1: no modality replaced
    assert not bool(first.blocks[0].any())
    assert not bool(first.replaced[1].any())


def test_channels_map_to_their_own_templates_in_any_order(gen):
    mix = TemplateMix(_templates(), modalities=["flair", "t1"], min_replaced=1)
    views = mix(torch.rand(4, 2, 6, 6, 6, generator=gen), generator=gen)
    assert bool((views.first.volume[:, 0][views.first.replaced[:, 0]] == -4).all())
    assert bool((views.first.volume[:, 1][views.first.replaced[:, 1]] == -1).all())


def test_single_modality_cases_get_template_blocks(gen):
    block = BlockMask(4, mask_ratio=0.5)
    mix = TemplateMix(_templates(), modalities=["t2"], block_mask=block)
    x = torch.rand(3, 1, 8, 8, 8, generator=gen)
    views = mix(x, generator=gen)
    assert not bool(views.first.replaced.any())
    for view, _, blocks in views:
        assert blocks.sum(dim=2).tolist() == [[4]] * 3  # floor(8 · 0.5) of 8 blocks
        vox = mask_to_voxels(blocks, 4, 8)
        assert bool((view[vox] == -3).all())
        assert torch.equal(view[~vox], x[~vox])
    assert not torch.equal(views.first.blocks, views.second.blocks)


def test_case_with_one_present_modality_uses_blocks_in_that_modality_only(gen):
    mix = TemplateMix(_templates(), modalities=MODS, block_mask=BlockMask(4, mask_ratio=0.5))
    available = torch.tensor([[False, True, False, False], [True, True, True, True]])
    x = torch.rand(2, 4, 8, 8, 8, generator=gen)
    views = mix(x, available=available, generator=gen)
    assert views.first.blocks[0].sum(dim=1).tolist() == [0, 4, 0, 0]
    assert int(views.first.blocks[1].sum()) == 0
    assert torch.equal(views.first.volume[0, [0, 2, 3]], x[0, [0, 2, 3]])


def test_same_seed_same_views_and_global_rng_untouched(gen):
    mix = TemplateMix(_templates(), modalities=MODS)
    x = torch.rand(4, 4, 8, 8, 8, generator=gen)
    state = torch.get_rng_state()
    a = mix(x, generator=torch.Generator().manual_seed(3))
    b = mix(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.first.volume, b.first.volume)
    assert torch.equal(a.second.volume, b.second.volume)


def test_templates_are_frozen_in_the_mix(gen):
    templates = _templates()
    mix = TemplateMix(templates, modalities=MODS)
    x = torch.rand(2, 4, 8, 8, 8, generator=gen, requires_grad=True)
    views = mix(x, generator=gen)
    (views.first.volume.sum() + views.second.volume.sum()).backward()
    assert templates.weight.grad is None
    assert x.grad is not None


def test_mix_on_device_with_offsets(device):
    mix = TemplateMix(_templates(size=16), modalities=MODS).to(device)
    x = torch.rand(2, 4, 8, 8, 8, device=device)
    gen = torch.Generator(device=device.type).manual_seed(0)
    views = mix(x, offsets=torch.tensor([[0, 0, 0], [8, 8, 8]]), generator=gen)
    assert views.first.volume.device.type == device.type


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"has no template; the templates are"):
        TemplateMix(_templates(C=2), modalities=["t1", "flair"])
    mix = TemplateMix(_templates(), modalities=MODS)
    with pytest.raises(ValueError, match="volume has C = 3 channels"):
        mix(torch.rand(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="max_replaced must be at least"):
        TemplateMix(_templates(), modalities=MODS, min_replaced=2, max_replaced=1)
    with pytest.raises(ValueError, match="offsets put crops"):
        mix(torch.rand(1, 4, 8, 8, 8), offsets=torch.tensor([[6, 0, 0]]))


def test_monai_transform_makes_two_copies():
    t = TemplateMixd(
        "image", templates=_templates(), modalities=MODS, available_key="avail", offset_key="offset"
    ).set_random_state(0)
    data = {
        "image": torch.rand(4, 8, 8, 8),
        "avail": torch.tensor([True, True, False, True]),
        "offset": torch.tensor([2, 2, 2]),
    }
    out = t(data)
    assert out["image_view1"].shape == (4, 8, 8, 8)
    assert out["replaced"].shape == (2, 4)
    assert not bool(out["replaced"][:, 2].any())
    assert torch.equal(out["image"], data["image"])
    again = TemplateMixd(
        "image", templates=_templates(), modalities=MODS, available_key="avail", offset_key="offset"
    ).set_random_state(0)(data)
    assert torch.equal(again["image_view2"], out["image_view2"])


def test_monai_transform_passes_counts_to_the_mix():
    data = {"image": torch.rand(4, 8, 8, 8)}
    default = TemplateMixd("image", templates=_templates(), modalities=MODS)
    assert default.mix.counts == "different"
    independent = TemplateMixd(
        "image", templates=_templates(), modalities=MODS, counts="independent"
    )
    assert independent.mix.counts == "independent"
    equal = 0
    for seed in range(40):
        out = default.set_random_state(seed)(data)
        assert out["replaced"][0].sum() != out["replaced"][1].sum()  # C = 4: always different
        out = independent.set_random_state(seed)(data)
        equal += int(out["replaced"][0].sum() == out["replaced"][1].sum())
    assert equal > 0  # independent draws share a count about a third of the time
    with pytest.raises(ValueError, match="counts must be"):
        TemplateMixd("image", templates=_templates(), modalities=MODS, counts="same")


@settings(max_examples=40, deadline=None)
@given(
    present=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    min_replaced=st.integers(0, 2),
    max_replaced=st.one_of(st.none(), st.integers(2, 3)),
)
def test_copies_never_share_a_count_when_three_modalities_are_present(
    present, seed, min_replaced, max_replaced
):
    """BrainMVP supplement A: the two copies replace different numbers of modalities."""
    available = torch.tensor(present)
    available[available.sum(dim=1) == 0, 0] = True
    mix = TemplateMix(
        _templates(), modalities=MODS, min_replaced=min_replaced, max_replaced=max_replaced
    )
    x = torch.rand(len(present), 4, 8, 8, 8)
    views = mix(x, available=available, generator=torch.Generator().manual_seed(seed))
    k1, k2 = views.first.replaced.sum(dim=1), views.second.replaced.sum(dim=1)
    for b in range(len(present)):
        A = int(available[b].sum())
        hi = A - 1 if max_replaced is None else min(A - 1, max_replaced)
        lo = min(min_replaced, hi)
        assert lo <= int(k1[b]) <= hi
        assert lo <= int(k2[b]) <= hi
        if hi > lo:  # at least two counts possible (A >= 3 with the defaults)
            assert int(k1[b]) != int(k2[b])
        elif A >= 2:  # one count: the same number of different modalities
            assert not torch.equal(views.first.replaced[b], views.second.replaced[b])


def test_two_modalities_replace_one_each_and_never_the_same_one(gen):
    mix = TemplateMix(_templates(C=2), modalities=MODS[:2])
    views = mix(torch.rand(64, 2, 8, 8, 8, generator=gen), generator=gen)
    assert views.first.replaced.sum(dim=1).tolist() == [1] * 64
    assert bool((views.first.replaced ^ views.second.replaced).all())  # complementary
    literal = TemplateMix(_templates(C=2), modalities=MODS[:2], min_replaced=0)(
        torch.rand(64, 2, 8, 8, 8, generator=gen), generator=gen
    )
    counts = set(
        zip(
            literal.first.replaced.sum(1).tolist(),
            literal.second.replaced.sum(1).tolist(),
            strict=True,
        )
    )
    assert counts == {(0, 1), (1, 0)}


def test_count_pairs_are_uniform_over_distinct_pairs(gen):
    mix = TemplateMix(_templates(), modalities=MODS)  # counts 1..3: six ordered distinct pairs
    views = mix(torch.rand(6000, 4, 4, 4, 4, generator=gen), generator=gen)
    pairs = views.first.replaced.sum(1) * 4 + views.second.replaced.sum(1)
    freq = torch.bincount(pairs, minlength=16).double() / 6000
    for a in range(1, 4):
        for b in range(1, 4):
            want = 0.0 if a == b else 1 / 6
            assert freq[a * 4 + b].item() == pytest.approx(want, abs=0.02)


def test_independent_counts_keep_the_old_draw(gen):
    mix = TemplateMix(_templates(), modalities=MODS, counts="independent")
    views = mix(torch.rand(6000, 4, 4, 4, 4, generator=gen), generator=gen)
    same = (views.first.replaced.sum(1) == views.second.replaced.sum(1)).double().mean().item()
    identical = (views.first.replaced == views.second.replaced).all(dim=1).double().mean().item()
    # counts uniform on 1..3: equal 1/3 of the time; identical: Σ_k (1/3)² / C(4, k) = 0.074
    assert same == pytest.approx(1 / 3, abs=0.02)
    assert identical == pytest.approx((1 / 4 + 1 / 6 + 1 / 4) / 9, abs=0.01)
    with pytest.raises(ValueError, match="counts must be"):
        TemplateMix(_templates(), modalities=MODS, counts="same")

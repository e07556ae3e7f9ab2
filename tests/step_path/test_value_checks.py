"""The value checks of masking, templates and nn: a ValueError when on, no host read when off.

With the checks off (the default) a mistake that would give a silently wrong result still stops
the step, through ``torch._assert_async`` or the kernel's own index check; the other value
checks are skipped. Shapes and dtypes are checked in both modes.
"""

from __future__ import annotations

import pytest
import torch
from _sync_guard import forbid_host_sync

import mrissl
from mrissl.masking import BlockMask, HybridMaskPattern, cross_modal_fill, keep_indices
from mrissl.nn import gather_tokens, scatter_tokens
from mrissl.templates import ModalityTemplates, template_fill

EMPTY_ROW = torch.tensor([[True, True, False], [False, False, False]])  # case 1 has nothing


def test_a_case_without_modalities_is_refused_only_with_checks_on() -> None:
    x = torch.rand(2, 3, 8, 8, 8)
    with mrissl.checks("values"), pytest.raises(ValueError, match=r"cases \[1\] have none"):
        HybridMaskPattern()(x, 4, available=EMPTY_ROW)
    with mrissl.checks("none"), forbid_host_sync():
        mask = HybridMaskPattern()(x, 4, available=EMPTY_ROW)
        filled, source = cross_modal_fill(x, mask, 4, available=EMPTY_ROW, fallback=-1.0)
    assert mask[1].all()  # every modality of the empty case is missing, hence masked
    assert (source[1] == -1).all()
    assert (filled[1] == -1).all()  # no source anywhere: the fallback


def test_token_indices_out_of_range_never_pass() -> None:
    x = torch.randn(2, 5, 3)
    bad = torch.tensor([[0, 5], [1, 2]])
    with mrissl.checks("values"), pytest.raises(ValueError, match=r"\[0, 5\)"):
        gather_tokens(x, bad)
    with mrissl.checks("none"):
        with pytest.raises((IndexError, RuntimeError)):  # the gather kernel's own check
            gather_tokens(x, bad)
        with pytest.raises((IndexError, RuntimeError)):
            scatter_tokens(x[:, :2], bad, 5)
        with forbid_host_sync():
            out = gather_tokens(x, torch.tensor([[0, 4], [1, 2]]))
    assert torch.equal(out[0], x[0, [0, 4]])


def test_template_ids_and_offsets_outside_the_canvas_never_pass() -> None:
    templates = torch.randn(2, 6, 6, 6)
    x = torch.rand(1, 1, 4, 4, 4)
    mask = torch.ones_like(x, dtype=torch.bool)
    ok_ids, bad_ids = torch.tensor([[1]]), torch.tensor([[-1]])
    ok_off, bad_off = torch.tensor([2, 2, 2]), torch.tensor([3, 0, 0])
    with mrissl.checks("values"):
        with pytest.raises(ValueError, match="modality_ids"):
            template_fill(x, mask, templates, bad_ids, ok_off)
        with pytest.raises(ValueError, match="outside the template canvas"):
            template_fill(x, mask, templates, ok_ids, bad_off)
    with mrissl.checks("none"):
        with pytest.raises(RuntimeError, match="modality_ids"):
            template_fill(x, mask, templates, bad_ids, ok_off)  # would wrap to template 1
        with pytest.raises(RuntimeError, match="outside the canvas"):
            template_fill(x, mask, templates, ok_ids, bad_off)
        with forbid_host_sync():
            out = template_fill(x, mask, templates, ok_ids, ok_off)
    assert torch.equal(out[0, 0], templates[1, 2:6, 2:6, 2:6])


def test_module_fill_reads_nothing_with_ids_and_centred_crops() -> None:
    t = ModalityTemplates(["t1", "t2"], shape=8, init=3.0)
    x = torch.zeros(2, 2, 4, 4, 4)
    mask = torch.rand(2, 2, 4, 4, 4) < 0.5
    ids = torch.tensor([[1, 0], [0, 1]])
    with mrissl.checks("none"), forbid_host_sync():
        out = t.fill(x, mask, ids)  # offsets=None: centred, made on the device
    assert torch.equal(out, torch.where(mask, 3.0, 0.0))


def test_keep_indices_with_num_kept_reads_nothing_and_checks_when_asked() -> None:
    g = torch.Generator().manual_seed(0)
    mask = HybridMaskPattern().sample(3, 4, 64, generator=g)  # 0.8125 of 256 masked: 48 kept
    with mrissl.checks("none"), forbid_host_sync():
        fixed = keep_indices(mask, num_kept=48)
    plain = keep_indices(mask)
    for a, b in zip(fixed, plain, strict=True):
        assert torch.equal(a, b)
    with mrissl.checks("values"), pytest.raises(ValueError, match="num_kept=47"):
        keep_indices(mask, num_kept=47)
    with mrissl.checks("values"), pytest.raises(ValueError, match="num_kept=49"):
        keep_indices(mask, num_kept=49)
    with mrissl.checks("none"):
        padded = keep_indices(mask, num_kept=50)  # two more than kept: marked as padding
    assert padded.padding[:, 48:].all()
    assert not padded.padding[:, :48].any()
    with pytest.raises(ValueError, match="num_kept"):
        keep_indices(mask, num_kept=257)


def test_sample_cubes_is_the_same_draw_with_and_without_checks() -> None:
    gen = BlockMask(4, mask_ratio=0.75)
    with mrissl.checks("values"):
        on = gen.sample_cubes(2, 2, 16, generator=torch.Generator().manual_seed(3))
    with mrissl.checks("none"), forbid_host_sync():
        off = gen.sample_cubes(2, 2, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(on, off)
    assert (off.flatten(2).float().mean(dim=2) >= 0.75).all()

"""parse_mask_spec and MaskSpec (mrissl.masking.spec): mask generators from one line of text."""

from __future__ import annotations

import pytest

from mrissl.masking import (
    BlockMask,
    HybridMaskPattern,
    MaskSpec,
    ModalMask,
    PatchMask,
    PositionMask,
    RandomTokenMask,
    parse_mask_spec,
)


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("random:0.75", RandomTokenMask),
        ("random-each:0.5", RandomTokenMask),
        ("hmp", HybridMaskPattern),
        ("hmp:1,0.5,-", HybridMaskPattern),
        ("modal", ModalMask),
        ("modal:2", ModalMask),
        ("patch:0.5", PatchMask),
        ("block:0.875", BlockMask),
    ],
)
def test_mask_specs_build_their_generators(spec, cls):
    parsed = parse_mask_spec(spec, 16)
    assert isinstance(parsed.generator, cls)
    assert parsed.patch_size == (None if cls is BlockMask else 16)


def test_mask_spec_arguments_reach_the_generators():
    assert parse_mask_spec("random-each:0.5", 16).generator.shared_across_modalities is False
    hmp = parse_mask_spec("hmp:2,0.25,-", 16).generator
    assert hmp.patch is None
    assert hmp.position.mask_ratio == 0.25
    assert hmp.modal.num_masked == 2
    block = parse_mask_spec("block:0.5:4", 16).generator
    assert block.mask_ratio == 0.5


@pytest.mark.parametrize(
    "spec", ["random", "random:1.5", "random:x", "hmp:1,2", "block", "cubes:0.5", "modal:0"]
)
def test_bad_mask_specs_raise_a_value_error_naming_the_spec(spec):
    with pytest.raises(ValueError, match=f"^spec {spec!r}: "):
        parse_mask_spec(spec, 16)


def test_a_mask_spec_is_a_named_tuple_of_text_generator_and_patch_size():
    parsed = parse_mask_spec("  Position:0.25", 8)
    assert isinstance(parsed, MaskSpec)
    text, generator, patch_size = parsed
    assert (text, patch_size) == ("  Position:0.25", 8)
    assert isinstance(generator, PositionMask)
    assert generator.mask_ratio == 0.25


def test_hmp_step_errors_name_the_spec():
    with pytest.raises(ValueError, match=r"^spec 'hmp:-,-,-': HybridMaskPattern needs"):
        parse_mask_spec("hmp:-,-,-", 16)


@pytest.mark.parametrize(
    ("spec", "patch_size", "error"),
    [(None, 16, TypeError), ("hmp", 0, ValueError), ("hmp", 1.5, TypeError)],
)
def test_bad_arguments_name_the_argument(spec, patch_size, error):
    name = "spec" if spec is None else "patch_size"
    with pytest.raises(error, match=f"^{name} must"):
        parse_mask_spec(spec, patch_size)

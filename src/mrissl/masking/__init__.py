"""Mask generators for masked image modelling on multi-modal MRI, and how to apply them.

Generators draw a ``(B, C, N)`` bool token mask, True = masked, over the token grid of
DESIGN.md (``C`` modalities × ``N`` positions in raster order):

* [`RandomTokenMask`][mrissl.masking.RandomTokenMask]: MAE masking;
* [`ModalMask`][mrissl.masking.ModalMask], [`PositionMask`][mrissl.masking.PositionMask],
  [`PatchMask`][mrissl.masking.PatchMask]: the three steps of E-MIM's hybrid mask pattern, and
  [`HybridMaskPattern`][mrissl.masking.HybridMaskPattern], the three composed;
* [`BlockMask`][mrissl.masking.BlockMask]: BrainMVP's r³ block masking.

[`apply_mask`][mrissl.masking.apply_mask] and [`cross_modal_fill`][mrissl.masking.cross_modal_fill]
make the masked input; [`mask_to_voxels`][mrissl.masking.mask_to_voxels],
[`voxels_to_mask`][mrissl.masking.voxels_to_mask] and
[`keep_indices`][mrissl.masking.keep_indices] convert masks;
[`plot_masks`][mrissl.masking.plot_masks] draws them (needs the ``plot`` extra);
[`parse_mask_spec`][mrissl.masking.parse_mask_spec] builds a generator from one line of text.

This package depends on ``mrissl.nn`` only.
"""

from mrissl.masking._base import MaskGenerator, target_mask
from mrissl.masking.block import BlockMask
from mrissl.masking.convert import KeepIndices, keep_indices, mask_to_voxels, voxels_to_mask
from mrissl.masking.fill import CrossModalFill, apply_mask, cross_modal_fill
from mrissl.masking.hybrid import HybridMaskPattern, ModalMask, PatchMask, PositionMask
from mrissl.masking.plot import plot_masks
from mrissl.masking.random import RandomTokenMask
from mrissl.masking.spec import MaskSpec, parse_mask_spec

__all__ = [
    "BlockMask",
    "CrossModalFill",
    "HybridMaskPattern",
    "KeepIndices",
    "MaskGenerator",
    "MaskSpec",
    "ModalMask",
    "PatchMask",
    "PositionMask",
    "RandomTokenMask",
    "apply_mask",
    "cross_modal_fill",
    "keep_indices",
    "mask_to_voxels",
    "parse_mask_spec",
    "plot_masks",
    "target_mask",
    "voxels_to_mask",
]

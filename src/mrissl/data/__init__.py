"""Data in: NIfTI cases, the papers' preprocessing, and an offline multi-contrast head phantom.

This is the top layer of mrissl, next to the command line: it may import MONAI and nibabel,
and nothing below it imports it.
"""

from mrissl.data.mask_transforms import RandBlockMaskd, RandHybridMaskd, RandMaskd, RandTokenMaskd
from mrissl.data.nifti import Case, FoundCases, NiftiCase, find_cases, load_case
from mrissl.data.phantom import (
    PHANTOM_LABELS,
    PHANTOM_MODALITIES,
    PHANTOM_SEQUENCES,
    PHANTOM_TISSUES,
    PhantomDataset,
    PulseSequence,
    Tissue,
    synthetic_phantom,
)
from mrissl.data.preprocessing import LoadCased, percentile_pair, preprocessing
from mrissl.data.template_transforms import TemplateMixd

__all__ = [
    "PHANTOM_LABELS",
    "PHANTOM_MODALITIES",
    "PHANTOM_SEQUENCES",
    "PHANTOM_TISSUES",
    "Case",
    "FoundCases",
    "LoadCased",
    "NiftiCase",
    "PhantomDataset",
    "PulseSequence",
    "RandBlockMaskd",
    "RandHybridMaskd",
    "RandMaskd",
    "RandTokenMaskd",
    "TemplateMixd",
    "Tissue",
    "find_cases",
    "load_case",
    "percentile_pair",
    "preprocessing",
    "synthetic_phantom",
]

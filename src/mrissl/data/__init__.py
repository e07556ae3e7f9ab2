"""Data in: NIfTI cases, the papers' preprocessing, and an offline multi-contrast head phantom.

This is the top layer of mrissl, next to the command line: it may import MONAI and nibabel,
and nothing below it imports it.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mrissl.data._percentiles import Percentiles, percentile_pair
    from mrissl.data.mask_transforms import (
        RandBlockMaskd,
        RandHybridMaskd,
        RandMaskd,
        RandTokenMaskd,
    )
    from mrissl.data.nifti import CaseFiles, CaseImage, FoundCases, find_cases, load_case
    from mrissl.data.phantom import (
        PHANTOM_LABELS,
        PHANTOM_MODALITIES,
        PHANTOM_SEQUENCES,
        PHANTOM_TISSUES,
        LabeledPhantom,
        PhantomDataset,
        PulseSequence,
        Tissue,
        synthetic_phantom,
    )
    from mrissl.data.preprocessing import LoadCased, preprocessing
    from mrissl.data.template_transforms import TemplateMixd

# Names load their module on first use, so that a process that only lists cases or reads
# NIfTI files (the command's main process, whose loader workers preprocess) never imports
# MONAI (about 250 MB of resident memory).
_MODULES = {
    "CaseFiles": "mrissl.data.nifti",
    "CaseImage": "mrissl.data.nifti",
    "FoundCases": "mrissl.data.nifti",
    "LabeledPhantom": "mrissl.data.phantom",
    "LoadCased": "mrissl.data.preprocessing",
    "PHANTOM_LABELS": "mrissl.data.phantom",
    "PHANTOM_MODALITIES": "mrissl.data.phantom",
    "PHANTOM_SEQUENCES": "mrissl.data.phantom",
    "PHANTOM_TISSUES": "mrissl.data.phantom",
    "Percentiles": "mrissl.data._percentiles",
    "PhantomDataset": "mrissl.data.phantom",
    "PulseSequence": "mrissl.data.phantom",
    "RandBlockMaskd": "mrissl.data.mask_transforms",
    "RandHybridMaskd": "mrissl.data.mask_transforms",
    "RandMaskd": "mrissl.data.mask_transforms",
    "RandTokenMaskd": "mrissl.data.mask_transforms",
    "TemplateMixd": "mrissl.data.template_transforms",
    "Tissue": "mrissl.data.phantom",
    "find_cases": "mrissl.data.nifti",
    "load_case": "mrissl.data.nifti",
    "percentile_pair": "mrissl.data._percentiles",
    "preprocessing": "mrissl.data.preprocessing",
    "synthetic_phantom": "mrissl.data.phantom",
}


class _Package(types.ModuleType):
    """Keeps ``mrissl.data.preprocessing`` the function once its module is imported.

    Importing the submodule ``mrissl.data.preprocessing`` sets the package attribute of that
    name to the module; the function of the same name is what ``from mrissl.data import
    preprocessing`` has always given.
    """

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name == "preprocessing" and isinstance(value, types.ModuleType):
            return getattr(value, name)
        return value


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'mrissl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "PHANTOM_LABELS",
    "PHANTOM_MODALITIES",
    "PHANTOM_SEQUENCES",
    "PHANTOM_TISSUES",
    "CaseFiles",
    "CaseImage",
    "FoundCases",
    "LabeledPhantom",
    "LoadCased",
    "Percentiles",
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

"""Self-supervised losses for multi-modal 3D MRI.

Barlow Twins (feature and token mode), E-MIM's pyramid Barlow Twins, symmetric InfoNCE, masked
reconstruction and feature consistency.
Each loss is a pure function (the math) and, where it has configuration or state, a thin
``nn.Module`` that calls it. All of them compute in float32 (float64 for float64 inputs) with
autocast off, raise ``ValueError`` naming the argument on bad input (and on NaN/Inf when the
value checks are on, ``mrissl.set_checks("values")``; off by default, so that nothing
synchronises with the device), and those that need the global batch take ``gather_distributed``
(see [`mrissl.distributed`][mrissl.distributed]).
"""

from mrissl.losses.barlow_twins import BarlowTwinsLoss, barlow_twins
from mrissl.losses.consistency import consistency_loss
from mrissl.losses.info_nce import InfoNCELoss, info_nce
from mrissl.losses.pyramid import PyramidBarlowTwinsLoss, PyramidLoss, pyramid_barlow_twins
from mrissl.losses.reconstruction import masked_reconstruction_loss

__all__ = [
    "BarlowTwinsLoss",
    "InfoNCELoss",
    "PyramidBarlowTwinsLoss",
    "PyramidLoss",
    "barlow_twins",
    "consistency_loss",
    "info_nce",
    "masked_reconstruction_loss",
    "pyramid_barlow_twins",
]

"""Collapse diagnostics for masked image modelling on multi-modal MRI.

E-MIM names two failures: complete collapse, where the reconstruction loss of a constant
predictor, Var(x_m), is already below the loss of a healthy model
([`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor]), and dimensional collapse,
where features occupy a low-dimensional subspace
([`singular_values`][mrissl.diagnostics.singular_values],
[`effective_rank`][mrissl.diagnostics.effective_rank], [`rankme`][mrissl.diagnostics.rankme],
the streaming [`EffectiveRankMeter`][mrissl.diagnostics.EffectiveRankMeter]).
[`CollapseMonitor`][mrissl.diagnostics.CollapseMonitor] watches for both during training and
[`plot_spectrum`][mrissl.diagnostics.plot_spectrum] draws spectra (needs the ``plot`` extra).
"""

from mrissl.diagnostics.floor import (
    CollapseFloor,
    CollapseFloorMeter,
    FloorMaskGenerator,
    collapsed_loss_floor,
)
from mrissl.diagnostics.meter import EffectiveRankMeter, RankResult
from mrissl.diagnostics.monitor import CollapseMonitor, CollapseStatus
from mrissl.diagnostics.plot import plot_spectrum
from mrissl.diagnostics.spectrum import (
    effective_rank,
    rankme,
    singular_values,
    std_of_l2_normalized,
)

__all__ = [
    "CollapseFloor",
    "CollapseFloorMeter",
    "CollapseMonitor",
    "CollapseStatus",
    "EffectiveRankMeter",
    "FloorMaskGenerator",
    "RankResult",
    "collapsed_loss_floor",
    "effective_rank",
    "plot_spectrum",
    "rankme",
    "singular_values",
    "std_of_l2_normalized",
]

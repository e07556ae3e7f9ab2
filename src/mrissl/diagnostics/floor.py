"""The complete-collapse floor Var(x_m): the loss of the best constant predictor (E-MIM eq. 3).

A completely collapsed MIM model outputs one constant ``c`` for every input, and its loss is at
least ``E‖E[x_m] − x_m‖² = Var(x_m)``, the variance of the voxels to be reconstructed over the
dataset and the masking distribution (E-MIM eqs. 2-3). When this floor lies below the loss a
healthy model reaches, the optimiser prefers the constant (E-MIM Fig. 2).
[`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor] estimates it by Monte Carlo
for any mask generator and any dataset, with a standard error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import Dataset

from mrissl._checks import check_bool, check_finite, check_number
from mrissl._progress import ProgressBar
from mrissl.diagnostics._floor_common import (
    CollapseFloor,
    Constant,
    FloorMaskGenerator,
    Over,
    PatchSize,
)
from mrissl.diagnostics._floor_data import FloorSource
from mrissl.diagnostics._floor_pass import SharedFloorPass
from mrissl.diagnostics.floor_meter import CollapseFloorMeter
from mrissl.distributed import rank as _rank

__all__ = ["CollapseFloor", "CollapseFloorMeter", "FloorMaskGenerator", "collapsed_loss_floor"]


def collapsed_loss_floor(
    data: torch.Tensor | Dataset[Any] | Iterable[Any],
    mask_generator: FloorMaskGenerator,
    *,
    patch_size: PatchSize,
    num_draws: int = 10,
    constant: Constant = "voxel",
    on: Over = "masked",
    batch_size: int = 4,
    key: str = "image",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    num_workers: int = 0,
    gather_distributed: bool = False,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    debias: bool = True,
) -> CollapseFloor:
    r"""Monte Carlo estimate of Var(x_m), the loss of a completely collapsed MIM model.

    A collapsed model outputs the same prediction ``c`` for every input; the best such
    prediction is the mean of the masked voxels and its loss is their variance (E-MIM eq. 3):
    ``L_MIM ≥ E‖E[x_m] − x_m‖² = Var(x_m)``.

    ``constant`` says which constants a collapsed model may use (one per voxel and modality:
    the dataset's mean image, for registered data; or one per modality, for random crops) and
    ``on`` over which voxels the loss is averaged. The data are read once whatever
    ``num_draws``: every volume gets ``num_draws`` masks, the first half fit the constants and
    each remaining draw gives one held-out loss value; ``floor`` is their mean and
    ``std_error`` their standard error. The guide derives the estimator and its bias
    correction, and says which floor fits which setup:
    [Complete collapse][complete-collapse-the-floor-varx_m].

    Missing modalities: mapping items or batches may carry ``"available"``, a ``(C,)`` or
    ``(B, C)`` bool tensor (True = present); a case then contributes only the modalities it
    has. Memory does not grow with the number of volumes (about ``32 + 12·E`` bytes per voxel
    of one volume with ``constant="voxel"``, ``E`` the evaluation draws).

    Args:
        data: a float tensor ``(M, C, D, H, W)`` or ``(C, D, H, W)``; a map-style Dataset
            whose items are ``(C, D, H, W)`` tensors, mappings holding one under ``key``, or
            tuples whose first element is one; or a re-iterable DataLoader (any re-iterable)
            yielding ``(B, C, D, H, W)`` batches in the same three forms.
        mask_generator: called as ``mask_generator(volume, patch_size, generator=generator)``
            with ``volume: (B, C, D, H, W)`` (and ``available=`` when the data carry it);
            returns ``(B, C, N)`` bool token masks, ``(B, N)`` per-position masks or
            ``(B, C, D, H, W)`` bool voxel masks, True = masked (token grid of ``patch_size``,
            raster order, depth slowest): a
            [`FloorMaskGenerator`][mrissl.diagnostics.FloorMaskGenerator].
        patch_size: the patch size of the token grid, an int or 3 ints; ``None`` for
            generators that use their own block size (BlockMask-like): their token masks are
            then read on the grid of the generator's ``block_size`` attribute, and voxel masks
            need no grid.
        num_draws: masks per volume, ``>= 3`` (at least 2 evaluation draws).
        constant: ``"voxel"`` or ``"modality"``, see above.
        on: ``"masked"`` or ``"all"``, the voxels the loss is averaged over, as in
            [`masked_reconstruction_loss`][mrissl.losses.masked_reconstruction_loss]; see above.
        batch_size: volumes per call of ``mask_generator`` for tensors and Datasets.
        key: the image entry of mapping items or batches (MONAI's default ``"image"``).
        generator: passed to ``mask_generator``; seeds the draws reproducibly.
        seed: instead of ``generator``, draw the masks of the volume with index ``i`` from its
            own generator seeded by ``(seed, i)``: the result then does not depend on the
            batch size, the number of workers or of processes. ``i`` is the volume's position
            in a tensor or Dataset, the ``"index"`` entry of mapping batches, or else the
            position in the loader.
        num_workers: loader processes reading a Dataset (``torch.utils.data.DataLoader``).
        gather_distributed: merge the sums of every process with ``torch.distributed``
            all-reduce, so every process returns the floor of the whole dataset. Tensors and
            Datasets are then split among the processes (volume ``i`` to rank
            ``i mod world_size``); a loader must be sharded by the caller.
        device: where masks are drawn and sums accumulated (default: the data's device for a
            tensor, else the CPU).
        progress: show a progress bar (tqdm if installed, else a line on stderr); default
            on when ``data`` is a loader.
        debias: subtract the estimated variance of the fitted constants (step 2). Turn it off
            when the fit draws enumerate every mask exactly, so that ``ĉ`` has no variance.

    Returns:
        A [`CollapseFloor`][mrissl.diagnostics.CollapseFloor] with the floor, its standard
        error, a per-modality breakdown and the masked fraction.

    Raises:
        TypeError: for data of an unsupported kind, non-float volumes or a non-bool mask.
        ValueError: for bad arguments, a mask of the wrong shape, volumes of different shapes
            with ``constant="voxel"``, or a mask generator that masks no voxel in a draw.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> volumes = torch.rand(6, 2, 8, 8, 8, generator=g)  # (M, C, D, H, W)
        >>> def random_tokens(volume, patch_size, generator=None):  # masks 3 of 8 tokens
        ...     B, C = volume.shape[:2]
        ...     scores = torch.rand(B, C, 8, generator=generator)
        ...     return scores.argsort(dim=-1).argsort(dim=-1) < 3
        >>> result = collapsed_loss_floor(volumes, random_tokens, patch_size=4, num_draws=20,
        ...                               generator=g)
        >>> exact = volumes.var(dim=0, unbiased=False).mean()  # every voxel equally likely masked
        >>> print(f"{result.floor:.3f} vs exact {exact:.3f}")
        0.068 vs exact 0.068
        >>> round(result.masked_fraction, 3), tuple(result.per_modality.shape)
        (0.375, (2,))
    """
    check_number(batch_size, "batch_size", low=1, integer=True)
    check_number(num_workers, "num_workers", low=0, integer=True)
    if isinstance(data, torch.Tensor):  # offline: the values are always checked
        if data.ndim > 0 and data.shape[0] == 0:
            raise ValueError(f"data must hold at least one volume, got shape {tuple(data.shape)}")
        check_finite(data, "data", always=True)
    meter = CollapseFloorMeter(
        mask_generator,
        patch_size=patch_size,
        num_draws=num_draws,
        constant=constant,
        on=on,
        generator=generator,
        seed=seed,
        gather_distributed=gather_distributed,
        device=device,
        debias=debias,
    )
    shared = SharedFloorPass([meter])  # the meter's sums, with batched products over tokens
    source = FloorSource(data, batch_size, key, num_workers, shard=gather_distributed)
    if device is None and isinstance(source.data, torch.Tensor):
        meter.device = source.data.device
    show = source.is_loader if progress is None else check_bool(progress, "progress")
    bar = ProgressBar(source.length, "collapsed_loss_floor", "batch", enabled=show and _rank() == 0)
    try:
        for volume, available, index in source:
            shared.update(volume, available=available, index=index)
            bar.update()
    finally:
        bar.close()
    return shared.compute()[0]

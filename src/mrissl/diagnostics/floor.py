"""The complete-collapse floor Var(x_m): the loss of the best constant predictor (E-MIM eq. 3).

A completely collapsed MIM model outputs one constant ``c`` for every input, and its loss is at
least ``E‖E[x_m] − x_m‖² = Var(x_m)``, the variance of the voxels to be reconstructed over the
dataset and the masking distribution (E-MIM eqs. 2-3). When this floor lies below the loss a
healthy model reaches, the optimiser prefers the constant (E-MIM Fig. 2).
[`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor] estimates it by Monte Carlo
for any mask generator and any dataset, with a standard error.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from mrissl._checks import check_floating, check_tensor, to_triple
from mrissl.nn import grid_size, unpatchify

__all__ = ["CollapseFloor", "collapsed_loss_floor"]

Constant = Literal["voxel", "modality"]
Reduction = Literal["masked", "all"]
PatchSize = int | Sequence[int] | None
MaskGenerator = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class CollapseFloor:
    """The floor estimated by [`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor].

    Attributes:
        floor: the estimate of Var(x_m), the MSE of the best constant predictor.
        std_error: its standard error over the independent evaluation draws.
        per_modality: ``(C,)`` float64, the floor of the loss restricted to each modality's
            masked voxels (NaN for a modality that no evaluation draw masked).
        per_modality_std_error: ``(C,)`` float64 standard errors of ``per_modality``.
        masked_fraction: the mean fraction of voxels masked per draw.
        num_draws: the number of passes over the data (fit plus evaluation draws).
        num_volumes: the number of volumes seen in one pass.
        constant: ``"voxel"`` or ``"modality"`` (see the function).
        reduction: ``"masked"`` or ``"all"`` (see the function).
    """

    floor: float
    std_error: float
    per_modality: torch.Tensor
    per_modality_std_error: torch.Tensor
    masked_fraction: float
    num_draws: int
    num_volumes: int
    constant: str
    reduction: str

    def __str__(self) -> str:
        return (
            f"Var(x_m) = {self.floor:.6g} ± {self.std_error:.2g} (constant per {self.constant}, "
            f"mean over {self.reduction} voxels, {self.masked_fraction:.1%} masked, "
            f"{self.num_volumes} volumes × {self.num_draws} draws)"
        )


class _Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


class _StderrProgress:
    """A one-line progress counter on stderr, used when tqdm is not installed."""

    def __init__(self, total: int | None, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\r{self.desc}: {self.done}{of} batches")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int | None, desc: str) -> _Progress:
    if not enabled:
        return _NoProgress()
    try:  # optional: tqdm is not a dependency of mrissl
        tqdm_auto = importlib.import_module("tqdm.auto")
    except ImportError:
        return _StderrProgress(total, desc)
    bar: _Progress = tqdm_auto.tqdm(total=total, desc=desc, unit="batch", file=sys.stderr)
    return bar


def _extract(item: Any, key: str, what: str) -> torch.Tensor:
    """The image tensor of a batch or dataset item: a tensor, ``item[key]`` or ``item[0]``."""
    if isinstance(item, Mapping):
        if key not in item:
            raise ValueError(
                f"{what} is a mapping without the key {key!r} (keys: {sorted(map(str, item))}); "
                "pass key= naming the image entry"
            )
        item = item[key]
    elif isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(
            f"{what} must be a tensor, a mapping holding one under key {key!r}, or a tuple "
            f"whose first element is one; got {type(item).__name__}"
        )
    return item


def _as_batch(x: torch.Tensor, what: str) -> torch.Tensor:
    check_tensor(x, what, ndim=(4, 5))
    check_floating(x, what)
    return x.unsqueeze(0) if x.ndim == 4 else x


class _Source:
    """Re-iterable batches ``(B, C, D, H, W)`` from a tensor, a Dataset or a DataLoader."""

    def __init__(self, data: Any, batch_size: int, key: str) -> None:
        self.data, self.batch_size, self.key = data, batch_size, key
        self.is_loader = False
        if isinstance(data, torch.Tensor):
            volumes = _as_batch(data, "data")
            self.data = volumes
            self.length: int | None = -(-volumes.shape[0] // batch_size)
        elif isinstance(data, DataLoader) or (
            isinstance(data, Iterable)
            and not isinstance(data, (Dataset, Sequence))
            and iter(data) is not data
        ):
            self.is_loader = True
            self.length = len(data) if isinstance(data, Sized) else None
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.length = -(-len(data) // batch_size)
        else:
            raise TypeError(
                "data must be a tensor (M, C, D, H, W) or (C, D, H, W), a map-style Dataset of "
                "(C, D, H, W) tensors, or a re-iterable DataLoader of (B, C, D, H, W) batches; "
                f"got {type(data).__name__}"
            )

    def __iter__(self) -> Iterator[torch.Tensor]:
        if isinstance(self.data, torch.Tensor):
            yield from torch.split(self.data, self.batch_size)
        elif self.is_loader:
            for batch in self.data:
                yield _as_batch(_extract(batch, self.key, "a batch of data"), "a batch of data")
        else:
            n = len(self.data)
            for start in range(0, n, self.batch_size):
                items = []
                for i in range(start, min(start + self.batch_size, n)):
                    x = _extract(self.data[i], self.key, f"data[{i}]")
                    check_tensor(x, f"data[{i}]", ndim=4)
                    items.append(x)
                if all(x.shape == items[0].shape for x in items):
                    yield _as_batch(torch.stack(items), "a batch of data")
                else:  # crops of different sizes: one volume at a time
                    yield from (_as_batch(x, "data item") for x in items)


def _voxel_mask(mask: Any, volume: torch.Tensor, patch_size: PatchSize) -> torch.Tensor:
    """Turn a generator's output into a ``(B, C, D, H, W)`` bool voxel mask."""
    B, C = volume.shape[:2]
    spatial = tuple(volume.shape[2:])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask_generator must return a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask_generator must return a bool mask (True = masked), got {mask.dtype}")
    mask = mask.to(volume.device)
    if tuple(mask.shape) == tuple(volume.shape):
        voxels: torch.Tensor = mask
        return voxels
    if mask.ndim in (2, 3) and mask.shape[0] == B:
        if patch_size is None:
            raise ValueError(
                f"mask_generator returned a token mask of shape {tuple(mask.shape)} but "
                "patch_size is None; give the patch size that defines the token grid"
            )
        patch = to_triple(patch_size, "patch_size")
        grid = grid_size(spatial, patch)
        N = grid[0] * grid[1] * grid[2]
        if mask.ndim == 2:  # per-position mask (B, N): every modality at once
            mask = mask[:, None, :].expand(B, C, mask.shape[1])
        if tuple(mask.shape) == (B, C, N):
            patch_len = patch[0] * patch[1] * patch[2]
            return unpatchify(mask[..., None].expand(B, C, N, patch_len), patch, spatial)
    raise ValueError(
        f"mask_generator returned a mask of shape {tuple(mask.shape)} for a volume of shape "
        f"{tuple(volume.shape)}; expected a token mask (B, C, N) or (B, N) on the grid of "
        f"patch_size {patch_size!r}, or a voxel mask (B, C, D, H, W)"
    )


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def collapsed_loss_floor(
    data: torch.Tensor | Dataset[Any] | Iterable[Any],
    mask_generator: MaskGenerator,
    *,
    patch_size: PatchSize,
    num_draws: int = 10,
    constant: Constant = "voxel",
    reduction: Reduction = "masked",
    batch_size: int = 4,
    key: str = "image",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    debias: bool = True,
) -> CollapseFloor:
    r"""Monte Carlo estimate of Var(x_m), the loss of a completely collapsed MIM model.

    A collapsed model outputs the same prediction ``c`` for every input; the best such
    prediction is the mean of the masked voxels and its loss is Var(x_m) (E-MIM eqs. 2-3).
    Which constants the collapsed model may use is a choice:

    * ``constant="voxel"`` (default): one constant per voxel position and modality,
      ``c_{c,v} = E[m_{c,v} x_{c,v}] / E[m_{c,v}]``. On registered data this is the collapse
      E-MIM Fig. 1a shows (the dataset's mean image); when every voxel is equally likely to be
      masked and masks do not depend on the image, the floor is the mean over voxels of the
      per-voxel variance across the dataset. Every volume must then have the same shape.
    * ``constant="modality"``: one constant per modality, for translation-invariant settings
      such as random crops (volumes may differ in size).

    and how the loss is averaged:

    * ``reduction="masked"`` (default): ``Var(x_m) = E[Σ m (x − c)²] / E[Σ m]``, the loss
      averaged over masked voxels (``((pred - target) ** 2)[mask].mean()``): the floor of a
      model that ignores its input, scored on the masked voxels or, for masks that hide every
      voxel equally often, on the whole image (E-MIM eq. 9) alike.
    * ``reduction="all"``: the loss averaged over all voxels with unmasked ones contributing
      0, which is the ``"masked"`` floor times the masked fraction: the eq. 9 loss of a model
      that copies the visible voxels and outputs the constant at the masked ones.

    For a mask that ignores the image and hides every voxel equally often, the default floor
    is the same whatever the mask (an identity: the masking probability cancels); it depends
    on the mask only through ``reduction="all"``, a masking probability that varies over the
    voxels, or a mask that depends on the image.

    Estimation: every draw is one pass over ``data`` with a fresh mask for every volume.

    1. The first ``num_draws // 2`` draws fit the constants ``ĉ = Σ m x / Σ m`` (a voxel never
       masked there uses its mean over all fitted volumes).
    2. Each remaining draw gives one value ``L_r``: the loss of ``ĉ`` on that draw's own,
       unseen masks. Held out, ``ĉ`` costs its own variance on top of the floor,
       ``E[L_r] = Var(x_m) + Var(ĉ)``; with ``debias=True`` an estimate of ``Var(ĉ)`` from the
       fit draws (sample variance / number of masked values, times the finite-population factor
       ``(n − s₀)/(n − 1)`` of choosing ``s₀`` masked values among the ``n`` draw × volume pairs)
       is subtracted, so ``L_r`` is unbiased to first order.
    3. ``floor`` is the mean of the ``L_r`` and ``std_error`` their standard deviation over
       ``√(number of evaluation draws)``: a standard error over independent draws, i.e. over the
       randomness of the masks (and of the loader's augmentations, if any), the dataset being
       the population.

    Elementwise work runs in float32 (float64 input stays float64) and every sum is accumulated
    in float64 on ``device``; memory is five ``(C, D, H, W)`` float64 arrays plus a few copies
    of one batch in float32, so choose ``batch_size`` (or the loader's) for your volume size.
    With few volumes, raise ``num_draws``.

    Args:
        data: a float tensor ``(M, C, D, H, W)`` or ``(C, D, H, W)``; a map-style Dataset
            whose items are ``(C, D, H, W)`` tensors, mappings holding one under ``key``, or
            tuples whose first element is one; or a re-iterable DataLoader (any re-iterable)
            yielding ``(B, C, D, H, W)`` batches in the same three forms.
        mask_generator: called as ``mask_generator(volume, patch_size, generator=generator)``
            with ``volume: (B, C, D, H, W)``; returns ``(B, C, N)`` bool token masks,
            ``(B, N)`` per-position masks or ``(B, C, D, H, W)`` bool voxel masks, True =
            masked (token grid of ``patch_size``, raster order, depth slowest).
        patch_size: the patch size of the token grid, an int or 3 ints; ``None`` for
            generators that use their own block size (BlockMask-like): their token masks are
            then read on the grid of the generator's ``block_size`` attribute, and voxel masks
            need no grid.
        num_draws: passes over the data, ``>= 3`` (at least 2 evaluation draws).
        constant: ``"voxel"`` or ``"modality"``, see above.
        reduction: ``"masked"`` or ``"all"``, see above.
        batch_size: volumes per call of ``mask_generator`` for tensors and Datasets.
        key: the image entry of mapping items or batches (MONAI's default ``"image"``).
        generator: passed to ``mask_generator``; seeds the draws reproducibly.
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
        >>> print(f"{result.floor:.4f} ± {result.std_error:.4f} vs exact {exact:.4f}")
        0.0679 ± 0.0004 vs exact 0.0680
        >>> round(result.masked_fraction, 3), tuple(result.per_modality.shape)
        (0.375, (2,))
    """
    _check_choice(constant, "constant", ("voxel", "modality"))
    _check_choice(reduction, "reduction", ("masked", "all"))
    _check_count(num_draws, "num_draws", 3)
    _check_count(batch_size, "batch_size", 1)
    if not callable(mask_generator):
        raise TypeError(f"mask_generator must be callable, got {type(mask_generator).__name__}")
    if patch_size is not None:
        to_triple(patch_size, "patch_size")
    source = _Source(data, batch_size, key)
    if device is None:
        device = source.data.device if isinstance(source.data, torch.Tensor) else "cpu"
    dev = torch.device(device)
    show = source.is_loader if progress is None else bool(progress)
    total = None if source.length is None else source.length * num_draws
    bar = _progress_bar(show, total, "collapsed_loss_floor")

    fit_draws = num_draws // 2
    state = _State(constant, dev, debias)
    try:
        for draw in range(fit_draws):
            state.run_draw(source, mask_generator, patch_size, generator, draw, bar, fit=True)
        state.fix_constants()
        for draw in range(fit_draws, num_draws):
            state.run_draw(source, mask_generator, patch_size, generator, draw, bar, fit=False)
    finally:
        bar.close()
    return _summarise(state, reduction, num_draws)


class _State:
    """Running sums of the fit draws and one ``(rss, masked, voxels)`` row per evaluation draw."""

    def __init__(self, constant: str, device: torch.device, debias: bool) -> None:
        self.constant, self.device, self.debias = constant, device, debias
        self.reduce_dims: tuple[int, ...] = (0,) if constant == "voxel" else (0, 2, 3, 4)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.s0 = self.s1 = self.s2 = self.x_sum = self.n_fit = zero
        self.c = self.var_c = zero
        self.shift: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.num_volumes = 0

    def fix_constants(self) -> None:
        # E-MIM eq. 3: the best constant is the mean of the masked voxels, c = Σ m x / Σ m;
        # a voxel that was never masked while fitting falls back to its overall mean
        s0, n = self.s0, self.n_fit
        shift = torch.zeros_like(self.s1) if self.shift is None else self.shift
        fallback = self.x_sum / n.clamp(min=1.0)
        mean = self.s1 / s0.clamp(min=1.0)  # of the shifted values
        self.c = torch.where(s0 > 0, shift + mean, fallback)
        # Held out, the fitted constants cost their own variance on top of the floor:
        # Var(c_hat) = sample variance / s0, times the finite-population factor (n - s0)/(n - 1)
        # of drawing s0 masked values out of the n (draw, volume) pairs seen while fitting.
        sample_var = (self.s2 - mean * self.s1).clamp(min=0) / (s0 - 1).clamp(min=1.0)
        fpc = ((n - s0) / (n - 1).clamp(min=1.0)).clamp(min=0)
        self.var_c = torch.where(s0 > 1, sample_var / s0.clamp(min=1.0) * fpc, 0.0)
        if not self.debias:
            self.var_c = torch.zeros_like(self.var_c)
        if self.constant == "modality":
            self.c = self.c.view(-1, 1, 1, 1)
            self.var_c = self.var_c.view(-1, 1, 1, 1)

    def run_draw(
        self,
        source: _Source,
        mask_generator: MaskGenerator,
        patch_size: PatchSize,
        generator: torch.Generator | None,
        draw: int,
        bar: _Progress,
        *,
        fit: bool,
    ) -> None:
        per_modality = (0, 2, 3, 4)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        rss = masked = voxels = zero
        seen = 0
        for volume in source:
            volume = volume.to(self.device)
            if self.shape is None:
                self.shape = tuple(volume.shape[1:])
            _check_shape(volume, self.shape, self.constant)
            raw = mask_generator(volume, patch_size, generator=generator)
            grid_patch = patch_size
            if grid_patch is None:  # BlockMask-like: tokens are the generator's own blocks
                grid_patch = getattr(mask_generator, "block_size", None)
            # elementwise work in float32 (float64 input stays float64), every sum in float64
            dtype = torch.float64 if volume.dtype == torch.float64 else torch.float32
            m = _voxel_mask(raw, volume, grid_patch).to(dtype)
            x = volume.to(dtype)
            f64 = torch.float64
            seen += volume.shape[0]
            if fit:
                if self.shift is None:  # any reference value; it keeps s2 - s1²/s0 accurate
                    self.shift = x.mean(dim=self.reduce_dims, dtype=f64)
                shift = self.shift if self.constant == "voxel" else self.shift.view(-1, 1, 1, 1)
                xc = x - shift.to(dtype)
                xm = m * xc
                self.s0 = self.s0 + m.sum(dim=self.reduce_dims, dtype=f64)
                self.s1 = self.s1 + xm.sum(dim=self.reduce_dims, dtype=f64)
                self.s2 = self.s2 + (xm * xc).sum(dim=self.reduce_dims, dtype=f64)
                self.x_sum = self.x_sum + x.sum(dim=self.reduce_dims, dtype=f64)
                per_constant = 1 if self.constant == "voxel" else x[0, 0].numel()
                self.n_fit = self.n_fit + volume.shape[0] * per_constant
                masked = masked + m.sum()
            else:
                sq = (x - self.c.to(dtype)) ** 2 - self.var_c.to(dtype)  # E-MIM eq. 2, less
                rss = rss + (m * sq).sum(dim=per_modality, dtype=f64)  # the constants' noise
                masked = masked + m.sum(dim=per_modality, dtype=f64)
                voxels = voxels + volume.shape[0] * x[0, 0].numel()
            bar.update()
        if seen == 0:
            raise ValueError("data yielded no volumes")
        self.num_volumes = seen
        if float(masked.sum()) == 0:
            raise ValueError(_NOTHING_MASKED.format(draw=draw))
        if not fit:
            self.rows.append((rss, masked, voxels.expand_as(masked)))


_NOTHING_MASKED = (
    "mask_generator masked no voxel of any volume in draw {draw}: the floor of a loss over "
    "masked voxels is undefined; check the generator's mask ratio (True must mean masked)"
)


def _check_shape(volume: torch.Tensor, shape: tuple[int, ...], constant: str) -> None:
    if volume.shape[1] != shape[0]:
        raise ValueError(
            f"every volume must have the same number of modalities: got {volume.shape[1]} after "
            f"{shape[0]} (volume shape {tuple(volume.shape[1:])})"
        )
    if constant == "voxel" and tuple(volume.shape[1:]) != shape:
        raise ValueError(
            f"constant='voxel' needs every volume to have the same shape (C, D, H, W), got "
            f"{tuple(volume.shape[1:])} after {shape}; use constant='modality' for crops of "
            "varying size"
        )


def _summarise(state: _State, reduction: str, num_draws: int) -> CollapseFloor:
    rss, masked, voxels = (torch.stack(parts).cpu() for parts in zip(*state.rows, strict=True))
    denom = voxels if reduction == "all" else masked  # (R, C) each
    values = rss.sum(dim=1) / denom.sum(dim=1)  # one loss value per evaluation draw
    per_mod = torch.where(masked > 0, rss / denom.clamp(min=1.0), torch.nan)
    finite = torch.isfinite(per_mod)
    n_mod = finite.sum(dim=0)
    per_mod_mean = per_mod.nanmean(dim=0)
    dev2 = torch.where(finite, (per_mod - per_mod_mean) ** 2, 0.0).sum(dim=0)
    per_mod_se = (dev2 / (n_mod - 1).clamp(min=1)).sqrt() / n_mod.clamp(min=1).sqrt()
    per_mod_se = torch.where(n_mod >= 2, per_mod_se, torch.nan)
    return CollapseFloor(
        floor=float(values.mean()),
        std_error=float(values.std() / values.numel() ** 0.5),
        per_modality=per_mod_mean,
        per_modality_std_error=per_mod_se,
        masked_fraction=float((masked.sum(dim=1) / voxels.sum(dim=1)).mean()),
        num_draws=num_draws,
        num_volumes=state.num_volumes,
        constant=state.constant,
        reduction=reduction,
    )

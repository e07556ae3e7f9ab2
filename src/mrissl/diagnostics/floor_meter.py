"""[`CollapseFloorMeter`][mrissl.diagnostics.CollapseFloorMeter]: the collapse floor, streamed."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mrissl._checks import (
    check_available,
    check_bool,
    check_choice,
    check_generator_type,
    check_number,
    to_triple,
)
from mrissl.diagnostics._floor_common import (
    CollapseFloor,
    Constant,
    FloorMaskGenerator,
    Over,
    PatchSize,
    _as_batch,
    _BlockSized,
)
from mrissl.distributed import all_reduce_, is_distributed
from mrissl.distributed import world_size as _world_size
from mrissl.nn import grid_size

__all__ = ["CollapseFloorMeter"]


def _as_index(index: Any, n: int, what: str) -> torch.Tensor | None:
    if index is None:
        return None
    out = torch.as_tensor(index).reshape(-1)
    if out.numel() != n or out.is_floating_point() or out.dtype == torch.bool:
        raise ValueError(f"{what}: index must hold {n} integers, got {index!r}")
    return out


def _as_mask(
    mask: Any, volume: torch.Tensor, patch_size: PatchSize
) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    """A generator's output as ``(B, C, N)`` tokens with their patch, or ``(B, C, D, H, W)``."""
    B, C = volume.shape[:2]
    spatial = tuple(volume.shape[2:])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask_generator must return a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask_generator must return a bool mask (True = masked), got {mask.dtype}")
    mask = mask.to(volume.device)
    if tuple(mask.shape) == tuple(volume.shape):
        return mask, None
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
            return mask, patch
    raise ValueError(
        f"mask_generator returned a mask of shape {tuple(mask.shape)} for a volume of shape "
        f"{tuple(volume.shape)}; expected a token mask (B, C, N) or (B, N) on the grid of "
        f"patch_size {patch_size!r}, or a voxel mask (B, C, D, H, W)"
    )


def _to_voxels(
    tokens: torch.Tensor, patch: tuple[int, int, int], spatial: Sequence[int]
) -> torch.Tensor:
    """``(B, C, N)`` per-token values to ``(B, C, D, H, W)``, each token's value on its patch."""
    B, C = tokens.shape[:2]
    (gd, gh, gw), (p0, p1, p2) = grid_size(tuple(spatial), patch), patch
    per_patch = tokens.reshape(B, C, gd, 1, gh, 1, gw, 1).expand(B, C, gd, p0, gh, p1, gw, p2)
    return per_patch.reshape(B, C, *spatial)


def _token_sums(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` to ``(B, C, N)``: the sum over each token's patch, in float64."""
    B, C = x.shape[:2]
    (gd, gh, gw), (p0, p1, p2) = grid_size(tuple(x.shape[2:]), patch), patch
    per_patch = x.reshape(B, C, gd, p0, gh, p1, gw, p2)
    return per_patch.sum(dim=(3, 5, 7), dtype=torch.float64).reshape(B, C, gd * gh * gw)


def _seed_for(seed: int, index: int) -> int:
    """A 63-bit seed for volume ``index``: the same on every process and worker."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class CollapseFloorMeter:
    """The complete-collapse floor, streamed: ``update`` with batches, ``compute`` at the end.

    [`collapsed_loss_floor`][mrissl.diagnostics.collapsed_loss_floor] runs one. Every
    ``update`` draws ``num_draws`` masks for each volume and adds them to per-draw sums
    (see the function for the estimator); nothing is kept per volume, so memory does not grow
    with the dataset, and the data are read once. ``compute`` merges the sums of all processes
    with ``torch.distributed`` all-reduce when ``gather_distributed=True`` (every process must
    call it), giving the floor of the whole dataset. Several meters can share one pass over
    the data (one per mask generator).

    Args:
        mask_generator: as in the function.
        patch_size: as in the function.
        num_draws: masks per volume, ``>= 3``.
        constant: ``"voxel"`` or ``"modality"``.
        on: ``"masked"`` or ``"all"``.
        generator: the random source of the masks when ``update`` gets no ``index``.
        seed: with ``update(..., index=...)``, each volume's masks come from a generator
            seeded by ``(seed, index)``: results independent of batching and processes.
        gather_distributed: merge every process's sums in ``compute``.
        device: where masks are drawn and sums kept (default: the CPU).
        debias: as in the function.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> def half(volume, patch_size, generator=None, available=None):  # 4 of 8 tokens
        ...     scores = torch.rand(volume.shape[0], volume.shape[1], 8, generator=generator)
        ...     return scores.argsort(dim=-1).argsort(dim=-1) < 4
        >>> meter = CollapseFloorMeter(half, patch_size=4, num_draws=6, seed=0)
        >>> for i in range(3):  # one case at a time; the second one lacks modality 1
        ...     x = torch.rand(1, 2, 8, 8, 8, generator=g)
        ...     meter.update(x, available=torch.tensor([[True, i != 1]]), index=[i])
        >>> result = meter.compute()
        >>> result.num_volumes, result.per_modality_volumes.tolist()
        (3, [3, 2])
    """

    def __init__(
        self,
        mask_generator: FloorMaskGenerator,
        *,
        patch_size: PatchSize,
        num_draws: int = 10,
        constant: Constant = "voxel",
        on: Over = "masked",
        generator: torch.Generator | None = None,
        seed: int | None = None,
        gather_distributed: bool = False,
        device: torch.device | str | None = None,
        debias: bool = True,
    ) -> None:
        check_choice(constant, "constant", ("voxel", "modality"))
        check_choice(on, "on", ("masked", "all"))
        check_number(num_draws, "num_draws", low=3, integer=True)
        check_bool(gather_distributed, "gather_distributed")
        check_bool(debias, "debias")
        if not callable(mask_generator):
            raise TypeError(f"mask_generator must be callable, got {type(mask_generator).__name__}")
        if patch_size is not None:
            to_triple(patch_size, "patch_size")
        if seed is not None:
            check_number(seed, "seed", low=0, integer=True)
        check_generator_type(generator)
        self.mask_generator, self.patch_size = mask_generator, patch_size
        self.num_draws, self.constant, self.on = num_draws, constant, on
        self.generator, self.seed = generator, seed
        self.gather_distributed, self.debias = gather_distributed, debias
        self.device = torch.device("cpu" if device is None else device)
        self.fit_draws = num_draws // 2
        self.reset()

    def reset(self) -> None:
        """Forget every volume seen."""
        self._shape: tuple[int, ...] | None = None
        self._e0_patch: tuple[int, int, int] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self.num_volumes = 0

    def _allocate(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        e0_patch: tuple[int, int, int] | None,
        *,
        zero: bool = True,
    ) -> None:
        """Sums per constant (``(C, D, H, W)`` or ``(C,)``); the evaluation draws' per draw.

        With one constant per voxel and token masks, the evaluation draws' mask counts are
        kept per token (``(E, C, N)``, ``e0_patch`` set): the loss needs them only against
        per-voxel weights summed over each token's patch. ``zero=False`` leaves the sums
        uninitialised, for a caller that writes every one of them.
        """
        C = shape[0]
        voxel = self.constant == "voxel"
        per = tuple(shape) if voxel else (C,)
        count = torch.float32 if voxel else torch.float64
        E, f64, dev = self.num_draws - self.fit_draws, torch.float64, self.device
        self._e0_patch = e0_patch if voxel else None
        e0_shape = (E, *per)
        if self._e0_patch is not None:
            e0_shape = (E, C, math.prod(grid_size(tuple(shape[1:]), self._e0_patch)))
        # float32 data, one constant per voxel: the sums that meet no cancellation (s2, x_sum)
        # and the evaluation draws' Σ m (x - shift), which only meets small c - shift, stay
        # in float32; the fit's Σ m (x - shift), which gives the constants, in float64
        wide = f64 if dtype == f64 or not voxel else torch.float32
        new = torch.zeros if zero else torch.empty
        self._sums = {
            "shift": new(per, dtype=dtype, device=dev),
            "s0": new(per, dtype=count, device=dev),  # fit: Σ m
            "s1": new(per, dtype=f64, device=dev),  # fit: Σ m (x - shift)
            "s2": new(per, dtype=wide, device=dev),  # fit: Σ m (x - shift)²
            "x_sum": new(per, dtype=wide, device=dev),  # Σ x over present volumes
            "n": new(C, dtype=f64, device=dev),  # values per constant
            "e0": new(e0_shape, dtype=count, device=dev),  # per evaluation draw
            "e1": new((E, *per), dtype=wide, device=dev),
            "e2": new((E, C), dtype=f64, device=dev),
            "voxels": new(C, dtype=f64, device=dev),  # present voxels
            "fit_masked": new(self.fit_draws, dtype=f64, device=dev),
            "volumes": new(C, dtype=f64, device=dev),  # volumes per modality
        }
        self._shape = tuple(shape)

    def _e0_to_voxels(self) -> None:
        """Keep the evaluation draws' mask counts per voxel from now on."""
        if self._e0_patch is not None and self._shape is not None:
            tokens = self._sums["e0"]
            self._sums["e0"] = _to_voxels(tokens, self._e0_patch, self._shape[1:]).clone()
            self._e0_patch = None

    def _masks(
        self, x: torch.Tensor, available: torch.Tensor | None, index: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, tuple[int, int, int] | None]]:
        """``num_draws`` masks, token ``(B, C, N)`` with their patch or voxel, True = masked."""
        extra = {} if available is None else {"available": available}
        grid_patch = self.patch_size
        if grid_patch is None and isinstance(self.mask_generator, _BlockSized):
            grid_patch = self.mask_generator.block_size  # tokens: the generator's own blocks
        if self.seed is None or index is None:
            return [
                _as_mask(
                    self.mask_generator(x, self.patch_size, generator=self.generator, **extra),
                    x,
                    grid_patch,
                )
                for _ in range(self.num_draws)
            ]
        draws: list[list[tuple[torch.Tensor, tuple[int, int, int] | None]]] = []
        for b, i in enumerate(index.tolist()):
            g = torch.Generator(device=x.device).manual_seed(_seed_for(self.seed, int(i)))
            one = x[b : b + 1]
            kw = {} if available is None else {"available": available[b : b + 1]}
            draws.append(
                [
                    _as_mask(self.mask_generator(one, self.patch_size, generator=g, **kw), one,
                             grid_patch)
                    for _ in range(self.num_draws)
                ]
            )  # fmt: skip
        return [
            (torch.cat([d[r][0] for d in draws]), draws[0][r][1]) for r in range(self.num_draws)
        ]

    def update(
        self,
        volume: torch.Tensor,
        *,
        available: torch.Tensor | None = None,
        index: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """Add a batch of volumes.

        Args:
            volume: ``(B, C, D, H, W)`` or ``(C, D, H, W)`` floating.
            available: ``(B, C)`` (or ``(C,)``) bool, True = modality present; ``None`` means
                all present. The values of a missing modality are ignored.
            index: ``(B,)`` the volumes' indices in the dataset, for ``seed``.

        Raises:
            TypeError, ValueError: for a bad volume, mask or ``available``, or a shape that
                differs from the first volume's (``constant="voxel"``).
        """
        x, avail, idx = self._prepare(volume, available, index)
        self._accumulate(x, avail, self._masks(x, avail, idx))

    def _prepare(
        self, volume: torch.Tensor, available: Any, index: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``update``'s arguments checked: the batch, ``available`` (None = all), the indices."""
        x = _as_batch(volume, "volume").to(self.device)
        B, C = x.shape[:2]
        avail = None
        if available is not None:
            given = torch.as_tensor(available)
            given = given.unsqueeze(0) if given.ndim == 1 else given
            avail = check_available(given, B, C, self.device)
            if avail is not None and bool(avail.all()):  # all present: nothing to exclude
                avail = None
        if self._shape is not None:
            _check_shape(x, self._shape, self.constant)
        return x, avail, _as_index(index, B, "update")

    def _accumulate(
        self,
        x: torch.Tensor,
        avail: torch.Tensor | None,
        masks: list[tuple[torch.Tensor, tuple[int, int, int] | None]],
    ) -> None:
        """Add one batch and its ``num_draws`` masks to the sums."""
        B, C = x.shape[:2]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self._shape is None:
            self._allocate(tuple(x.shape[1:]), dtype, masks[-1][1])
        sums = self._sums
        f64 = torch.float64
        count = sums["s0"].dtype
        voxel = self.constant == "voxel"
        dims: tuple[int, ...] = (0,) if voxel else (0, 2, 3, 4)
        spatial_shape = tuple(x.shape[2:])
        spatial = x[0, 0].numel()
        xf = x.to(dtype)
        present = torch.ones(B, C, dtype=torch.bool, device=self.device) if avail is None else avail
        present5 = present[:, :, None, None, None]
        if avail is not None:
            xf = torch.where(present5, xf, 0.0)
        if self.num_volumes == 0:  # any reference value; it keeps s2 - s1²/s0 accurate
            n_first = present.sum(dim=0).clamp(min=1).to(dtype)
            mean = xf.sum(dim=dims, dtype=dtype)
            mean = mean / (n_first * (1 if voxel else spatial)).view(-1, *([1] * (mean.ndim - 1)))
            sums["shift"].copy_(mean)
        shift = sums["shift"] if voxel else sums["shift"].view(-1, 1, 1, 1)
        xc = xf - shift

        def add(acc: torch.Tensor, t: torch.Tensor) -> None:
            # per-constant sums over the batch (and space for constant="modality"); with one
            # constant per voxel the batch is summed in the elementwise dtype, then added to
            # the float64 sums in place, without a float64 copy
            if not voxel:
                acc += t.sum(dim=dims, dtype=acc.dtype)
            else:
                acc += t[0] if t.shape[0] == 1 else t.sum(dim=0)

        def voxels_of(mask: torch.Tensor, patch: tuple[int, int, int] | None) -> torch.Tensor:
            return mask if patch is None else _to_voxels(mask, patch, spatial_shape)

        # Fit draws: Σ_r m_r x = k x, with k the number of fit draws masking the voxel, so
        # one pass over the voxels serves them all (E-MIM eq. 3 needs only these sums)
        fit = masks[: self.fit_draws]
        patches = {p for _, p in fit}
        patch = fit[0][1]
        if len(patches) == 1 and patch is not None:  # every fit draw a token mask of one patch
            k_tok = torch.stack([m for m, _ in fit]).sum(dim=0, dtype=dtype)
            k = _to_voxels(k_tok, patch, spatial_shape)
            per_token = float(math.prod(patch))
            for r, (m, _) in enumerate(fit):
                sums["fit_masked"][r] += (m & present[:, :, None]).sum(dtype=f64) * per_token
        else:
            k = torch.zeros_like(xc)
            for r, (m, p) in enumerate(fit):
                mv = voxels_of(m, p) & present5
                k += mv
                sums["fit_masked"][r] += mv.sum(dtype=f64)
        if avail is not None:
            k = k * present5
        kx = k * xc
        add(sums["s0"], k if voxel else k.to(count))
        add(sums["s1"], kx)
        add(sums["s2"], kx * xc)
        # Evaluation draws: each keeps its own sums for the held-out loss
        x2_tokens: dict[tuple[int, int, int], torch.Tensor] = {}
        for e, (m, patch) in enumerate(masks[self.fit_draws :]):
            mv = voxels_of(m, patch)
            if avail is not None:
                mv = mv & present5
            if voxel and patch is not None and patch == self._e0_patch:
                tok = m if avail is None else m & present[:, :, None]
                sums["e0"][e] += tok.sum(dim=0, dtype=count)
            else:
                self._e0_to_voxels()
                add(sums["e0"][e], mv if voxel else mv.to(dtype))
            add(sums["e1"][e], torch.where(mv, xc, 0.0))
            if patch is not None:  # Σ m x² from per-token sums of x²
                if patch not in x2_tokens:
                    x2_tokens[patch] = _token_sums(xc * xc, patch)
                tok = m if avail is None else m & present[:, :, None]
                sums["e2"][e] += (tok * x2_tokens[patch]).sum(dim=(0, 2))
            else:
                sums["e2"][e] += torch.where(mv, xc * xc, 0.0).sum(dim=(0, 2, 3, 4), dtype=f64)
        per_volume = present.sum(dim=0).to(f64)
        add(sums["x_sum"], xf)
        sums["n"] += per_volume * (1 if voxel else spatial)
        sums["voxels"] += per_volume * spatial
        sums["volumes"] += per_volume
        self.num_volumes += B

    def compute(self) -> CollapseFloor:
        """The floor of everything seen (by every process when ``gather_distributed``).

        Raises:
            ValueError: if no volume was seen, or a draw masked no voxel at all.
        """
        gather = self.gather_distributed and is_distributed()
        if gather:
            self._agree_on_shape()
        if self._shape is None:
            raise ValueError("data yielded no volumes")
        reduce = all_reduce_ if gather else (lambda t: t)
        small = {
            name: reduce(self._sums[name].clone())
            for name in ("n", "voxels", "volumes", "fit_masked")
        }
        volumes = self._total_volumes() if gather else self.num_volumes
        if float(small["fit_masked"].min()) == 0:
            draw = int(torch.argmin(small["fit_masked"]))
            raise ValueError(_NOTHING_MASKED.format(draw=draw))
        if self.constant == "voxel":  # one modality at a time: temporaries of one channel
            terms = [self._held_out(ch, small["n"][ch], reduce) for ch in range(self._shape[0])]
            cross, quad, masked = (torch.stack(t, dim=1) for t in zip(*terms, strict=True))
        else:
            cross, quad, masked = self._held_out(slice(None), small["n"], reduce)
        rss = reduce(self._sums["e2"] - 2 * cross + quad)
        masked = reduce(masked)
        for e in range(masked.shape[0]):
            if float(masked[e].sum()) == 0:
                raise ValueError(_NOTHING_MASKED.format(draw=self.fit_draws + e))
        voxels = small["voxels"].expand_as(masked)
        return _summarise(rss, masked, voxels, small["volumes"], self, volumes)

    def _held_out(
        self, part: int | slice, n: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The constants, then each evaluation draw's cross and quadratic terms and mask count.

        ``part`` is one modality (``constant="voxel"``: arrays ``(D, H, W)``, results ``(E,)``)
        or all of them (``constant="modality"``: arrays ``(C,)``, results ``(E, C)``).
        """
        f64 = torch.float64
        sums = self._sums
        shift = sums["shift"][part].to(f64)
        s0_local = sums["s0"][part].to(f64)
        s1 = sums["s1"][part].to(f64)
        s0 = reduce(s0_local.clone())
        # the masked mean over all processes, then Σ m (x - mean)² from each process's shifted
        # sums (its own shift keeps them accurate) without losing precision to cancellation
        mean = reduce(s1 + shift * s0_local) / s0.clamp(min=1.0)
        d = mean - shift
        m2 = reduce(sums["s2"][part].to(f64) - 2 * d * s1 + d * d * s0_local)
        fallback = reduce(sums["x_sum"][part].to(f64)) / n.clamp(min=1.0)
        # E-MIM eq. 3: the best constant is the mean of the masked voxels, c = Σ m x / Σ m;
        # a voxel that was never masked while fitting falls back to its overall mean
        c = torch.where(s0 > 0, mean, fallback)
        # Held out, the fitted constants cost their own variance on top of the floor:
        # Var(c_hat) = sample variance / s0, times the finite-population factor (n - s0)/(n - 1)
        # of drawing s0 masked values out of the n (draw, volume) pairs seen while fitting.
        sample_var = m2.clamp(min=0) / (s0 - 1).clamp(min=1.0)
        pairs = n * self.fit_draws
        fpc = ((pairs - s0) / (pairs - 1).clamp(min=1.0)).clamp(min=0)
        var_c = torch.where(s0 > 1, sample_var / s0.clamp(min=1.0) * fpc, 0.0)
        if not self.debias:
            var_c = torch.zeros_like(var_c)
        # E-MIM eq. 2 on each evaluation draw, less the constants' noise:
        # Σ m (x - c)² - Var(c) Σ m with x - c = (x - shift) - (c - shift)
        d = c - shift
        weight = d * d - var_c
        e1, e0 = sums["e1"][:, part], sums["e0"][:, part]
        if self.constant == "modality":
            return e1 * d, e0 * weight, e0.clone()
        cross = torch.stack([(e1_r * d).sum() for e1_r in e1])
        if self._e0_patch is not None:  # counts per token, weights summed per token
            w_tok = _token_sums(weight[None, None], self._e0_patch)[0, 0]
            quad = (e0.to(f64) * w_tok).sum(dim=1)
            return cross, quad, e0.sum(dim=1, dtype=f64) * math.prod(self._e0_patch)
        quad = torch.stack([(e0_r.to(f64) * weight).sum() for e0_r in e0])
        return cross, quad, torch.stack([e0_r.sum(dtype=f64) for e0_r in e0])

    def _agree_on_shape(self) -> None:
        mine = None if self._shape is None else (self._shape, self._e0_patch)
        shapes: list[Any] = [None] * _world_size()
        dist.all_gather_object(shapes, mine)
        known = [tuple(sh[0]) for sh in shapes if sh is not None]
        if not known:
            return
        forms = {sh[1] for sh in shapes if sh is not None}
        first = known[0]
        for sh in known:
            if sh[0] != first[0] or (self.constant == "voxel" and sh != first):
                raise ValueError(
                    f"the processes saw volumes of different shapes {sorted(set(known))}; "
                    "every volume must have the same shape (C, D, H, W) with constant='voxel'"
                )
        if self._shape is None:  # this process saw no volume: zeros of the agreed shape
            self._allocate(first, torch.float32, next(iter(forms)))
        if len(forms) > 1:  # the processes kept mask counts differently: per voxel for all
            self._e0_to_voxels()

    def _total_volumes(self) -> int:
        total = torch.tensor([float(self.num_volumes)], dtype=torch.float64, device=self.device)
        return int(all_reduce_(total)[0])


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


def _summarise(
    rss: torch.Tensor,
    masked: torch.Tensor,
    voxels: torch.Tensor,
    per_modality_volumes: torch.Tensor,
    meter: CollapseFloorMeter,
    num_volumes: int,
) -> CollapseFloor:
    rss, masked, voxels = rss.cpu(), masked.cpu(), voxels.cpu()
    denom = voxels if meter.on == "all" else masked  # (R, C) each
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
        num_draws=meter.num_draws,
        num_volumes=num_volumes,
        constant=meter.constant,
        on=meter.on,
        per_modality_volumes=per_modality_volumes.cpu().round().to(torch.int64),
    )

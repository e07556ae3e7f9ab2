"""One pass over each batch for several collapse-floor meters at once.

``mrissl collapse-check`` runs one [`CollapseFloorMeter`][mrissl.diagnostics.CollapseFloorMeter]
per mask generator on the same cases. Each meter's ``update`` walks every voxel once per mask
draw; with five generators of eight draws that is forty walks of every case.
[`SharedFloorPass`][mrissl.diagnostics._floor_pass.SharedFloorPass] gives the meters the same
sums with far fewer: token masks are constant on each patch, so every per-voxel sum the meters
keep (``Σ k x``, ``Σ k x²`` for the fit draws' mask counts ``k``; ``Σ m x`` for each evaluation
draw) is a product ``(masks per token) @ (voxels of the token)`` over the cases of the batch,
one batched matrix product per meter on the tokens of the finest common grid. The data are
centred once (one shared reference value per voxel), the mask counts and the per-draw
``Σ m x²`` are kept per token, and at the end each meter receives exactly the sums its own
``update`` would have built, so its ``compute`` (and ``torch.distributed`` merge) is unchanged.

The shared pass applies when every meter uses ``constant="voxel"`` on float32 volumes with
token masks (the command's case); otherwise, or as soon as a batch breaks one of these
conditions, it hands its sums to the meters and calls their own ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mrissl.diagnostics._floor_common import CollapseFloor
from mrissl.diagnostics.floor_meter import CollapseFloorMeter, _check_shape
from mrissl.nn import grid_size

__all__ = ["SharedFloorPass"]

Patch = tuple[int, int, int]
Masks = list[tuple[torch.Tensor, Patch | None]]


_FLUSH_EVERY = 16  # batches between moves of the float32 ``Σ k x`` rows into float64


@dataclass
class _MeterSums:
    """One meter's per-token sums; its per-voxel rows live in the shared product's output."""

    fit: int  # fit draws
    row: int  # its first row: E rows Σ m_e x, then Σ k x², then Σ k x
    s1: torch.Tensor  # (C·T, P) float64: Σ k x, flushed from its float32 row
    s0: torch.Tensor  # (C, T) float32: Σ k, the fit draws' mask counts
    e0: torch.Tensor  # (E, C, T) float32: Σ m_e
    e2: torch.Tensor  # (E, C) float64: Σ m_e x²
    fit_masked: torch.Tensor  # (fit,) float64: masked voxels per fit draw


class SharedFloorPass:
    """Feed batches to several meters at once; ``compute`` gives each meter's floor.

    Args:
        meters: fresh meters (no volume seen), all on one device.

    Examples:
        >>> from mrissl.masking import RandomTokenMask
        >>> meters = [CollapseFloorMeter(RandomTokenMask(r), patch_size=4, num_draws=4, seed=0)
        ...           for r in (0.5, 0.75)]
        >>> joint = SharedFloorPass(meters)
        >>> for i in range(3):
        ...     joint.update(torch.rand(1, 2, 8, 8, 8), index=[i])
        >>> [round(r.masked_fraction, 2) for r in joint.compute()]
        [0.5, 0.75]
    """

    def __init__(self, meters: Sequence[CollapseFloorMeter]) -> None:
        self.meters = list(meters)
        if not self.meters:
            raise ValueError("meters must hold at least one CollapseFloorMeter, got none")
        for m in self.meters:
            if not isinstance(m, CollapseFloorMeter):
                raise TypeError(f"meters must hold CollapseFloorMeter, got {type(m).__name__}")
        self.shared = all(
            m.constant == "voxel" and m.num_volumes == 0 and m.device == self.meters[0].device
            for m in self.meters
        )
        self._sums: list[_MeterSums | None] | None = None
        self._grid: Patch = (1, 1, 1)
        self._shape: tuple[int, ...] | None = None
        self._common: dict[str, torch.Tensor] = {}
        self._rows = torch.empty(0)
        self._batches = 0
        self._buffers: dict[str, torch.Tensor] = {}  # per-batch work space, kept between batches
        self.num_volumes = 0

    def update(
        self,
        volume: torch.Tensor,
        *,
        available: torch.Tensor | None = None,
        index: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """Add a batch to every meter, as each meter's ``update`` would."""
        first = self.meters[0]
        x, avail, idx = first._prepare(volume, available, index)
        if self._shape is not None:
            _check_shape(x, self._shape, "voxel")
        masks = [m._masks(x, avail, idx) for m in self.meters]
        if self.shared and x.dtype == torch.float32 and self._fits(x, masks):
            self._add(x, avail, masks)
            return
        self._hand_over()
        self.shared = False
        for meter, drawn in zip(self.meters, masks, strict=True):
            meter._accumulate(x, avail, drawn)

    def compute(self) -> list[CollapseFloor]:
        """Every meter's [`CollapseFloor`][mrissl.diagnostics.CollapseFloor], in order.

        The pass owns its meters: each receives its sums, computes its floor and is reset
        before the next one, so that memory holds one meter's sums at a time besides the
        shared ones. Every process must call this when the meters gather across processes.
        """
        self._buffers = {}  # the work space is not needed any more: free it first
        results = []
        for j, meter in enumerate(self.meters):
            self._give(j)
            results.append(meter.compute())
            meter.reset()
        self._sums, self._common, self._rows = None, {}, torch.empty(0)
        return results

    def _hand_over(self) -> None:
        for j in range(len(self.meters)):
            self._give(j)
        self._sums, self._common, self._rows = None, {}, torch.empty(0)

    def _fits(self, x: torch.Tensor, masks: list[Masks]) -> bool:
        """Whether every mask is a token mask whose patch the common grid divides."""
        patches = [p for drawn in masks for _, p in drawn if p is not None]
        if len(patches) < sum(len(drawn) for drawn in masks):
            return False
        if self._sums is None:  # the finest grid every patch is made of
            d, h, w = (math.gcd(*(p[a] for p in patches)) for a in range(3))
            self._grid = (d, h, w)
            return True
        return all(p[a] % self._grid[a] == 0 for p in patches for a in range(3))

    def _tokens(self, mask: torch.Tensor, patch: Patch, spatial: Patch) -> torch.Tensor:
        """A ``(B, C, N)`` token mask of ``patch`` on the common grid: ``(B, C, T)``."""
        B, C = mask.shape[:2]
        g = self._grid
        coarse = grid_size(spatial, patch)
        f = [patch[a] // g[a] for a in range(3)]
        fine = mask.reshape(B, C, coarse[0], 1, coarse[1], 1, coarse[2], 1)
        fine = fine.expand(B, C, coarse[0], f[0], coarse[1], f[1], coarse[2], f[2])
        return fine.reshape(B, C, -1)

    def _allocate(self, x: torch.Tensor, masks: list[Masks]) -> None:
        C = x.shape[1]
        spatial: Patch = tuple(x.shape[2:])  # type: ignore[assignment]
        T = math.prod(grid_size(spatial, self._grid))
        P = math.prod(self._grid)
        dev, f32, f64 = x.device, torch.float32, torch.float64
        self._shape = tuple(x.shape[1:])
        self._sums, row = [], 0
        for meter, drawn in zip(self.meters, masks, strict=True):
            fit, E = meter.fit_draws, len(drawn) - meter.fit_draws
            self._sums.append(
                _MeterSums(
                    fit=fit,
                    row=row,
                    s1=torch.zeros((C * T, P), dtype=f64, device=dev),
                    s0=torch.zeros((C, T), dtype=f32, device=dev),
                    e0=torch.zeros((E, C, T), dtype=f32, device=dev),
                    e2=torch.zeros((E, C), dtype=f64, device=dev),
                    fit_masked=torch.zeros(fit, dtype=f64, device=dev),
                )
            )
            row += E + 2
        self._rows = torch.zeros((C * T, row, P), dtype=f32, device=dev)
        self._batches = 0
        self._common = {
            "x_sum": torch.zeros(self._shape, dtype=f32, device=dev),
            "n": torch.zeros(C, dtype=f64, device=dev),
            "voxels": torch.zeros(C, dtype=f64, device=dev),
            "volumes": torch.zeros(C, dtype=f64, device=dev),
        }

    def _flush(self) -> None:
        """Move the float32 ``Σ k x`` rows into their float64 sums (they give the constants)."""
        for sums in self._sums or []:
            if sums is not None:
                s1_row = self._rows[:, sums.row + sums.e0.shape[0] + 1]
                sums.s1 += s1_row
                s1_row.zero_()

    def _add(self, x: torch.Tensor, avail: torch.Tensor | None, masks: list[Masks]) -> None:
        B, C = x.shape[:2]
        spatial: Patch = tuple(x.shape[2:])  # type: ignore[assignment]
        if self._sums is None:
            self._allocate(x, masks)
        common, g = self._common, self._grid
        gd, gh, gw = grid_size(spatial, g)
        T, P = gd * gh * gw, math.prod(g)
        f64 = torch.float64
        present = torch.ones(B, C, dtype=torch.bool, device=x.device) if avail is None else avail

        if avail is not None:  # a missing modality's values are ignored: zero them
            x = torch.where(present[:, :, None, None, None], x, 0)
        batch_sum = x.sum(dim=0)
        if "shift" not in common:  # as the meters do: the first batch's mean of each voxel
            n_first = present.sum(dim=0).clamp(min=1).to(x.dtype)
            common["shift"] = batch_sum / n_first.view(-1, 1, 1, 1)
        common["x_sum"] += batch_sum
        # [centred x | its square], token-major: (C·T, 2B, P), one matrix per token, written
        # in place (a missing modality's masks are all False: its weights are zero)
        xx = self._buffer("xx", (C * T, 2 * B, P), x)
        as_tokens = x.view(B, C, gd, g[0], gh, g[1], gw, g[2]).permute(1, 2, 4, 6, 0, 3, 5, 7)
        shift = common["shift"].view(C, gd, g[0], gh, g[1], gw, g[2]).permute(0, 1, 3, 5, 2, 4, 6)
        torch.sub(as_tokens, shift.unsqueeze(4), out=xx[:, :B].view(C, gd, gh, gw, B, *g))
        torch.mul(xx[:, :B], xx[:, :B], out=xx[:, B:])
        x2_tokens = xx[:, B:].sum(dim=-1).to(f64).view(C, T, B).permute(2, 0, 1)  # (B, C, T)
        # every meter's rows of one product (C·T, rows, 2B) @ (C·T, 2B, P): row e takes
        # Σ_b m_e x for an evaluation draw, then Σ_b k x² and Σ_b k x for the fit draws' counts
        weights = self._buffer("weights", (C * T, self._rows.shape[1], 2 * B), x).zero_()
        for sums, drawn in zip(self._sums or [], masks, strict=True):
            if sums is None:
                continue
            m = torch.stack([self._tokens(mask, p, spatial) for mask, p in drawn if p is not None])
            m = m & present[None, :, :, None]  # (R, B, C, T), True = masked
            fit, held = m[: sums.fit], m[sums.fit :]
            E = held.shape[0]
            k = fit.sum(dim=0, dtype=x.dtype)  # (B, C, T): fit draws masking each token
            sums.s0 += k.sum(dim=0)
            sums.fit_masked += fit.sum(dim=(1, 2, 3), dtype=f64) * P
            sums.e0 += held.sum(dim=1, dtype=x.dtype)
            sums.e2 += (held * x2_tokens).sum(dim=(1, 3), dtype=f64)
            k_rows = k.permute(1, 2, 0).reshape(C * T, B)
            r = sums.row
            weights[:, r : r + E, :B] = held.permute(2, 3, 0, 1).reshape(C * T, E, B)
            weights[:, r + E, B:] = k_rows
            weights[:, r + E + 1, :B] = k_rows
        self._rows.baddbmm_(weights, xx)
        self._batches += 1
        if self._batches % _FLUSH_EVERY == 0:
            self._flush()
        per_volume = present.sum(dim=0).to(f64)
        common["n"] += per_volume
        common["voxels"] += per_volume * math.prod(spatial)
        common["volumes"] += per_volume
        self.num_volumes += B

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A work buffer of this shape, reused from the previous batch when it fits.

        Reusing it spares the allocator and the kernel a few hundred MB of fresh pages per
        batch (a large allocation is otherwise mapped, faulted in and zeroed every time).
        """
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.shape != shape
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _give(self, j: int) -> None:
        """Write meter ``j``'s sums into it, in its own layout, and free them here."""
        if self._sums is None or self._shape is None:
            return
        all_sums, sums = self._sums, self._sums[j]
        if sums is None:
            return
        meter, shape, g = self.meters[j], self._shape, self._grid
        C, D, H, W = shape
        gd, gh, gw = grid_size((D, H, W), g)

        def voxels(t: torch.Tensor) -> torch.Tensor:  # (C·T, P) token-major to (C, D, H, W)
            t = t.reshape(C, gd, gh, gw, *g).permute(0, 1, 4, 2, 5, 3, 6)
            return t.reshape(C, D, H, W)

        def spread(t: torch.Tensor) -> torch.Tensor:  # (C, T) per token to (C, D, H, W)
            t = t.reshape(C, gd, 1, gh, 1, gw, 1).expand(C, gd, g[0], gh, g[1], gw, g[2])
            return t.reshape(C, D, H, W)

        if j == 0:
            self._flush()
        E, r = sums.e0.shape[0], sums.row
        meter._allocate(shape, torch.float32, g, zero=False)  # every sum is written below
        out = meter._sums
        out["shift"].copy_(self._common["shift"])
        out["s0"].copy_(spread(sums.s0))
        out["s1"].copy_(voxels(sums.s1))
        out["s2"].copy_(voxels(self._rows[:, r + E]))
        for e in range(E):
            out["e1"][e].copy_(voxels(self._rows[:, r + e]))
        out["e0"].copy_(sums.e0)
        out["e2"].copy_(sums.e2)
        out["fit_masked"].copy_(sums.fit_masked)
        for name in ("x_sum", "n", "voxels", "volumes"):
            out[name].copy_(self._common[name])
        meter.num_volumes = self.num_volumes
        all_sums[j] = None

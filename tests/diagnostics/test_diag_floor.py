from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mrissl.diagnostics import CollapseFloor, CollapseFloorMeter, collapsed_loss_floor

# Small mask generators that satisfy the contract of mrissl.masking:
#     mask = mask_generator(volume, patch_size, generator=g)


class RandomSubsetMask:
    """Masks ``k`` of the ``N`` tokens of every (volume, modality), uniformly at random."""

    def __init__(self, k: int, per_position: bool = False) -> None:
        self.k, self.per_position = k, per_position

    def __call__(self, volume, patch_size, generator=None):
        B, C = volume.shape[:2]
        p = patch_size
        N = (volume.shape[2] // p) * (volume.shape[3] // p) * (volume.shape[4] // p)
        shape = (B, N) if self.per_position else (B, C, N)
        scores = torch.rand(shape, generator=generator).to(volume.device)
        return scores.argsort(dim=-1).argsort(dim=-1) < self.k


class EnumeratingMask:
    """Returns mask ``family[i mod K]`` to every volume of the i-th call: exhaustive in K calls."""

    def __init__(self, family: list[np.ndarray]) -> None:
        self.family, self.calls = family, 0

    def __call__(self, volume, patch_size, generator=None):
        mask = torch.from_numpy(self.family[self.calls % len(self.family)])
        self.calls += 1
        return mask.expand(volume.shape[0], *mask.shape).to(volume.device)


class VoxelBlockMask:
    """BlockMask-like: masks aligned blocks of its own ``block_size``, returned as a token mask."""

    def __init__(self, block_size: int, k: int) -> None:
        self.block_size, self.k = block_size, k

    def __call__(self, volume, patch_size=None, generator=None):
        b = patch_size or self.block_size
        B, C = volume.shape[:2]
        N = (volume.shape[2] // b) * (volume.shape[3] // b) * (volume.shape[4] // b)
        scores = torch.rand(B, C, N, generator=generator)
        return scores.argsort(dim=-1).argsort(dim=-1) < self.k


def _token_family(C: int, N: int, k: int) -> list[np.ndarray]:
    """All masks that hide k positions in every modality, plus one whole modality."""
    family = []
    for positions in itertools.combinations(range(N), k):
        for hidden in range(C):
            m = np.zeros((C, N), dtype=bool)
            m[:, list(positions)] = True
            m[hidden] = True
            family.append(m)
    return family


def _token_to_voxel(mask: np.ndarray, size: int, p: int) -> np.ndarray:
    """(C, N) token mask to (C, size, size, size) voxels with explicit loops, depth slowest."""
    C, _ = mask.shape
    g = size // p
    out = np.zeros((C, size, size, size), dtype=bool)
    for c in range(C):
        n = 0
        for i in range(g):
            for j in range(g):
                for k in range(g):
                    out[c, i * p : (i + 1) * p, j * p : (j + 1) * p, k * p : (k + 1) * p] = mask[
                        c, n
                    ]
                    n += 1
    return out


def _brute_force_floor(volumes: np.ndarray, voxel_masks: list[np.ndarray], constant: str):
    """Var(x_m) over every (volume, mask) pair, each pair equally likely (E-MIM eq. 3).

    Returns (floor over masked voxels, floor over all voxels, per-modality masked floor).
    """
    _M, C = volumes.shape[:2]
    pairs = [(x, m) for x in volumes for m in voxel_masks]
    total_masked = sum(m.sum() for _, m in pairs)
    total_voxels = len(pairs) * volumes[0].size
    rss = np.zeros(C)
    masked = np.zeros(C)
    for c in range(C):
        if constant == "voxel":
            for idx in np.ndindex(volumes.shape[2:]):
                values = [x[c][idx] for x, m in pairs if m[c][idx]]
                if values:
                    best = np.mean(values)  # the best constant for this voxel
                    rss[c] += sum((v - best) ** 2 for v in values)
                    masked[c] += len(values)
        else:
            values = np.concatenate([x[c][m[c]] for x, m in pairs])
            rss[c] = np.sum((values - values.mean()) ** 2)
            masked[c] = values.size
    assert masked.sum() == total_masked
    return rss.sum() / masked.sum(), rss.sum() / total_voxels, rss / masked


@pytest.mark.parametrize("constant", ["voxel", "modality"])
def test_floor_equals_brute_force_when_every_mask_is_enumerated(constant):
    g = torch.Generator().manual_seed(0)
    volumes = torch.rand(3, 2, 4, 4, 4, generator=g, dtype=torch.float64)
    family = _token_family(2, 8, 3)  # 56 position sets × 2 hidden modalities
    voxel_masks = [_token_to_voxel(m, 4, 2) for m in family]
    exact, exact_all, exact_mod = _brute_force_floor(volumes.numpy(), voxel_masks, constant)
    K = len(family)
    for on, expected in (("masked", exact), ("all", exact_all)):
        result = collapsed_loss_floor(
            volumes,
            EnumeratingMask(family),
            patch_size=2,
            num_draws=2 * K,  # K fit draws and K evaluation draws: every pair, twice
            batch_size=3,
            constant=constant,
            on=on,
            debias=False,
        )
        assert result.floor == pytest.approx(expected, rel=1e-10)
    result = collapsed_loss_floor(
        volumes, EnumeratingMask(family), patch_size=2, num_draws=2 * K, batch_size=3,
        constant=constant, debias=False,
    )  # fmt: skip
    np.testing.assert_allclose(result.per_modality.numpy(), exact_mod, rtol=1e-10)


def test_sampled_masks_converge_to_the_exact_floor():
    g = torch.Generator().manual_seed(1)
    volumes = torch.rand(5, 2, 4, 4, 4, generator=g, dtype=torch.float64) ** 2
    # RandomSubsetMask(3) is uniform over the C(8, 3) subsets of each modality independently,
    # so the exact floor averages over every subset of every modality
    subsets = [np.isin(np.arange(8), s) for s in itertools.combinations(range(8), 3)]
    voxel_masks = [_token_to_voxel(np.stack([s, s]), 4, 2) for s in subsets]
    exact, _, _ = _brute_force_floor(volumes.numpy(), voxel_masks, "voxel")
    result = collapsed_loss_floor(
        volumes, RandomSubsetMask(3), patch_size=2, num_draws=200, generator=g
    )
    assert result.std_error > 0
    assert abs(result.floor - exact) < 4 * result.std_error
    assert result.masked_fraction == pytest.approx(3 / 8)


def test_standard_error_matches_the_spread_over_seeds():
    volumes = torch.rand(6, 1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    floors, errors = [], []
    for seed in range(30):
        g = torch.Generator().manual_seed(100 + seed)
        r = collapsed_loss_floor(
            volumes, RandomSubsetMask(2), patch_size=2, num_draws=10, generator=g
        )
        floors.append(r.floor)
        errors.append(r.std_error)
    spread = float(np.std(floors, ddof=1))
    assert 0.5 < float(np.mean(errors)) / spread < 2.0


def test_tensor_dataset_loader_and_dict_inputs_agree():
    volumes = torch.rand(6, 2, 4, 4, 4, generator=torch.Generator().manual_seed(3))

    class Cases(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"t1": volumes[i], "id": i}

    def run(data, **kw):
        g = torch.Generator().manual_seed(0)
        return collapsed_loss_floor(
            data, RandomSubsetMask(3), patch_size=2, num_draws=6, generator=g, batch_size=2, **kw
        )

    reference = run(volumes)
    for data, kw in [
        (Cases(), {"key": "t1"}),
        (DataLoader(Cases(), batch_size=2), {"key": "t1", "progress": False}),
        (DataLoader(list(volumes), batch_size=2), {"progress": False}),
        ([(v, 0) for v in volumes], {}),
    ]:
        r = run(data, **kw)
        assert r.floor == pytest.approx(reference.floor, rel=1e-12)
        assert r.num_volumes == 6
    single = collapsed_loss_floor(volumes[0], RandomSubsetMask(3), patch_size=2, num_draws=4)
    assert single.floor == pytest.approx(0.0, abs=1e-12)  # one volume: its own mean is exact


def test_same_seed_same_result_and_global_rng_untouched(device):
    volumes = torch.rand(4, 2, 4, 4, 4, generator=torch.Generator().manual_seed(4)).to(device)
    state = torch.get_rng_state()
    runs = [
        collapsed_loss_floor(
            volumes,
            RandomSubsetMask(3),
            patch_size=2,
            num_draws=4,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    assert runs[0].floor == runs[1].floor
    assert runs[0].std_error == runs[1].std_error
    assert torch.equal(runs[0].per_modality, runs[1].per_modality)


def test_per_position_and_voxel_masks_and_block_generators_are_accepted():
    volumes = torch.rand(4, 2, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(0)
    per_position = collapsed_loss_floor(
        volumes, RandomSubsetMask(4, per_position=True), patch_size=4, num_draws=4, generator=g
    )
    assert per_position.masked_fraction == pytest.approx(0.5)
    block = collapsed_loss_floor(volumes, VoxelBlockMask(2, 16), patch_size=None, num_draws=4)
    assert block.masked_fraction == pytest.approx(16 / 64)

    def voxel_mask(volume, patch_size, generator=None):
        return torch.rand(volume.shape, generator=generator) < 0.3

    voxels = collapsed_loss_floor(volumes, voxel_mask, patch_size=None, num_draws=4, generator=g)
    assert 0.2 < voxels.masked_fraction < 0.4
    assert voxels.per_modality.shape == (2,)


def test_on_all_scales_with_the_masked_fraction():
    volumes = torch.rand(4, 1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    kw = {"patch_size": 2, "num_draws": 6}
    masked = collapsed_loss_floor(
        volumes, RandomSubsetMask(2), generator=torch.Generator().manual_seed(0), **kw
    )
    all_voxels = collapsed_loss_floor(
        volumes, RandomSubsetMask(2), generator=torch.Generator().manual_seed(0), on="all",
        **kw,
    )  # fmt: skip
    assert all_voxels.floor == pytest.approx(masked.floor * 2 / 8, rel=1e-12)


def test_modality_constant_accepts_crops_of_different_sizes():
    g = torch.Generator().manual_seed(8)
    crops = [torch.rand(2, 4, 4, 4, generator=g), torch.rand(2, 8, 4, 4, generator=g)]
    r = collapsed_loss_floor(
        crops, RandomSubsetMask(2), patch_size=2, num_draws=4, constant="modality", generator=g
    )
    assert math.isfinite(r.floor)
    assert r.num_volumes == 2
    with pytest.raises(ValueError, match="same shape"):
        collapsed_loss_floor(crops, RandomSubsetMask(2), patch_size=2, num_draws=4)


def test_progress_bar_is_written_to_stderr(capsys):
    volumes = torch.rand(4, 1, 4, 4, 4)
    collapsed_loss_floor(
        DataLoader(list(volumes), batch_size=2), RandomSubsetMask(2), patch_size=2, num_draws=3
    )
    assert "collapsed_loss_floor" in capsys.readouterr().err
    collapsed_loss_floor(volumes, RandomSubsetMask(2), patch_size=2, num_draws=3)
    assert capsys.readouterr().err == ""


def test_bad_input_gives_clear_errors():
    volumes = torch.rand(2, 1, 4, 4, 4)

    def nothing(volume, patch_size, generator=None):
        return torch.zeros(volume.shape[0], volume.shape[1], 8, dtype=torch.bool)

    with pytest.raises(ValueError, match="masked no voxel"):
        collapsed_loss_floor(volumes, nothing, patch_size=2, num_draws=4)
    with pytest.raises(TypeError, match="bool"):
        collapsed_loss_floor(
            volumes, lambda v, p, generator=None: torch.ones(2, 1, 8), patch_size=2, num_draws=4
        )
    with pytest.raises(ValueError, match=r"shape \(2, 1, 7\)"):
        collapsed_loss_floor(
            volumes,
            lambda v, p, generator=None: torch.ones(2, 1, 7, dtype=torch.bool),
            patch_size=2,
            num_draws=4,
        )
    with pytest.raises(ValueError, match="patch_size is None"):
        collapsed_loss_floor(
            volumes,
            lambda v, p, generator=None: torch.ones(2, 1, 8, dtype=torch.bool),
            patch_size=None,
            num_draws=4,
        )
    with pytest.raises(ValueError, match="num_draws"):
        collapsed_loss_floor(volumes, RandomSubsetMask(2), patch_size=2, num_draws=2)
    with pytest.raises(ValueError, match="constant"):
        collapsed_loss_floor(volumes, RandomSubsetMask(2), patch_size=2, constant="pixel")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="re-iterable"):
        collapsed_loss_floor(iter(volumes), RandomSubsetMask(2), patch_size=2)
    with pytest.raises(TypeError, match="floating"):
        collapsed_loss_floor(volumes.long(), RandomSubsetMask(2), patch_size=2)
    with pytest.raises(ValueError, match="key 'image'"):
        collapsed_loss_floor([{"t1": v} for v in volumes], RandomSubsetMask(2), patch_size=2)
    with pytest.raises(ValueError, match="dimensions"):
        collapsed_loss_floor(torch.rand(4, 4, 4), RandomSubsetMask(2), patch_size=2)
    with pytest.raises(TypeError, match="callable"):
        collapsed_loss_floor(volumes, "random", patch_size=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"on must be one of \('masked', 'all'\)"):
        collapsed_loss_floor(volumes, RandomSubsetMask(2), patch_size=2, on="mean")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="debias must be True or False"):
        collapsed_loss_floor(volumes, RandomSubsetMask(2), patch_size=2, debias=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be True or False"):
        collapsed_loss_floor(volumes, RandomSubsetMask(2), patch_size=2, progress=1)  # type: ignore[arg-type]


def test_result_is_a_readable_record():
    r = collapsed_loss_floor(torch.rand(3, 2, 4, 4, 4), RandomSubsetMask(2), patch_size=2)
    assert isinstance(r, CollapseFloor)
    assert r._fields[:2] == ("floor", "std_error")  # a NamedTuple
    assert r.on == "masked"
    assert str(r).startswith("Var(x_m) = ")
    assert r.per_modality.dtype == torch.float64
    assert r.per_modality_std_error.shape == (2,)


def test_every_generator_of_mrissl_masking():
    masking = pytest.importorskip("mrissl.masking")
    volumes = torch.rand(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(0)
    names = ["RandomTokenMask", "ModalMask", "PositionMask", "PatchMask", "HybridMaskPattern"]
    for name in names:
        if not hasattr(masking, name):
            continue
        r = collapsed_loss_floor(
            volumes, getattr(masking, name)(), patch_size=4, num_draws=4, generator=g
        )
        assert math.isfinite(r.floor), name
        assert r.floor > 0, name
        assert 0 < r.masked_fraction < 1, name
    if hasattr(masking, "BlockMask"):
        r = collapsed_loss_floor(
            volumes, masking.BlockMask(4, mask_ratio=0.5), patch_size=None, num_draws=4, generator=g
        )
        assert r.masked_fraction == pytest.approx(0.5)


def test_half_precision_volumes_give_the_float32_floor():
    volumes = torch.rand(4, 2, 4, 4, 4, generator=torch.Generator().manual_seed(10))
    runs = [
        collapsed_loss_floor(
            v, RandomSubsetMask(3), patch_size=2, num_draws=4,
            generator=torch.Generator().manual_seed(0),
        )
        for v in (volumes.half().float(), volumes.half())
    ]  # fmt: skip
    assert runs[1].floor == pytest.approx(runs[0].floor, rel=1e-6)


class EnumeratingMaskWithAvailability(EnumeratingMask):
    """EnumeratingMask that accepts ``available=`` like the generators of mrissl.masking."""

    def __call__(self, volume, patch_size, generator=None, available=None):
        return super().__call__(volume, patch_size, generator=generator)


def _brute_force_with_missing(volumes, present, voxel_masks, constant):
    """As _brute_force_floor, where modality c of volume i exists only if present[i, c]."""
    C = volumes.shape[1]
    rss = np.zeros(C)
    masked = np.zeros(C)
    for c in range(C):
        pairs = [(x, m) for x, p in zip(volumes, present, strict=True) if p[c] for m in voxel_masks]
        if constant == "voxel":
            for idx in np.ndindex(volumes.shape[2:]):
                values = [x[c][idx] for x, m in pairs if m[c][idx]]
                if values:
                    rss[c] += sum((v - np.mean(values)) ** 2 for v in values)
                    masked[c] += len(values)
        else:
            values = np.concatenate([x[c][m[c]] for x, m in pairs])
            rss[c] = np.sum((values - values.mean()) ** 2)
            masked[c] = values.size
    return rss.sum() / masked.sum(), rss / masked


@pytest.mark.parametrize("constant", ["voxel", "modality"])
def test_missing_modalities_contribute_only_what_is_present(constant):
    g = torch.Generator().manual_seed(11)
    volumes = torch.rand(4, 2, 4, 4, 4, generator=g, dtype=torch.float64)
    present = np.array([[True, True], [True, False], [False, True], [True, True]])
    garbage = volumes.clone()
    garbage[~torch.from_numpy(present)] = 1e6  # the values of a missing modality are ignored
    family = _token_family(2, 8, 3)
    exact, exact_mod = _brute_force_with_missing(
        volumes.numpy(), present, [_token_to_voxel(m, 4, 2) for m in family], constant
    )
    items = [{"image": garbage[i], "available": torch.from_numpy(present[i])} for i in range(4)]
    result = collapsed_loss_floor(
        items, EnumeratingMaskWithAvailability(family), patch_size=2,
        num_draws=2 * len(family), batch_size=4, constant=constant, debias=False,
    )  # fmt: skip
    assert result.floor == pytest.approx(exact, rel=1e-9)
    np.testing.assert_allclose(result.per_modality.numpy(), exact_mod, rtol=1e-9)
    assert result.per_modality_volumes.tolist() == [3, 3]
    assert result.num_volumes == 4


def test_available_reaches_the_mask_generator():
    masking = pytest.importorskip("mrissl.masking")
    volumes = torch.rand(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(12))
    items = [{"image": v, "available": torch.tensor([True, i != 1])} for i, v in enumerate(volumes)]
    r = collapsed_loss_floor(items, masking.ModalMask(1), patch_size=4, num_draws=4, seed=0)
    assert math.isfinite(r.floor)
    assert r.per_modality_volumes.tolist() == [3, 2]


class CountingDataset(Dataset):
    def __init__(self, volumes):
        self.volumes, self.reads = volumes, 0

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, i):
        self.reads += 1
        return self.volumes[i]


@pytest.mark.parametrize("num_draws", [3, 12])
def test_every_volume_is_read_once_whatever_the_number_of_draws(num_draws):
    data = CountingDataset(torch.rand(5, 1, 4, 4, 4))
    collapsed_loss_floor(data, RandomSubsetMask(2), patch_size=2, num_draws=num_draws)
    assert data.reads == 5


def test_seeded_draws_do_not_depend_on_batching_or_workers():
    volumes = torch.rand(5, 2, 4, 4, 4, generator=torch.Generator().manual_seed(13))
    runs = [
        collapsed_loss_floor(
            CountingDataset(volumes), RandomSubsetMask(3), patch_size=2, num_draws=6, seed=3,
            batch_size=b, num_workers=w,
        )
        for b, w in ((1, 0), (4, 0), (2, 2))
    ]  # fmt: skip
    # the same masks; only float32 rounding of x - shift differs with the first batch
    for r in runs[1:]:
        assert r.floor == pytest.approx(runs[0].floor, rel=1e-6)
        torch.testing.assert_close(r.per_modality, runs[0].per_modality, rtol=1e-6, atol=0)
    other = collapsed_loss_floor(volumes, RandomSubsetMask(3), patch_size=2, num_draws=6, seed=4)
    assert other.floor != runs[0].floor


def test_meter_memory_does_not_grow_with_the_number_of_volumes():
    meter = CollapseFloorMeter(RandomSubsetMask(2), patch_size=2, num_draws=6)
    meter.update(torch.rand(2, 1, 4, 4, 4))
    sizes = {k: v.numel() for k, v in meter._sums.items()}
    for _ in range(10):
        meter.update(torch.rand(2, 1, 4, 4, 4))
    assert {k: v.numel() for k, v in meter._sums.items()} == sizes
    assert meter.compute().num_volumes == 22
    meter.reset()
    with pytest.raises(ValueError, match="no volumes"):
        meter.compute()


def test_meter_equals_the_function_on_the_same_draws():
    volumes = torch.rand(6, 2, 4, 4, 4, generator=torch.Generator().manual_seed(14))
    whole = collapsed_loss_floor(volumes, RandomSubsetMask(3), patch_size=2, num_draws=6, seed=1)
    meter = CollapseFloorMeter(RandomSubsetMask(3), patch_size=2, num_draws=6, seed=1)
    for i in (5, 0, 3, 1, 4, 2):  # any order
        meter.update(volumes[i], index=[i])
    assert meter.compute().floor == pytest.approx(whole.floor, rel=1e-6)  # float32 x - shift


class TokensThenVoxels:
    """RandomSubsetMask that returns every odd call as the equivalent voxel mask."""

    def __init__(self, k: int, p: int) -> None:
        self.inner, self.p, self.calls = RandomSubsetMask(k), p, 0

    def __call__(self, volume, patch_size, generator=None):
        tokens = self.inner(volume, patch_size, generator=generator)
        self.calls += 1
        if self.calls % 2 == 0:  # the last draw of a batch is tokens, an earlier one voxels
            return tokens
        B, C = tokens.shape[:2]
        g = volume.shape[2] // self.p
        grid = tokens.reshape(B, C, g, 1, g, 1, g, 1).expand(B, C, g, self.p, g, self.p, g, self.p)
        return grid.reshape(volume.shape)


def test_token_and_voxel_masks_give_the_same_floor():
    volumes = torch.rand(5, 2, 4, 4, 4, generator=torch.Generator().manual_seed(15))
    runs = [
        collapsed_loss_floor(
            volumes, gen, patch_size=2, num_draws=6, batch_size=2,
            generator=torch.Generator().manual_seed(0),
        )
        for gen in (RandomSubsetMask(3), TokensThenVoxels(3, 2))
    ]  # fmt: skip
    # token masks take the batched shared pass, voxel masks the meter's own update: the same
    # sums, added in another order in float32
    assert runs[1].floor == pytest.approx(runs[0].floor, rel=1e-6)
    torch.testing.assert_close(runs[1].per_modality, runs[0].per_modality, rtol=1e-6, atol=0)

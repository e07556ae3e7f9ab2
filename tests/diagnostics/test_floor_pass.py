"""The shared pass gives every meter exactly the floor its own ``update`` would give."""

from __future__ import annotations

import pytest
import torch

import mrissl
from mrissl.diagnostics import CollapseFloorMeter
from mrissl.diagnostics._floor_pass import SharedFloorPass
from mrissl.masking import BlockMask, HybridMaskPattern, RandomTokenMask


def _generators():
    # patches 4 (tokens) and 2 (blocks): the shared grid is the finer one
    return [
        (RandomTokenMask(0.5), 4),
        (HybridMaskPattern(), 4),
        (BlockMask(block_size=2, mask_ratio=0.75), None),
    ]


def _meters(constant="voxel", num_draws=6, generators=None):
    return [
        CollapseFloorMeter(gen, patch_size=patch, num_draws=num_draws, seed=3, constant=constant)
        for gen, patch in (generators or _generators())
    ]


def _data(n=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    volumes = [torch.rand(1, 3, 8, 8, 12, generator=g, dtype=dtype) * (1 + i) for i in range(n)]
    available = [torch.tensor([[True, i % 3 != 1, i != 4]]) for i in range(n)]
    return volumes, available


def _separately(meters, volumes, available, batch=1):
    for s in range(0, len(volumes), batch):
        x, a = torch.cat(volumes[s : s + batch]), torch.cat(available[s : s + batch])
        for meter in meters:
            meter.update(x, available=a, index=list(range(s, s + x.shape[0])))
    return [meter.compute() for meter in meters]


def _shared(joint, volumes, available, batch):
    for s in range(0, len(volumes), batch):
        x, a = torch.cat(volumes[s : s + batch]), torch.cat(available[s : s + batch])
        joint.update(x, available=a, index=list(range(s, s + x.shape[0])))
    return joint.compute()


def _assert_same(got, expected, rel=1e-6):
    for u, v in zip(got, expected, strict=True):
        assert u.floor == pytest.approx(v.floor, rel=rel)
        assert u.std_error == pytest.approx(v.std_error, rel=1e-4)
        assert u.masked_fraction == pytest.approx(v.masked_fraction, rel=1e-12)
        torch.testing.assert_close(u.per_modality, v.per_modality, rtol=rel, atol=0)
        assert u.per_modality_volumes.tolist() == v.per_modality_volumes.tolist()
        assert u.num_volumes == v.num_volumes


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_shared_pass_equals_each_meter_on_its_own(batch):
    volumes, available = _data()
    expected = _separately(_meters(), volumes, available)
    joint = SharedFloorPass(_meters())
    got = _shared(joint, volumes, available, batch)
    assert joint.shared  # token masks, constant="voxel", float32: the shared path ran
    _assert_same(got, expected)


def test_values_of_a_missing_modality_are_ignored():
    volumes, available = _data(n=4)
    expected = _separately(_meters(), volumes, available, 2)
    for v, a in zip(volumes, available, strict=True):
        v[~a] = float("nan")  # garbage where the modality is missing
    with mrissl.checks("none"):  # the value check would reject the NaN before the sums
        got = _shared(SharedFloorPass(_meters()), volumes, available, 2)
    _assert_same(got, expected)


def test_many_batches_flush_their_float32_rows_into_float64():
    volumes, available = _data(n=40)
    expected = _separately(_meters(num_draws=4), volumes, available)
    got = _shared(SharedFloorPass(_meters(num_draws=4)), volumes, available, 2)  # 20 batches
    _assert_same(got, expected)


def test_meters_are_reset_after_their_floor_to_bound_memory():
    volumes, available = _data(n=4)
    meters = _meters()
    _shared(SharedFloorPass(meters), volumes, available, 2)
    assert all(meter.num_volumes == 0 for meter in meters)
    with pytest.raises(ValueError, match="no volumes"):
        meters[0].compute()


def test_constant_per_modality_uses_each_meters_own_update():
    volumes, available = _data(n=5)
    joint = SharedFloorPass(_meters("modality"))
    got = _shared(joint, volumes, available, 2)
    assert not joint.shared
    _assert_same(got, _separately(_meters("modality"), volumes, available, 2), rel=1e-12)


def test_voxel_masks_use_each_meters_own_update():
    def voxels(volume, patch_size, generator=None, available=None):
        return torch.rand(volume.shape, generator=generator) < 0.5

    generators = [(RandomTokenMask(0.5), 4), (voxels, None)]
    volumes, available = _data(n=5)
    joint = SharedFloorPass(_meters(generators=generators))
    got = _shared(joint, volumes, available, 2)
    assert not joint.shared
    expected = _separately(_meters(generators=generators), volumes, available, 2)
    _assert_same(got, expected, rel=1e-12)


def test_a_float64_batch_hands_the_sums_over_midway():
    volumes, available = _data(n=6)
    volumes[4:] = [v.double() for v in volumes[4:]]
    joint = SharedFloorPass(_meters())
    got = _shared(joint, volumes, available, 2)  # two shared batches, then float64
    assert not joint.shared
    _assert_same(got, _separately(_meters(), volumes, available, 2))


def test_shape_change_is_refused_like_the_meters_do():
    joint = SharedFloorPass(_meters())
    joint.update(torch.rand(1, 3, 8, 8, 12), index=[0])
    with pytest.raises(ValueError, match="same shape"):
        joint.update(torch.rand(1, 3, 8, 8, 8), index=[1])


def test_bad_meters_are_named():
    with pytest.raises(ValueError, match="meters"):
        SharedFloorPass([])
    with pytest.raises(TypeError, match="CollapseFloorMeter"):
        SharedFloorPass([object()])  # type: ignore[list-item]

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from mrissl.diagnostics import (
    CollapseFloor,
    CollapseMonitor,
    collapsed_loss_floor,
    effective_rank,
)


def _features(g: torch.Generator, rank: int, dim: int = 16, n: int = 32) -> torch.Tensor:
    """Features spread evenly over the first ``rank`` coordinates."""
    z = torch.zeros(n, dim)
    z[:, :rank] = torch.randn(n, rank, generator=g)
    return z


def test_healthy_run_is_not_flagged():
    g = torch.Generator().manual_seed(0)
    monitor = CollapseMonitor(16, floor=0.01, window=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(40):
            status = monitor.step(torch.tensor(0.05), _features(g, 16))
    assert not status.collapsed
    assert status.step == 40
    assert status.reason.startswith("no collapse")
    assert len(monitor.ranks) == 10


def test_window_rank_equals_the_effective_rank_of_the_window():
    g = torch.Generator().manual_seed(1)
    monitor = CollapseMonitor(16, window=3)
    batches = [_features(g, 6) for _ in range(3)]
    for b in batches:
        status = monitor.step(None, b)
    expected = float(effective_rank(torch.cat(batches)))
    assert status.effective_rank == pytest.approx(expected, rel=1e-8)
    assert status.loss is None


def test_loss_at_the_floor_is_complete_collapse_and_warns_once():
    monitor = CollapseMonitor(4, floor=0.02, tolerance=0.1, window=2)
    monitor.step(0.5)
    assert not monitor.step(0.5).complete
    monitor.step(0.021)
    with pytest.warns(UserWarning, match="complete collapse"):
        status = monitor.step(torch.tensor(0.0205))
    assert status.complete
    assert status.loss == pytest.approx(0.02075)
    assert "0.02" in status.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already flagged: no second warning
        monitor.step(0.02)
        monitor.step(0.02)
    monitor.step(0.001)
    monitor.step(0.001)
    assert not monitor.status.complete  # far below the floor: beats every constant


def test_rank_below_a_fraction_of_its_initial_value_is_dimensional_collapse():
    g = torch.Generator().manual_seed(2)
    monitor = CollapseMonitor(16, window=2, rank_fraction=0.5, warn=False)
    for _ in range(2):
        monitor.step(None, _features(g, 16))
    for _ in range(2):
        status = monitor.step(None, _features(g, 3))
    assert status.dimensional
    assert "below 50%" in status.reason
    assert not status.complete


def test_steadily_falling_rank_is_dimensional_collapse():
    g = torch.Generator().manual_seed(3)
    monitor = CollapseMonitor(16, window=1, patience=3, min_drop=0.1, rank_fraction=0.1)
    statuses = [monitor.step(None, _features(g, rank, n=256)) for rank in (16, 15, 14)]
    with pytest.warns(UserWarning, match="fell in each of the last 3 windows"):
        statuses.append(monitor.step(None, _features(g, 13, n=256)))
    assert [s.dimensional for s in statuses] == [False, False, False, True]


def test_state_dict_round_trip_keeps_the_history():
    g = torch.Generator().manual_seed(4)
    monitor = CollapseMonitor(8, floor=0.1, window=2)
    for _ in range(5):
        monitor.step(0.3, _features(g, 8, dim=8))
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    restored = CollapseMonitor(8, floor=0.1, window=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.steps == 5
    assert restored.ranks == monitor.ranks
    assert restored.losses == monitor.losses
    assert int(restored.meter.count) == int(monitor.meter.count) == 32


def test_accepts_a_collapse_floor_result():
    volumes = torch.rand(3, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))

    def half(volume, patch_size, generator=None):
        return torch.rand(volume.shape, generator=generator) < 0.5

    floor = collapsed_loss_floor(volumes, half, patch_size=None, num_draws=4)
    assert isinstance(floor, CollapseFloor)
    monitor = CollapseMonitor(4, floor=floor)
    assert monitor.floor == floor.floor


def test_non_finite_loss_is_an_error():
    monitor = CollapseMonitor(4, window=2)
    monitor.step(torch.tensor(math.nan))
    with pytest.raises(ValueError, match="NaN or Inf"):
        monitor.step(0.1)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="floor"):
        CollapseMonitor(4, floor=-1.0)
    with pytest.raises(TypeError, match="floor"):
        CollapseMonitor(4, floor="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank_fraction"):
        CollapseMonitor(4, rank_fraction=0.0)
    with pytest.raises(ValueError, match="window"):
        CollapseMonitor(4, window=0)
    with pytest.raises(ValueError, match="tolerance"):
        CollapseMonitor(4, tolerance=-0.1)
    monitor = CollapseMonitor(4)
    with pytest.raises(ValueError, match="scalar"):
        monitor.step(torch.ones(3))
    with pytest.raises(ValueError, match="feature dimension 4"):
        monitor.step(0.1, torch.randn(8, 5))


def test_update_accumulates_on_the_device_and_step_adds_the_verdict():
    g = torch.Generator().manual_seed(5)
    by_update, by_step = CollapseMonitor(8, window=3), CollapseMonitor(8, window=3)
    batches = [(torch.rand((), generator=g), torch.randn(16, 8, generator=g)) for _ in range(3)]
    for loss, z in batches[:2]:
        by_update.update(loss, z)
        by_step.step(loss, z)
    assert by_update.steps == 0  # update counts no steps and makes no verdict
    assert by_update.loss_sum.dtype == torch.float64
    torch.testing.assert_close(by_update.loss_sum, by_step.loss_sum)
    torch.testing.assert_close(by_update.meter.m2, by_step.meter.m2)
    by_update.steps = 2
    assert by_update.step(*batches[2]) == by_step.step(*batches[2])
    assert by_step.status.loss == pytest.approx(float(sum(loss for loss, _ in batches)) / 3)
    assert int(by_step.loss_count) == 0  # a new window starts


def test_update_then_step_none_equals_step_with_the_values():
    # the compiled-step pattern: update() adds the values, step(None) counts and closes windows
    g = torch.Generator().manual_seed(11)
    steps = [(float(torch.rand((), generator=g)), torch.randn(8, 6, generator=g)) for _ in range(6)]
    split, whole = (
        CollapseMonitor(6, window=3, warn=False),
        CollapseMonitor(6, window=3, warn=False),
    )
    for loss, z in steps:
        split.update(torch.tensor(loss), z)
        got = split.step(None)
        want = whole.step(loss, z)
        assert got == want
    assert split.losses == pytest.approx(whole.losses)
    assert split.ranks == pytest.approx(whole.ranks)
    assert split.losses == pytest.approx([sum(v for v, _ in steps[i : i + 3]) / 3 for i in (0, 3)])

from __future__ import annotations

import io
import math
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mrissl
from mrissl.diagnostics import EffectiveRankMeter, effective_rank, rankme, singular_values


def _batches(seed: int, n_batches: int, dim: int, *, shift: float = 5.0) -> list[torch.Tensor]:
    """Batches of varying size (including single samples) from an anisotropic Gaussian."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, dim)
    sizes = torch.randint(1, 40, (n_batches,), generator=g).tolist()
    return [torch.randn(n, dim, generator=g) * scales + shift for n in sizes]


def _assert_matches_stacked(meter: EffectiveRankMeter, stacked: torch.Tensor, center: bool):
    result = meter.compute()
    s_ref = singular_values(stacked, center=center)
    assert result.num_samples == stacked.shape[0]
    assert result.spectrum.shape == s_ref.shape
    torch.testing.assert_close(
        result.spectrum.cpu(), s_ref.cpu(), rtol=1e-8, atol=1e-8 * float(s_ref[0])
    )
    erank_ref = float(effective_rank(s_ref))
    rankme_ref = float(rankme(s_ref, eps=meter.eps))
    assert float(result.effective_rank) == pytest.approx(erank_ref, rel=1e-8)
    assert float(result.rankme) == pytest.approx(rankme_ref, rel=1e-8)


@pytest.mark.parametrize("center", [True, False])
def test_meter_over_50_batches_matches_one_decomposition_of_the_stack(center, device):
    batches = [b.to(device) for b in _batches(0, 50, 24)]
    meter = EffectiveRankMeter(24, center=center)
    for b in batches:
        meter.update(b)
    assert meter.m2.device.type == device.type
    _assert_matches_stacked(meter, torch.cat(batches).double(), center)


def test_wide_features_use_the_blocked_gram_update_and_still_match(device):
    # 131 features: above the blocked-update threshold, with halves of unequal width
    batches = [b.to(device) for b in _batches(1, 12, 131)]
    meter = EffectiveRankMeter(131)
    for b in batches:
        meter.update(b)
    _assert_matches_stacked(meter, torch.cat(batches).double(), True)


def test_meter_of_a_rank_k_stream_is_exactly_k():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 3, generator=g, dtype=torch.float64))
    meter = EffectiveRankMeter(32)
    rows = []
    for _ in range(20):
        # whitened coefficients per batch, so the stream's spectrum is 3 equal values
        c = torch.randn(16, 3, generator=g, dtype=torch.float64)
        rows.append(c)
    coeffs = torch.cat(rows)
    coeffs = coeffs - coeffs.mean(dim=0)
    u, _, _ = torch.linalg.svd(coeffs, full_matrices=False)
    z = u @ q.T * 10 + 1.0  # 320 samples, 3 equal singular values after centering
    for chunk in z.split(16):
        meter.update(chunk)
    result = meter.compute()
    assert float(result.effective_rank) == pytest.approx(3.0, rel=1e-10)
    assert (result.spectrum[3:] == 0).all()


def test_token_features_count_every_token_as_a_sample():
    z = torch.randn(4, 10, 8, generator=torch.Generator().manual_seed(0))
    a, b = EffectiveRankMeter(8), EffectiveRankMeter(8)
    a.update(z)
    b.update(z.reshape(40, 8))
    torch.testing.assert_close(a.compute().spectrum, b.compute().spectrum)
    assert a.compute().num_samples == 40


def test_state_dict_round_trip_and_reset(tmp_path: Path):
    meter = EffectiveRankMeter(16)
    for b in _batches(1, 10, 16):
        meter.update(b)
    buffer = io.BytesIO()
    torch.save(meter.state_dict(), buffer)
    buffer.seek(0)
    restored = EffectiveRankMeter(16)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.compute().spectrum, meter.compute().spectrum)
    assert set(meter.state_dict()) == {"count", "mean", "m2"}
    meter.reset()
    assert int(meter.count) == 0
    assert not meter.m2.any()
    with pytest.raises(RuntimeError, match="size mismatch"):
        EffectiveRankMeter(8).load_state_dict(restored.state_dict())


def test_memory_does_not_grow_with_the_number_of_samples():
    meter = EffectiveRankMeter(8)
    sizes = {name: buf.numel() for name, buf in meter.named_buffers()}
    for b in _batches(2, 30, 8):
        meter.update(b)
    assert {name: buf.numel() for name, buf in meter.named_buffers()} == sizes


def test_low_precision_batches_are_accumulated_in_float64():
    batches = [b.to(torch.bfloat16) for b in _batches(3, 10, 12, shift=0.0)]
    meter = EffectiveRankMeter(12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b in batches:
            meter.update(b)
    assert meter.m2.dtype == torch.float64
    _assert_matches_stacked(meter, torch.cat(batches).double(), True)


def test_non_finite_batch_is_rejected_and_leaves_the_state_unchanged():
    meter = EffectiveRankMeter(4)
    meter.update(torch.randn(10, 4))
    before = {k: v.clone() for k, v in meter.state_dict().items()}
    bad = torch.randn(5, 4)
    bad[2, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        meter.update(bad)
    for key, value in meter.state_dict().items():
        assert torch.equal(value, before[key])


def test_compute_after_an_unchecked_non_finite_batch_says_why():
    # with the value checks off (the default) update() does not read the batch; compute, which
    # synchronises anyway, reports the NaN instead of a linear-algebra convergence failure
    meter = EffectiveRankMeter(4)
    meter.update(torch.randn(10, 4))
    bad = torch.randn(5, 4)
    bad[2, 0] = math.nan
    with mrissl.checks("none"):
        meter.update(bad)
        with pytest.raises(ValueError, match=r"moments hold NaN or Inf.*set_checks"):
            meter.compute()
    meter.reset()
    meter.update(torch.randn(10, 4))
    assert meter.compute().num_samples == 10


def test_bad_input_gives_clear_errors():
    meter = EffectiveRankMeter(4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        meter.compute()
    meter.update(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        meter.compute()
    with pytest.raises(ValueError, match="feature dimension 4"):
        meter.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="dimensions"):
        meter.update(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        meter.update(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="dim"):
        EffectiveRankMeter(0)
    with pytest.raises(TypeError, match="dim"):
        EffectiveRankMeter(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        EffectiveRankMeter(4, eps=-1.0)


def test_fewer_samples_than_dim_warns_but_gives_a_finite_result():
    meter = EffectiveRankMeter(16)
    meter.update(torch.randn(5, 16))
    with pytest.warns(UserWarning, match="capped at 4"):
        result = meter.compute()
    assert result.spectrum.shape == (5,)
    assert math.isfinite(float(result.effective_rank))
    assert float(result.effective_rank) <= 4 + 1e-9
    meter.update(torch.randn(40, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meter.compute()


def test_sync_without_a_process_group_is_a_no_op():
    meter = EffectiveRankMeter(6, gather_distributed=True)
    plain = EffectiveRankMeter(6)
    for b in _batches(4, 5, 6):
        meter.update(b)
        plain.update(b)
    assert torch.equal(meter.compute().spectrum, plain.compute().spectrum)


# --- two gloo processes -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        batches = _batches(10, 30, 12)
        mine = batches[:7] if rank == 0 else batches[7:]  # uneven shares
        synced = EffectiveRankMeter(12, gather_distributed=True)
        local = EffectiveRankMeter(12)
        for b in mine:
            synced.update(b)
            local.update(b)
        result = synced.compute()
        torch.save(
            {
                "spectrum": result.spectrum,
                "erank": result.effective_rank,
                "rankme": result.rankme,
                "count": result.num_samples,
                "local_count": local.compute().num_samples,
                "state_count": int(synced.count),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_meter_under_two_gloo_processes_matches_one_process(tmp_path: Path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    single = EffectiveRankMeter(12)
    batches = _batches(10, 30, 12)
    for b in batches:
        single.update(b)
    expected = single.compute()
    total = sum(b.shape[0] for b in batches)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["count"] == total
        assert got["local_count"] == got["state_count"] < total  # local state untouched
        torch.testing.assert_close(
            got["spectrum"], expected.spectrum, rtol=1e-8, atol=1e-8 * float(expected.spectrum[0])
        )
        assert float(got["erank"]) == pytest.approx(float(expected.effective_rank), rel=1e-8)
        assert float(got["rankme"]) == pytest.approx(float(expected.rankme), rel=1e-8)

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from mrissl.diagnostics import EffectiveRankMeter, effective_rank, rankme

pytest.importorskip("torchmetrics", reason="needs the torchmetrics extra")

from mrissl.integrations.torchmetrics import EffectiveRank


def _batches(sizes, dim=8, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.linspace(0.1, 3, dim)
    return [torch.randn(n, dim, generator=g) @ mix + offset for n in sizes]


def test_streamed_value_equals_the_effective_rank_of_all_features():
    batches = _batches([16, 5, 30])
    metric = EffectiveRank(8)
    meter = EffectiveRankMeter(8)
    for z in batches:
        metric.update(z)
        meter.update(z)
    z_all = torch.cat(batches).double()
    value = metric.compute()
    assert value.dtype == torch.float64
    assert value.ndim == 0
    assert float(value) == pytest.approx(float(effective_rank(z_all)), rel=1e-10)
    assert torch.equal(value, meter.compute().effective_rank)


def test_rankme_option_equals_rankme_of_all_features():
    batches = _batches([20, 20], seed=1)
    metric = EffectiveRank(8, rankme=True)
    for z in batches:
        metric.update(z)
    expected = rankme(torch.cat(batches).double(), center=True)
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-10)


def test_merge_state_uses_the_exact_moment_merge():
    # features far from the origin: a naive merge of raw second moments would lose digits
    batches = _batches([7, 13, 4, 25], offset=1e4, seed=2)
    parts = [EffectiveRank(8), EffectiveRank(8), EffectiveRank(8)]
    parts[0].update(batches[0])
    parts[0].update(batches[1])
    parts[1].update(batches[2])
    parts[1].update(batches[3])
    # parts[2] saw nothing, like a process whose shard was empty
    parts[0].merge_state(parts[1])
    parts[0].merge_state(parts[2])
    whole = torch.cat(batches).double()
    assert float(parts[0].compute()) == pytest.approx(float(effective_rank(whole)), rel=1e-9)


def test_forward_gives_the_batch_value_and_keeps_accumulating():
    z1, z2 = _batches([24, 24], seed=3)
    metric = EffectiveRank(8)
    batch_value = metric(z1)
    assert float(batch_value) == pytest.approx(float(effective_rank(z1.double())), rel=1e-10)
    metric(z2)
    total = effective_rank(torch.cat([z1, z2]).double())
    assert float(metric.compute()) == pytest.approx(float(total), rel=1e-10)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric EffectiveRank was called")
def test_reset_forgets_every_sample():
    metric = EffectiveRank(8)
    metric.update(_batches([16])[0])
    metric.reset()
    with pytest.raises(ValueError, match="at least 2 samples"):
        metric.compute()


def test_wrong_feature_dimension_is_named():
    metric = EffectiveRank(8)
    with pytest.raises(ValueError, match="feature dimension 8"):
        metric.update(torch.randn(4, 5))


def test_import_without_torchmetrics_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.delitem(sys.modules, "mrissl.integrations.torchmetrics")
    with pytest.raises(ImportError, match=r'pip install "mrissl\[torchmetrics\]"'):
        importlib.import_module("mrissl.integrations.torchmetrics")

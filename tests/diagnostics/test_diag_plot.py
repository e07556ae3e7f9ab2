from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mrissl.diagnostics import EffectiveRankMeter, plot_spectrum, singular_values

pytest.importorskip("matplotlib")


def test_one_curve_per_run_with_effective_rank_labels(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(128, 16, generator=g)
    meter = EffectiveRankMeter(16)
    meter.update(torch.randn(64, 2, generator=g) @ torch.randn(2, 16, generator=g))
    path = tmp_path / "spectrum.png"
    fig = plot_spectrum([healthy, meter.compute()], labels=["mae", "collapsed"], path=path)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("mae (erank ")
    assert labels[1].startswith("collapsed (erank ")
    assert ax.get_yscale() == "log"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # zero singular values are not drawn on the log axis
    assert len(ax.get_lines()[1].get_xdata()) <= 2


def test_normalized_spectra_start_at_one():
    s = singular_values(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)))
    fig = plot_spectrum({"run": s}, normalize=True, title="t")
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_ydata()[0], 1.0)
    np.testing.assert_allclose(line.get_xdata(), np.arange(1, 9))


def test_draws_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    axes = fig.subplots(1, 2)
    out = plot_spectrum(torch.tensor([3.0, 2.0, 1.0]), ax=axes[1])
    assert out is fig
    assert len(axes[1].get_lines()) == 1
    assert len(axes[0].get_lines()) == 0


def test_bad_input_gives_clear_errors():
    s = torch.tensor([2.0, 1.0])
    with pytest.raises(ValueError, match="labels has 1 names for 2"):
        plot_spectrum([s, s], labels=["a"])
    with pytest.raises(ValueError, match="mapping"):
        plot_spectrum({"a": s}, labels=["a"])
    with pytest.raises(ValueError, match="at least one"):
        plot_spectrum([])
    with pytest.raises(TypeError, match="RankResult"):
        plot_spectrum([np.array([1.0])])  # type: ignore[list-item]

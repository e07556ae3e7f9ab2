"""Plot singular value spectra of one or several runs, as in E-MIM Fig. 1b (extra ``plot``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mrissl.diagnostics.meter import RankResult
from mrissl.diagnostics.spectrum import _entropy_rank, _spectrum

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_spectrum"]

SpectrumLike = torch.Tensor | RankResult


def _as_spectrum(item: Any, name: str) -> torch.Tensor:
    if isinstance(item, RankResult):
        return item.spectrum.detach().cpu()
    if not isinstance(item, torch.Tensor):
        raise TypeError(
            f"{name} must be a 1-D spectrum, (N, D) features or a RankResult, "
            f"got {type(item).__name__}"
        )
    return _spectrum(item.detach(), True, name).cpu()


def plot_spectrum(
    spectra: SpectrumLike | Sequence[SpectrumLike] | Mapping[str, SpectrumLike],
    *,
    labels: Sequence[str] | None = None,
    normalize: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
    path: str | os.PathLike[str] | None = None,
    dpi: int = 150,
) -> Figure:
    """Draw the singular values of one or several runs on a log scale, largest first.

    Each curve is labelled with its effective rank. Zero singular values are not drawn (the
    axis is logarithmic). matplotlib is imported only when this function is called: install it
    with the ``plot`` extra (``pip install "mrissl[plot]"``). No pyplot state is touched unless
    ``ax`` comes from pyplot.

    Args:
        spectra: one item, a sequence of items or a mapping ``{label: item}``; an item is a 1-D
            spectrum, ``(N, D)`` / ``(B, N, E)`` features (decomposed with
            [`singular_values`][mrissl.diagnostics.singular_values], centered) or a
            [`RankResult`][mrissl.diagnostics.RankResult].
        labels: names of the items of a sequence (default ``run 0``, ``run 1``, ...).
        normalize: divide each spectrum by its largest value, to compare shapes.
        title: the axes title.
        ax: draw into these matplotlib axes instead of a new figure.
        path: also save the figure there (PNG unless the suffix says otherwise).
        dpi: resolution of the saved file.

    Returns:
        The matplotlib ``Figure`` holding the plot.

    Raises:
        ImportError: if matplotlib is not installed.
        TypeError: for items that are not tensors or RankResults.
        ValueError: for mismatched ``labels`` or invalid spectra.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> healthy = torch.randn(256, 32, generator=g)
        >>> collapsed = torch.randn(256, 4, generator=g) @ torch.randn(4, 32, generator=g)
        >>> fig = plot_spectrum({"healthy": healthy, "collapsed": collapsed}, normalize=True)
        >>> [t.get_text().split(" (")[0] for t in fig.axes[0].get_legend().get_texts()]
        ['healthy', 'collapsed']
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('plot_spectrum needs matplotlib: pip install "mrissl[plot]"') from err
    if isinstance(spectra, Mapping):
        names = [str(k) for k in spectra]
        items = list(spectra.values())
        if labels is not None:
            raise ValueError(
                "labels must be None when spectra is a mapping (its keys are the labels)"
            )
    else:
        items = [spectra] if isinstance(spectra, (torch.Tensor, RankResult)) else list(spectra)
        if not items:
            raise ValueError("spectra must hold at least one spectrum, got an empty sequence")
        names = [f"run {i}" for i in range(len(items))] if labels is None else list(labels)
        if len(names) != len(items):
            raise ValueError(f"labels has {len(names)} names for {len(items)} spectra")

    if ax is None:
        fig = Figure(figsize=(5.5, 4.0), layout="constrained")
        ax = fig.add_subplot()
    else:
        parent = ax.get_figure()
        if not isinstance(parent, Figure):
            raise ValueError("ax must belong to a matplotlib Figure")
        fig = parent
    for name, item in zip(names, items, strict=True):
        s = _as_spectrum(item, f"spectra[{name!r}]")
        erank = float(_entropy_rank(s, 0.0))
        if normalize and float(s[0]) > 0:
            s = s / s[0]
        index = torch.arange(1, s.numel() + 1)
        keep = s > 0
        ax.plot(index[keep].numpy(), s[keep].numpy(), label=f"{name} (erank {erank:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value / largest" if normalize else "singular value")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig

"""Figures shared by the step-5 monitors (matplotlib imported lazily).

Example:
    >>> import torch
    >>> from lightning_diag.tensorboard.figures import filter_grid
    >>> filter_grid(torch.randn(8, 1, 3, 3)).shape
    torch.Size([13, 13])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["curves_figure", "filter_grid", "layer_summary_figure"]


Series = tuple[Sequence[float], Sequence[float], dict[str, Any]]


def _figure(width: float, height: float) -> Figure:
    """A figure without pyplot (no figure manager to create and close), at 80 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    return fig


def _limits(values: Iterable[float]) -> tuple[float, float, list[float]]:
    """Data range padded by 5 %, and its "nice" ticks (at most 5, all inside the range)."""
    from matplotlib.ticker import MaxNLocator

    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.05, 0.5)
    lo, hi = lo - pad, hi + pad
    ticks = [float(t) for t in MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi]
    return lo, hi, ticks


def _panel(fig: Figure, rect: tuple[float, float, float, float], series: list[Series],
           title: str, xlabel: str = "", ylabels: Sequence[str] | None = None) -> None:
    """Line plots drawn straight onto the figure, in figure coordinates, with no Axes.

    An Axes costs ~20 ms to build and ~30 ms to draw here (dozens of tick objects, text
    layout done twice for tight bounding boxes); a frame, the lines and ~10 tick labels drawn
    as plain artists cost a few ms. ``ylabels``: category labels at y = 0, 1, ... (top to
    bottom) instead of numeric y ticks.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    left, bottom, width, height = rect
    x0, x1, xticks = _limits(v for xs, _, _ in series for v in xs)
    if ylabels is None:
        y0, y1, yticks = _limits(v for _, ys, _ in series for v in ys)
    else:  # category rows, the first at the top
        y0, y1, yticks = len(ylabels) - 0.5, -0.5, list(range(len(ylabels)))

    def fx(v: float) -> float:
        return left + width * (v - x0) / (x1 - x0)

    def fy(v: float) -> float:
        return bottom + height * (v - y0) / (y1 - y0)

    fig.add_artist(Rectangle((left, bottom), width, height, fill=False, lw=0.8))
    for xs, ys, style in series:
        fig.add_artist(Line2D([fx(v) for v in xs], [fy(v) for v in ys], **style))
    for t in xticks:
        fig.text(fx(t), bottom - 0.015, f"{t:.3g}", ha="center", va="top", fontsize=7)
    for i, t in enumerate(yticks):
        label = ylabels[i] if ylabels is not None else f"{t:.3g}"
        if label:
            fig.text(left - 0.006, fy(t), label, ha="right", va="center", fontsize=7)
    fig.text(left + width / 2, bottom + height + 0.02, title, ha="center", fontsize=9)
    if xlabel:
        fig.text(left + width / 2, bottom - 0.1, xlabel, ha="center", va="top", fontsize=8)


def layer_summary_figure(stats: dict[str, dict[str, Any]], bins: int) -> Figure:
    """CS231n-style summary: mean and std per layer, and each layer's activation histogram.

    One row per layer, first layer at the top: its mean and std on the left, its activation
    distribution (log(1 + count), scaled to the peak bin) on the right, on one shared value
    axis so that layers compare at a glance. Plain artists, no Axes (see :func:`_panel`): ~30-50 ms.
    """
    names = list(stats)
    fig = _figure(9, 0.9 + 0.22 * len(names))
    bottom, top = 0.45 / fig.get_figheight(), 1 - 0.35 / fig.get_figheight()
    moments: list[Series] = [
        ([stats[n][key] for n in names], list(range(len(names))),
         {"marker": marker, "ls": "none", "ms": 4, "color": color})
        for key, marker, color in (("mean", "o", "C0"), ("std", "x", "C3"))]
    _panel(fig, (0.14, bottom, 0.27, top - bottom), moments, "mean (o) and std (x)",
           ylabels=names)
    ridges: list[Series] = []
    for i, name in enumerate(names):
        lo, hi, num, _, _, *counts = stats[name]["act_hist"]
        if num > 0 and math.isfinite(lo) and math.isfinite(hi) and max(counts) > 0:
            # log(1 + count): a ReLU's spike at zero would flatten the rest of its shape
            width, peak = ((hi - lo) / bins if hi > lo else 1e-6), math.log1p(max(counts))
            ridges.append(([lo + width * (k + 0.5) for k in range(bins)],
                           [i + 0.4 - 0.8 * math.log1p(c) / peak for c in counts],
                           {"lw": 1, "color": f"C{i % 10}"}))
    _panel(fig, (0.44, bottom, 0.54, top - bottom), ridges,
           "activation distribution per layer (log counts, scaled to the peak)",
           ylabels=[""] * len(names))
    return fig


def filter_grid(weight: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """Tile ``(out, channels, h, w)`` filters into one image, each filter min-max normalized.

    Returns ``(H, W)`` for 1 channel, ``(H, W, 3)`` for 3 channels, and the channel mean
    otherwise.
    """
    w = weight.detach().float().cpu()
    w = w.mean(1, keepdim=True) if w.shape[1] not in (1, 3) else w
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = torch.nan_to_num((w - lo) / (hi - lo).clamp_min(1e-12))
    n, c, h, wd = w.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # Vectorized tiling (a Python loop over 3072 filters costs ~0.1 s): pad every filter at the
    # bottom/right, add blank filters to fill the last row, then fold into rows x cols.
    tiles = torch.ones(rows * cols, c, h + pad, wd + pad)
    tiles[:n, :, :h, :wd] = w
    grid = tiles.reshape(rows, cols, c, h + pad, wd + pad).permute(2, 0, 3, 1, 4)
    grid = torch.nn.functional.pad(grid.reshape(c, rows * (h + pad), cols * (wd + pad)),
                                   (pad, 0, pad, 0), value=1.0)
    return grid[0] if c == 1 else grid.permute(1, 2, 0)


def curves_figure(history: dict[str, list[tuple[int, float]]]) -> Figure:
    """Loss and accuracy against epochs, train and val on the same panel (no Axes, ~30 ms)."""
    fig = _figure(9, 3.2)
    styles = {"train": {"marker": "o", "ls": "-", "color": "C0"},
              "val": {"marker": "s", "ls": "--", "color": "C1"}}
    for left, what in ((0.07, "loss"), (0.57, "accuracy")):
        series: list[Series] = [([e for e, _ in pts], [v for _, v in pts],
                                 {**styles[split], "ms": 3})
                                for split in ("train", "val")
                                if (pts := history.get(f"{what}/{split}", []))]
        _panel(fig, (left, 0.2, 0.41, 0.7), series,
               f"{what}: train (o, solid), val (s, dashed)", xlabel="epoch")
    return fig

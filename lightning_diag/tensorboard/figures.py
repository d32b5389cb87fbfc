"""Figures of the monitors, the data inspection and the ensemble (matplotlib, imported lazily).

TensorBoard's Images dashboard scales every image to the width of its card (:data:`CARD_WIDTH`
pixels), Time Series fits it into a landscape box (about 330 x 215 pixels in a 1280-pixel
window, 450 x 215 in a 1600-pixel one), and neither shows a caption: so every figure here is
drawn at the card's width and about half as high, with its own text (and reads at its natural
size in the HTML report). Every figure is drawn with plain artists placed in figure
coordinates, no Axes (see :func:`_frame`), and rendered by
:func:`~lightning_diag.tensorboard.raster.render` (its text drawn by Pillow): a few ms each.
The captioned image grids are :mod:`~lightning_diag.tensorboard.grids` (re-exported here).

Example:
    >>> import torch
    >>> from lightning_diag.tensorboard.figures import filter_grid, layer_label
    >>> filter_grid(torch.randn(8, 1, 3, 3)).shape
    torch.Size([13, 13])
    >>> layer_label("net.3", torch.nn.Conv2d(1, 2, 3))
    'net.3 (Conv2d)'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_diag.tensorboard.grids import CARD_WIDTH, TEXT_PX, Cell, annotated_grid, font
from lightning_diag.tensorboard.raster import text_width

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CARD_WIDTH", "TEXT_PX", "Cell", "annotated_grid", "class_counts_figure",
           "curves_figure", "ensemble_figure", "filter_grid", "font", "layer_label",
           "layer_summary_figure"]

# matplotlib figures are laid out at the card's size (96 CSS pixels per inch) and rendered at
# twice that, so that a 9-point font reads as 12 pixels on the card and stays sharp
_FIG_WIDTH_IN, _FIG_DPI = CARD_WIDTH / 96, 192
#: Inches: the height of a landscape figure, about half its width, as Time Series' image box
#: (measured at 330 x 215 pixels in a 1280-pixel window, 450 x 215 in a 1600-pixel one)
_FIG_HEIGHT_IN = 1.95


def layer_label(name: str, module: torch.nn.Module | str) -> str:
    """A layer as figures, captions and messages name it: its name and its module type.

    Args:
        name: The module's name in ``named_modules()`` (``""``: the model itself).
        module: The module, or its class name.

    Example:
        >>> layer_label("net.3", "Conv2d"), layer_label("", "Net")
        ('net.3 (Conv2d)', 'model (Net)')
    """
    kind = module if isinstance(module, str) else type(module).__name__
    return f"{name or 'model'} ({kind})"


Series = tuple[Sequence[float], Sequence[float], dict[str, Any]]


def _figure(height: float, width: float = _FIG_WIDTH_IN) -> Figure:
    """A figure without pyplot (no figure manager to create and close), at the card's size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_FIG_DPI)
    FigureCanvasAgg(fig)
    return fig


def _nice(lo: float, hi: float, bins: int = 4, integer: bool = False) -> list[float]:
    """"Nice" ticks between ``lo`` and ``hi`` (at most ``bins + 1``, all inside the range)."""
    from matplotlib.ticker import MaxNLocator

    return [float(t) for t in MaxNLocator(bins, integer=integer).tick_values(lo, hi)
            if lo <= t <= hi]


def _limits(values: Iterable[float], integer: bool = False) -> tuple[float, float, list[float]]:
    """Data range padded by 5 %, and its "nice" ticks (at most 5, all inside the range)."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (hi - lo) * 0.05 if hi > lo else max(abs(lo) * 0.05, 0.5)
    lo, hi = lo - pad, hi + pad
    return lo, hi, _nice(lo, hi, 4, integer)


@dataclass(frozen=True)
class _Panel:
    """Where a panel goes, in inches from the figure's bottom left, and what it says."""

    left: float
    bottom: float
    width: float
    height: float
    title: str
    xlabel: str
    ylabel: str = ""
    integer_x: bool = False  # whole-number x ticks (epochs)
    log_y: bool = False  # a log10 y axis, ticked in plain numbers (positive values only)
    title_left: float | None = None  # where the title starts; default: left of the y ticks
    title_size: float = 9.5
    tick_size: float = 8.5  # of the y ticks (x ticks: half a point less)


@dataclass(frozen=True)
class _Scale:
    """An axis of a panel: its data range and its ticks, where they go and what they say."""

    lo: float
    hi: float
    ticks: Sequence[float]
    labels: Sequence[str]

    @classmethod
    def numeric(cls, values: Iterable[float], integer: bool = False,
                log: bool = False) -> _Scale:
        """The range of ``values`` padded by 5 %, ticked in "nice" numbers (``log``: the values
        are log10 of what the labels say)."""
        lo, hi, ticks = _limits(values, integer or log)
        return cls(lo, hi, ticks, [f"{10 ** t:.3g}" if log else f"{t:.3g}" for t in ticks])

    @classmethod
    def categories(cls, labels: Sequence[str], reverse: bool = False) -> _Scale:
        """One place per label at 0, 1, ... (``reverse``: the first at the top or right end)."""
        n = len(labels)
        lo, hi = (n - 0.5, -0.5) if reverse else (-0.5, n - 0.5)
        return cls(lo, hi, list(range(n)), list(labels))


#: The maps from a panel's data to figure fractions, x then y.
_ToFigure = tuple[Callable[[float], float], Callable[[float], float]]


def _frame(fig: Figure, at: _Panel, x: _Scale, y: _Scale,
           legend: Sequence[tuple[str, dict[str, Any]]] = ()) -> _ToFigure:
    """A panel's frame, tick labels, title and axis labels drawn straight onto the figure with
    plain artists, no Axes; returns the maps from data to figure fractions.

    An Axes costs ~20 ms to build and ~30-100 ms to draw here (dozens of tick objects, text
    laid out twice for tight bounding boxes, a layout engine); a frame and ~10 tick labels
    drawn as plain artists cost a few ms (their text drawn by Pillow, see
    :mod:`~lightning_diag.tensorboard.raster`). ``legend``: (label, line style) entries drawn
    at the right end of the title's line.
    """
    from matplotlib.patches import Rectangle

    fw, fh = fig.get_figwidth(), fig.get_figheight()
    left, bottom, width, height = at.left / fw, at.bottom / fh, at.width / fw, at.height / fh

    def fx(v: float) -> float:
        return left + width * (v - x.lo) / (x.hi - x.lo)

    def fy(v: float) -> float:
        return bottom + height * (v - y.lo) / (y.hi - y.lo)

    fig.add_artist(Rectangle((left, bottom), width, height, fill=False, lw=0.8))
    for t, label in zip(x.ticks, x.labels, strict=True):
        if label:
            fig.text(fx(t), bottom - 0.04 / fh, label, ha="center", va="top",
                     fontsize=at.tick_size - 0.5)
    for t, label in zip(y.ticks, y.labels, strict=True):
        if label:
            fig.text(left - 0.04 / fw, fy(t), label, ha="right", va="center",
                     fontsize=at.tick_size)
    top = bottom + height + 0.06 / fh
    title_left = at.title_left if at.title_left is not None else max(0.06, at.left - 0.56)
    fig.text(title_left / fw, top, at.title, ha="left", va="bottom", fontsize=at.title_size)
    if at.xlabel:
        fig.text(left + width / 2, bottom - 0.22 / fh, at.xlabel, ha="center", va="top",
                 fontsize=9)
    if at.ylabel:
        fig.text(0.04 / fw, bottom + height / 2, at.ylabel, rotation=90, ha="left",
                 va="center", fontsize=9)
    _legend(fig, left + width, top, legend)
    return fx, fy


def _panel(fig: Figure, at: _Panel, series: list[Series],
           ylabels: Sequence[str] | None = None,
           legend: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
    """Line plots in a :func:`_frame`. ``ylabels``: category labels at y = 0, 1, ... (top to
    bottom) instead of numeric y ticks."""
    from matplotlib.lines import Line2D

    if at.log_y:  # drawn as log10 of the values, the ticks labelled with the values
        series = [(xs, [math.log10(v) if v > 0 else math.nan for v in ys], style)
                  for xs, ys, style in series]
    x = _Scale.numeric((v for xs, _, _ in series for v in xs), at.integer_x)
    y = (_Scale.categories(ylabels, reverse=True) if ylabels is not None
         else _Scale.numeric((v for _, ys, _ in series for v in ys), log=at.log_y))
    fx, fy = _frame(fig, at, x, y, legend)
    for xs, ys, style in series:
        fig.add_artist(Line2D([fx(v) for v in xs], [fy(v) for v in ys], **style))


def _legend(fig: Figure, right: float, bottom: float,
            entries: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """(label, line style) entries in one line, right-aligned at ``right``, its text's bottom
    at ``bottom`` (figure fractions)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    fw, fh = fig.get_figwidth(), fig.get_figheight()
    x = right
    for label, style in reversed(entries):  # right-aligned, the last entry at the right edge
        fig.text(x, bottom, label, ha="right", va="bottom", fontsize=8.5)
        x -= text_width(label, 8.5, fig.dpi) / (fig.dpi * fw) + 0.05 / fw
        if style.get("patch"):  # a bar's colour
            fig.add_artist(Rectangle((x - 0.2 / fw, bottom + 0.01 / fh), 0.18 / fw, 0.1 / fh,
                                     color=style["color"], lw=0))
        else:
            fig.add_artist(Line2D([x - 0.24 / fw, x - 0.12 / fw, x], [bottom + 0.06 / fh] * 3,
                                  **{**style, "markevery": [1]}))
        x -= 0.4 / fw


def layer_summary_figure(stats: dict[str, dict[str, Any]], bins: int) -> Figure:
    """CS231n-style summary: each layer's output mean and std, beside its value distribution.

    Two panels side by side, one row per layer (first layer at the top, labelled by the keys
    of ``stats``, e.g. :func:`layer_label`): the mean and std of its output, and the
    distribution of its values (log(1 + count), scaled to the peak bin) on one shared value
    axis so that layers compare at a glance. Landscape (at least 1.7 times as wide as high,
    wider than the card for many layers), for Time Series' image box. Plain artists, no Axes
    (see :func:`_panel`): ~30-60 ms.
    """
    names = list(stats)
    longest = max((len(n) for n in names), default=4)
    left = min(0.12 + 0.066 * longest, _FIG_WIDTH_IN * 0.4)  # room for the layer labels
    fit = int((left - 0.12) / 0.066)  # ~0.066 in per character at 8.5 points
    # a name too long loses its middle, keeping the module's path start and its type's end
    labels = [n if len(n) <= fit else f"{n[:fit // 2]}\u2026{n[fit // 2 + 1 - fit:]}"
              for n in names]
    rows = 0.17 * len(names) + 0.2
    height = rows + 1.05
    width = max(_FIG_WIDTH_IN - left - 0.25, 1.7 * height - left - 0.25) / 2
    fig = _figure(height, left + 2 * width + 0.25)
    moments: list[Series] = [
        ([stats[n][key] for n in names], list(range(len(names))),
         {"marker": marker, "ls": "none", "ms": 4, "color": color})
        for key, marker, color in (("mean", "o", "C0"), ("std", "x", "C3"))]
    _panel(fig, _Panel(left, 0.45, width, rows, "each layer's output", "mean and std",
                       title_left=0.06), moments, ylabels=labels)
    _legend(fig, (left + width) / fig.get_figwidth(), 1 - 0.2 / height,
            [("mean", moments[0][2]), ("std", moments[1][2])])
    ridges: list[Series] = []
    for i, name in enumerate(names):
        lo, hi, num, _, _, *counts = stats[name]["act_hist"]
        if num > 0 and math.isfinite(lo) and math.isfinite(hi) and max(counts) > 0:
            # log(1 + count): a ReLU's spike at zero would flatten the rest of its shape
            step, peak = ((hi - lo) / bins if hi > lo else 1e-6), math.log1p(max(counts))
            ridges.append(([lo + step * (k + 0.5) for k in range(bins)],
                           [i + 0.4 - 0.8 * math.log1p(c) / peak for c in counts],
                           {"lw": 1, "color": f"C{i % 10}"}))
    right = left + width + 0.15
    _panel(fig, _Panel(right, 0.45, width, rows, "distribution (log counts)", "output value",
                       title_left=right), ridges, ylabels=[""] * len(names))
    return fig


def curves_figure(history: dict[str, list[tuple[int, float]]]) -> Figure:
    """Loss beside accuracy against epochs, train and val in each panel (no Axes, ~30 ms).

    Landscape, for Time Series' image box (about twice as wide as high). A loss that spans
    more than a decade (a first epoch of 63, then 2) is drawn on a log scale, so that every
    epoch is on the chart.
    """
    height = _FIG_HEIGHT_IN + 0.2
    fig = _figure(height)
    styles = {"train": {"marker": "o", "ls": "-", "color": "C0", "ms": 3},
              "val": {"marker": "s", "ls": "--", "color": "C1", "ms": 3}}
    width = (_FIG_WIDTH_IN - 1.25) / 2
    for left, what in ((0.5, "loss"), (0.5 + width + 0.7, "accuracy")):
        series: list[Series] = [([e for e, _ in pts], [v for _, v in pts], styles[split])
                                for split in ("train", "val")
                                if (pts := history.get(f"{what}/{split}", []))]
        values = [v for _, ys, _ in series for v in ys if math.isfinite(v)]
        log = what == "loss" and bool(values) and min(values) > 0 and max(values) > 10 * min(
            values)
        _panel(fig, _Panel(left, 0.42, width, height - 0.95,
                           f"{what}{' (log scale)' if log else ''}", "epoch", integer_x=True,
                           log_y=log), series)
    splits = [s for s in ("train", "val") if any(k.endswith(f"/{s}") for k in history)]
    _legend(fig, 1 - 0.1 / _FIG_WIDTH_IN, 1 - 0.2 / height,
            [(split, styles[split]) for split in splits])
    return fig


def _bars(fig: Figure, to: _ToFigure, xs: Sequence[float], heights: Sequence[float],
          colours: Sequence[str], width: float) -> None:
    """Bars of ``heights`` centred on ``xs`` (data units), from zero, as one collection (one
    draw for any number of bars); a NaN height draws none."""
    from matplotlib.collections import PolyCollection

    fx, fy = to
    kept = [(x, h, c) for x, h, c in zip(xs, heights, colours, strict=True) if math.isfinite(h)]
    verts = [[(fx(x - width / 2), fy(0.0)), (fx(x + width / 2), fy(0.0)),
              (fx(x + width / 2), fy(h)), (fx(x - width / 2), fy(h))] for x, h, _ in kept]
    fig.add_artist(PolyCollection(verts, facecolors=[c for _, _, c in kept], linewidths=0))


def class_counts_figure(counts: dict[str, Sequence[int]]) -> Figure:
    """Samples per class, one bar per class and split (``{"train": [...], ...}``), the splits
    side by side in each class's place and named by colour above the chart.

    Plain artists, no Axes (see :func:`_frame`): a few ms for 10 or 1000 classes.
    """
    height = 2.4
    fig = _figure(height)
    classes = max((len(c) for c in counts.values()), default=0)
    hi = max((float(v) for c in counts.values() for v in c), default=0.0) * 1.05 or 1.0
    ticks = _nice(0.0, hi, 5, integer=True)
    y = _Scale(0.0, hi, ticks, [f"{t:.0f}" for t in ticks])
    xticks = _nice(-0.5, classes - 0.5, 12, integer=True)
    x = _Scale(-0.5, max(classes, 1) - 0.5, xticks, [f"{t:.0f}" for t in xticks])
    left = 0.62
    legend = [(name, {"patch": True, "color": f"C{k}"}) for k, name in enumerate(counts)]
    to = _frame(fig, _Panel(left, 0.42, _FIG_WIDTH_IN - left - 0.1, height - 0.74,
                            "samples per class", "class", "samples", title_left=0.06),
                x, y, legend if len(counts) > 1 else ())
    width = 0.8 / max(len(counts), 1)
    for k, c in enumerate(counts.values()):
        offset = (k - (len(counts) - 1) / 2) * width
        _bars(fig, to, [i + offset for i in range(len(c))], [float(v) for v in c],
              [f"C{k}"] * len(c), width)
    return fig


def ensemble_figure(members: Sequence[tuple[int, dict[str, float]]],
                    ensemble: dict[str, float]) -> Figure:
    """Each metric of each kept checkpoint (blue, by its epoch) and of their ensemble (red) as
    bars with their values, one panel per metric, up to three side by side.

    Plain artists, no Axes (see :func:`_frame`). A value is written above its bar, smaller
    (down to 5.5 points) when the values are wider than the bars, every other one a line
    higher when even that is too wide.

    Example:
        >>> fig = ensemble_figure([(1, {"val_acc": 0.5}), (2, {"val_acc": 0.6})], {"val_acc": 0.7})
        >>> [t.get_text() for t in fig.texts if t.get_text() in ("val_acc", "0.7", "ens.")]
        ['ens.', 'val_acc', '0.7']
    """
    names = list(ensemble)
    cols = min(len(names), 3) or 1
    rows = math.ceil(len(names) / cols) or 1
    fig = _figure(1.9 * rows + 0.2)
    labels = [str(epoch) for epoch, _ in members] + ["ens."]
    colours = ["C0"] * len(members) + ["C3"]
    first, gap = 0.62, 0.45
    width = (_FIG_WIDTH_IN - first - gap * (cols - 1) - 0.08) / cols
    for k, name in enumerate(names):
        row, col = divmod(k, cols)
        values = [r.get(name, math.nan) for _, r in members] + [ensemble[name]]
        finite = [v for v in values if math.isfinite(v)]
        top = max(finite, default=1.0)
        # room above the bars for their values, below for a negative one
        lo, hi = min(0.0, 1.15 * min(finite, default=0.0)), top * 1.3 if top > 0 else 1.0
        ticks = _nice(lo, hi, 4)
        left = first + col * (width + gap)
        to = _frame(fig, _Panel(left, 0.42 + (rows - 1 - row) * 1.9, width, 1.4, name, "",
                                "value" if col == 0 else "", title_left=left, title_size=8.5,
                                tick_size=7.5),
                    _Scale.categories(labels), _Scale(lo, hi, ticks, [f"{t:.3g}" for t in ticks]))
        _bars(fig, to, range(len(values)), values, colours, 0.7)
        _bar_values(fig, to, values, width / len(values))
    fig.text(0.5, 0.04 / fig.get_figheight(), "kept checkpoints by epoch (blue), their "
             "ensemble (red)", ha="center", va="bottom", fontsize=8)
    return fig


def _bar_values(fig: Figure, to: _ToFigure, values: Sequence[float], slot: float) -> None:
    """Each value written above its bar (at zero for NaN or a negative value), fitted to the
    bars' ``slot`` (inches each): smaller, then staggered."""
    fx, fy = to
    texts = [f"{v:.3g}" for v in values]
    widest = max(text_width(t, 7.0, fig.dpi) for t in texts) / fig.dpi  # inches at 7 points
    size = max(5.5, min(7.0, 7.0 * 0.92 * slot / widest))
    stagger = widest * size / 7.0 > 0.95 * slot
    fh = fig.get_figheight()
    for i, (v, t) in enumerate(zip(values, texts, strict=True)):
        base = fy(max(v, 0.0) if math.isfinite(v) else 0.0) + 0.02 / fh
        raised = (i % 2) * size * 1.2 / 72 / fh if stagger else 0.0
        fig.text(fx(i), base + raised, t, ha="center", va="bottom", fontsize=size)


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

"""Figures and TensorBoard layouts shared by the step-5 monitors (matplotlib imported lazily).

Example:
    >>> import torch
    >>> from lightning_diag.callbacks._monitor_plots import filter_grid
    >>> filter_grid(torch.randn(8, 1, 3, 3)).shape
    torch.Size([13, 13])
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_diag.functional.monitors import histogram_edges
from lightning_diag.tb import log_dir, log_scalars, tensorboard_writer

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["curves_figure", "filter_grid", "layer_summary_figure", "log_image",
           "log_step_summary", "merge_custom_scalars"]


def log_step_summary(trainer: pl.Trainer, scalars: dict[str, float],
                     histograms: dict[str, list[float]], step: int) -> None:
    """Scalars and raw histograms of one step as ONE TensorBoard event (rank zero only).

    A ``Summary`` holds any number of tagged values and TensorBoard reads each as if it had its
    own event, so tags and charts are unchanged; writing one event instead of ~8 per layer is
    most of a logging step's cost saved. Histogram rows are ``[min, max, num, sum,
    sum_squares, counts...]`` (:func:`~lightning_diag.functional.monitors.histogram_row`);
    empty ones are skipped. Loggers other than that TensorBoard logger get the scalars as usual.
    """
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    writer = tensorboard_writer(trainer)
    if writer is None:
        log_scalars(trainer, scalars, step)
        return
    values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
    for tag, (lo, hi, num, total, squares, *counts) in histograms.items():
        if num > 0:
            values.append(Summary.Value(tag=tag, histo=HistogramProto(
                min=lo, max=hi, num=num, sum=total, sum_squares=squares,
                bucket_limit=histogram_edges(lo, hi, len(counts)), bucket=counts)))
    # The public add_* calls write one event per value; the file writer takes a whole Summary.
    writer._get_file_writer().add_summary(Summary(value=values), step)
    for logger in trainer.loggers:
        if not (isinstance(logger, TensorBoardLogger) and logger.experiment is writer):
            logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)


def merge_custom_scalars(writer: SummaryWriter, category: str,
                         charts: dict[str, list[str]]) -> None:
    """Add a custom-scalars category without dropping those other callbacks added.

    TensorBoard shows only the latest layout of a run, so the categories are remembered on the
    writer and the whole layout is written again when one is added.
    """
    layouts: dict[str, Any] = writer.__dict__.setdefault("_lightning_diag_layout", {})
    new = {title: ["Multiline", tags] for title, tags in charts.items()}
    if layouts.get(category) == new:
        return
    layouts[category] = new
    writer.add_custom_scalars(dict(layouts))


def log_image(trainer: pl.Trainer, tag: str, image: np.ndarray, step: int,
              png_name: str | None = None) -> None:
    """Log a uint8 ``(H, W)`` or ``(H, W, 3)`` image to TensorBoard and optionally as a PNG.

    The PNG is encoded once (Pillow, fast compression) for both, instead of once by
    ``SummaryWriter.add_image`` (which also converts to float and back) and once more by the
    file writer: ~10 ms instead of ~100-200 ms for a 500 x 500 image.
    """
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer = tensorboard_writer(trainer)
    directory = log_dir(trainer) if png_name and trainer.is_global_zero else None
    if writer is None and directory is None:
        return
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    png = buffer.getvalue()
    if directory is not None and png_name:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / png_name).write_bytes(png)
    if writer is not None:
        proto = Summary.Image(height=image.shape[0], width=image.shape[1],
                              colorspace=1 if image.ndim == 2 else 3, encoded_image_string=png)
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=proto)]),
                                              step)


def _figure(width: float, height: float, bottom: float) -> tuple[Figure, Any]:
    """A 1 x 2 figure built for speed; most of a figure's cost is tick and text objects.

    No pyplot (no figure manager to create and close), fixed margins (``tight_layout`` draws
    the figure an extra time), at most 5 major ticks per numeric axis, 80 dpi.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.9, bottom=bottom, wspace=0.18)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    return fig, axes


def layer_summary_figure(stats: dict[str, dict[str, Any]], bins: int) -> Figure:
    """CS231n-style summary: mean and std per layer, and each layer's activation histogram.

    Kept cheap (~0.1-0.2 s, see :func:`_figure`): two axes, and log10 densities on a linear
    axis (a log axis typesets every tick label as mathtext).
    """
    names = list(stats)
    fig, (left, right) = _figure(11, 3.6, bottom=0.3)
    x = list(range(len(names)))
    for key in ("mean", "std"):
        left.plot(x, [stats[n][key] for n in names], "o-", label=key)
    left.set_title("activation mean and std per layer")
    left.set_xticks(x, names, rotation=60, fontsize=7)
    left.legend(fontsize=7)
    for name in names:
        lo, hi, num, _, _, *counts = stats[name]["act_hist"]
        if num > 0 and math.isfinite(lo) and math.isfinite(hi):
            width = (hi - lo) / bins if hi > lo else 1e-6
            centres = [lo + width * (i + 0.5) for i in range(bins)]
            right.plot(centres, [math.log10(c / num) if c else math.nan for c in counts],
                       label=name, lw=1)
    right.set_title("activation distributions (log10 fraction per bin)")
    right.legend(fontsize=6, ncol=2)
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
    """Loss and accuracy against epochs, train and val on the same axes."""
    fig, axes = _figure(9, 3.4, bottom=0.15)
    for ax, what in zip(axes, ("loss", "accuracy"), strict=False):
        for split in ("train", "val"):
            points = history.get(f"{what}/{split}", [])
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], "o-", label=split, ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(what)
        if ax.lines:
            ax.legend()
    return fig

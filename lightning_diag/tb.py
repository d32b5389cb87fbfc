"""Where diagnostics write: the trainer's TensorBoard writer, if any, and its log directory.

Every artifact goes through these helpers so that a run without a TensorBoard logger
(no logger, CSVLogger, ...) degrades to scalars through the generic logger API and skips
images, text and histograms instead of crashing.

Tag scheme (documented in docs/tensorboard.md):
    ``diag/<slug>/...``          numbers, images and histograms of one diagnostic
    ``diagnostics/<Check>``      the findings of one diagnostic, as a markdown table
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "figure_to_array",
    "log_dir",
    "log_figure",
    "log_histogram_counts",
    "log_scalars",
    "tensorboard_writer",
    "to_python",
]


def tensorboard_writer(trainer: pl.Trainer) -> SummaryWriter | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger on rank zero, else None."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            return writer if isinstance(writer, SummaryWriter) else None
    return None


def log_dir(trainer: pl.Trainer) -> Path | None:
    """The run's log directory (where PNGs and saved batches go), or None without one."""
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None)
        if directory:
            return Path(directory)
    root = trainer.default_root_dir
    return Path(root) if root and trainer.loggers else None


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log plain numbers through every logger (rank zero only); non-finite values are kept."""
    if not trainer.is_global_zero or not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure to an ``(H, W, 3)`` uint8 array and close it."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]
    plt.close(fig)
    return rgba[..., :3].copy()


def log_figure(
    trainer: pl.Trainer, tag: str, fig: Figure, step: int, png_name: str | None = None
) -> Path | None:
    """Log a figure as a TensorBoard image and optionally save it as a PNG in the log directory.

    Returns:
        The PNG path when one was written.
    """
    path = None
    directory = log_dir(trainer) if png_name and trainer.is_global_zero else None
    if directory is not None and png_name:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / png_name
        fig.savefig(path, dpi=100, bbox_inches="tight")
    image = figure_to_array(fig)
    writer = tensorboard_writer(trainer)
    if writer is not None:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")
    return path


def log_histogram_counts(
    writer: SummaryWriter, tag: str, values: torch.Tensor, step: int, bins: int = 64
) -> None:
    """Log a histogram from counts computed by torch (one host copy of ``bins`` numbers).

    Non-finite values are dropped; empty or all-non-finite tensors are skipped silently.
    """
    flat = values.detach().reshape(-1).float()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return
    lo, hi = flat.min(), flat.max()
    if bool(hi <= lo):
        hi = lo + 1e-6
    counts = torch.histc(flat, bins=bins, min=float(lo), max=float(hi))
    edges = torch.linspace(float(lo), float(hi), bins + 1)
    stats = torch.stack([flat.sum(), (flat * flat).sum()]).cpu()
    writer.add_histogram_raw(
        tag,
        min=float(lo),
        max=float(hi),
        num=int(flat.numel()),
        sum=float(stats[0]),
        sum_squares=float(stats[1]),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.cpu().tolist(),
        global_step=step,
    )


def to_python(value: Any) -> Any:
    """Convert tensors and numpy scalars to plain Python numbers (for findings and JSON)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value

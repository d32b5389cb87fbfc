"""Figures and TensorBoard layouts shared by the step-5 monitors (matplotlib imported lazily).

Example:
    >>> import torch
    >>> from lightning_diag.callbacks._monitor_plots import filter_grid
    >>> filter_grid(torch.randn(8, 1, 3, 3)).shape
    torch.Size([13, 13])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["curves_figure", "filter_grid", "grid_figure", "layer_summary_figure",
           "merge_custom_scalars"]


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


def layer_summary_figure(stats: dict[str, dict[str, Any]], bins: int) -> Figure:
    """CS231n-style summary: mean and std per layer, and each layer's activation histogram."""
    import matplotlib.pyplot as plt

    names = list(stats)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = range(len(names))
    for ax, key in zip(axes[:2], ("mean", "std"), strict=False):
        ax.plot(x, [stats[n][key] for n in names], "o-")
        ax.set_title(f"activation {key} per layer")
        ax.set_xticks(list(x), names, rotation=60, fontsize=7)
    ax = axes[2]
    for name in names:
        lo, hi, num, _, _, *counts = stats[name]["act_hist"]
        if num > 0 and math.isfinite(lo) and math.isfinite(hi):
            width = (hi - lo) / bins if hi > lo else 1e-6
            centres = [lo + width * (i + 0.5) for i in range(bins)]
            ax.plot(centres, [c / num for c in counts], label=name, lw=1)
    ax.set_title("activation distributions")
    ax.set_yscale("log")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
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
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (wd + pad) + pad)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (wd + pad)
        grid[:, top:top + h, left:left + wd] = w[i]
    return grid[0] if c == 1 else grid.permute(1, 2, 0)


def grid_figure(grid: torch.Tensor, title: str) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(grid.numpy(), cmap="gray" if grid.dim() == 2 else None, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return fig


def curves_figure(history: dict[str, list[tuple[int, float]]]) -> Figure:
    """Loss and accuracy against epochs, train and val on the same axes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, what in zip(axes, ("loss", "accuracy"), strict=False):
        for split in ("train", "val"):
            points = history.get(f"{what}/{split}", [])
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], "o-", label=split, ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(what)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return fig

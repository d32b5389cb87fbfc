"""Figures and annotated images: sized for TensorBoard's image card, labelled, nothing clipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torch import nn

from lightning_diag.tensorboard.figures import (
    CARD_WIDTH,
    Cell,
    annotated_grid,
    class_counts_figure,
    curves_figure,
    ensemble_figure,
    layer_label,
    layer_summary_figure,
)
from lightning_diag.tensorboard.tags import typed_layer
from lightning_diag.tensorboard.writer import figure_to_array


def red(image: np.ndarray) -> np.ndarray:
    """Pixels of the alert red (frames and captions of conflicting labels)."""
    r, g, b = (image[..., k].astype(int) for k in range(3))
    return (r > 150) & (g < 90) & (b < 90)


def _title_height(image: np.ndarray) -> int:
    """Rows holding dark pixels above the first image: the title's text height."""
    dark = (image < 100).any(2).any(1)
    first_image = int(np.argmax((image < 30).all(2).sum(1) > 150))  # a row of black tiles
    return int(dark[:first_image].sum())


def test_layer_names_carry_the_module_type() -> None:
    assert layer_label("net.3", nn.Conv2d(1, 2, 3)) == "net.3 (Conv2d)"
    assert layer_label("net.3", "Conv2d") == "net.3 (Conv2d)"
    assert typed_layer("net.3", "Conv2d") == "net.3_Conv2d"  # a tag: ASCII, no space
    assert typed_layer("net.1", "Linear", "weight") == "net.1_Linear.weight"


def test_grid_grows_one_row_per_label_and_marks_alerts_in_red() -> None:
    sample = torch.zeros(8, 8)  # black tiles: the first row of them ends the title

    def grid(n: int, alert: bool = False) -> np.ndarray:
        return annotated_grid([[Cell(sample, ("train #1", "label 3"), alert)] * 2] * n, "pairs",
                              [f"class {k}" for k in range(n)])

    heights = [grid(n).shape[0] for n in (1, 2, 5, 10)]
    pitch = heights[1] - heights[0]
    assert pitch > 8 and heights == [heights[0] + pitch * (n - 1) for n in (1, 2, 5, 10)]
    assert all(grid(n).shape[1] == CARD_WIDTH for n in (1, 10))  # fills the card, no wider
    assert not red(grid(2)).any() and red(grid(2, alert=True)).sum() > 100
    wide = annotated_grid([[Cell(torch.zeros(3, 224, 224), ("train #1",))] * 3], "pairs")
    # wider than the card: TensorBoard shrinks it, so its text is drawn larger to match
    assert wide.shape[1] > 2 * CARD_WIDTH and _title_height(wide) > 1.5 * _title_height(grid(1))
    with pytest.raises(ValueError, match="at least one image"):
        annotated_grid([[]], "empty")


@pytest.mark.parametrize("draw", [
    lambda: curves_figure({"loss/train": [(0, 2.3), (1, 1.0)], "loss/val": [(0, 2.4), (1, 1.2)],
                           "accuracy/train": [(0, 0.1), (1, 0.6)]}),
    lambda: layer_summary_figure({layer_label(name, "NonDynamicallyQuantizableLinear"): {
        "mean": 0.1 * k, "std": 1.0, "act_hist": [-1.0, 1.0, 10, 0, 0, *[1.0] * 8]}
        for k, name in enumerate([f"net.{k}" for k in range(6)]
                                 + [f"encoder.layers.{k}.self_attn.out_proj" for k in range(6)])},
        bins=8),
    lambda: class_counts_figure({"train": [150] * 10, "validation": [40] * 10}),
    lambda: ensemble_figure([(7, {"val_loss": 1.24, "val_acc": 0.467}),
                             (8, {"val_loss": 1.12, "val_acc": 0.547})],
                            {"val_loss": 1.13, "val_acc": 0.575}),
])
def test_figures_are_card_wide_and_nothing_touches_the_edge(draw) -> None:
    image = figure_to_array(draw())
    assert image.shape[1] >= 2 * CARD_WIDTH  # drawn at the card's width (or wider), 2x pixels
    # landscape: Time Series fits an image into a box 1.5 to 2.1 times as wide as high
    assert image.shape[1] >= 1.45 * image.shape[0]
    edge = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                           image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    assert (edge >= 250).all()  # a clipped label would reach the border
    dark = (image < 128).any(2)
    assert dark[:, : image.shape[1] // 8].any()  # y labels / layer names on the left
    assert dark.mean() > 0.01


def test_the_ensemble_is_bars_with_their_values_never_a_line() -> None:
    members = [(7, {"val_acc": 0.467, "val_loss": 63.0}), (8, {"val_acc": 0.547, "val_loss": 1.2}),
               (9, {"val_acc": 0.514, "val_loss": 1.1})]
    ensemble = {"val_acc": 0.575, "val_loss": 1.13}
    fig = ensemble_figure(members, ensemble)
    frames = [a for a in fig.artists if type(a) is Rectangle]  # one panel per metric
    bars = [a for a in fig.artists if isinstance(a, PolyCollection)]
    assert not [a for a in fig.artists if isinstance(a, Line2D)]
    texts = [t.get_text() for t in fig.texts]
    for frame, panel, name in zip(frames, bars, ("val_acc", "val_loss"), strict=True):
        want = [row[name] for _, row in members] + [ensemble[name]]
        tops = [p.vertices[:, 1].max() for p in panel.get_paths()]
        heights = [top - p.vertices[:, 1].min() for top, p in zip(tops, panel.get_paths(),
                                                                 strict=True)]
        assert heights == pytest.approx([v * heights[-1] / want[-1] for v in want])  # from 0
        assert max(tops) < frame.get_y() + frame.get_height()  # the first epoch's 63 not cut
        assert name in texts and all(f"{v:.3g}" in texts for v in want)  # each bar's value
        assert [tuple(c[:3]) for c in panel.get_facecolor()] == [to_rgb("C0")] * 3 + [
            to_rgb("C3")]  # members blue, the ensemble red
    assert all(texts.count(label) == 2 for label in ("7", "8", "9", "ens."))  # under each


def test_many_rows_flow_into_columns_side_by_side() -> None:
    """Eight duplicate pairs: a strip of eight rows was a 55 x 215 thumbnail in Time Series;
    side by side they make a card about as wide as high, within the card's width."""
    sample = torch.zeros(8, 8)
    pairs = [[Cell(sample, (f"#{k}", "label 3")), Cell(sample, (f"#{k + 1000}", "label 3"))]
             for k in range(8)]
    image = annotated_grid(pairs, "8 groups of identical inputs in train")
    bands = [*(image == 0).all(2).any(1).tolist(), False]
    rows = sum(1 for i, b in enumerate(bands) if b and (i == 0 or not bands[i - 1]))
    assert image.shape[1] == CARD_WIDTH and image.shape[1] >= image.shape[0]
    assert rows <= 4  # 8 rows in 2 or more columns
    one = annotated_grid(pairs[:1], "1 group")  # a single row stays one column, card wide
    assert one.shape[1] == CARD_WIDTH and one.shape[1] >= 1.4 * one.shape[0]


def _ink_box(image: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((image < 160).any(2))
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@pytest.mark.parametrize("rotation", [0, 90])
@pytest.mark.parametrize("ha", ["left", "center", "right"])
@pytest.mark.parametrize("va", ["top", "center", "bottom", "baseline"])
def test_pillow_draws_the_figures_text_where_agg_would(rotation, ha, va) -> None:
    """render() draws a figure's plain texts with Pillow: same font, size and colour, and
    each where matplotlib's Agg puts it (its ink within 2 pixels at 192 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lightning_diag.tensorboard.raster import render

    def drawn(fast: bool) -> np.ndarray:
        fig = Figure(figsize=(2, 2), dpi=192)
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, "net.3 (Conv2d) 0.1", rotation=rotation, ha=ha, va=va, fontsize=8,
                 color="C3")
        if fast:
            return render(fig)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3]

    fast, agg = drawn(True), drawn(False)  # (rotated on its baseline: left to Agg)
    assert np.abs(np.array(_ink_box(fast)) - np.array(_ink_box(agg))).max() <= 2
    assert red(fast).sum() == pytest.approx(red(agg).sum(), rel=0.25)  # same colour, weight


def test_texts_pillow_cannot_draw_are_left_to_agg() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lightning_diag.tensorboard.raster import render

    fig = Figure(figsize=(2, 1), dpi=100)
    FigureCanvasAgg(fig)
    for k, text in enumerate(["$x^2$", "two\nlines", "tilted"]):
        fig.text(0.1 + 0.3 * k, 0.5, text, rotation=30 if text == "tilted" else 0)
    fig.text(0.95, 0.5, "up", rotation=90, va="baseline")
    fig.text(0.5, 0.9, "wrapped at the figure's edge " * 3, wrap=True)
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.2))
    ax.set_title("in an axes")
    image = render(fig)
    fig.canvas.draw()
    assert np.array_equal(image, np.asarray(fig.canvas.buffer_rgba())[..., :3])
    laid_out = Figure(figsize=(2, 1), dpi=100, layout="constrained")  # it places the texts
    FigureCanvasAgg(laid_out)
    laid_out.suptitle("placed by the layout")
    image = render(laid_out)
    laid_out.canvas.draw()
    assert np.array_equal(image, np.asarray(laid_out.canvas.buffer_rgba())[..., :3])

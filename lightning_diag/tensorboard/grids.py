"""Captioned image grids: samples and filters with the text TensorBoard cannot show.

TensorBoard's Images dashboard scales every image to the width of its card (:data:`CARD_WIDTH`
pixels) and shows no caption, so a grid is drawn for that width with its own text: images at
least that wide, text about :data:`TEXT_PX` pixels high once scaled to the card. Pillow is
imported lazily.

Example:
    >>> import torch
    >>> annotated_grid([[Cell(torch.rand(8, 8), ("#3", "label 1"))]], "one sample").shape[1]
    345
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lightning_diag.functional.data import image_grid

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

__all__ = ["CARD_WIDTH", "TEXT_PX", "Cell", "annotated_grid", "font"]

#: Pixels: the width TensorBoard's Images dashboard scales every image to (its card, measured on
#: TensorBoard 2.x in a 1600-pixel-wide window; the cards have a fixed width).
CARD_WIDTH = 345
#: Pixels: the height text should have once the image is scaled to the card.
TEXT_PX = 13
_RED, _INK, _NOTE = (200, 30, 30), (25, 25, 25), (140, 75, 0)


@dataclass(frozen=True)
class Cell:
    """One image of :func:`annotated_grid` and the lines of text drawn under it.

    Attributes:
        image: ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)``, min-max scaled on its own.
        caption: Lines under the image (split, dataset index, label, ...).
        alert: Frame the image and write its caption in red (a conflicting label, say).
    """

    image: torch.Tensor
    caption: tuple[str, ...] = ()
    alert: bool = False


@functools.lru_cache(maxsize=16)
def font(px: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, the font matplotlib ships (so no system font is needed)."""
    from pathlib import Path

    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", name)), px)


@functools.lru_cache(maxsize=4096)
def _length(text: str, px: int) -> float:
    """The width of ``text`` in :func:`font` ``(px)``: a grid is laid out for several column
    counts, each measuring every caption (~1000 measures for 80 samples, ~7 ms, uncached)."""
    return float(font(px).getlength(text))


def _wrap(text: str, face: ImageFont.FreeTypeFont, width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


@dataclass(frozen=True)
class _Layout:
    px: int  # text height
    scale: int  # image enlargement
    label_w: int  # row-label column
    cell_w: int
    cell_h: int
    columns: int  # rows flow into this many side-by-side columns
    per_column: int  # rows per column

    @property
    def line(self) -> int:
        return round(self.px * 1.25)

    @property
    def margin(self) -> int:
        return max(4, self.px // 3)

    @property
    def block_w(self) -> int:
        """One column of rows: the labels and the cells."""
        return self.label_w + self.ncol * self.cell_w

    @property
    def gap(self) -> int:
        """Between two columns of rows."""
        return self.px if self.columns > 1 else 0

    @property
    def width(self) -> int:
        return 2 * self.margin + self.columns * self.block_w + (self.columns - 1) * self.gap

    ncol: int = 1  # cells per row


#: The shape grids are laid out for: Time Series' image box is about 1.5 (a 1280-pixel window)
#: to 2.1 (1600 pixels) times as wide as high.
_ASPECT = 1.8


def _layout(rows: list[list[Cell]], row_labels: Sequence[str], px: int,
            scale: int | None, columns: int = 1) -> _Layout:
    """The grid's layout; ``scale`` None: the largest enlargement that keeps it within the
    card (1 when none does)."""
    gap = max(3, px // 4)
    h, w = next(c.image.shape[-2:] for row in rows for c in row)
    ncol = max((len(row) for row in rows), default=1) or 1
    lines = max((len(c.caption) for row in rows for c in row), default=0)
    caption_w = math.ceil(max((_length(t, px) for row in rows for c in row
                               for t in c.caption), default=0.0))
    label_w = math.ceil(max((_length(t, px) for t in row_labels), default=0.0))
    label_w += 2 * gap if label_w else 0

    def made(s: int) -> _Layout:
        return _Layout(px, s, label_w, max(w * s, caption_w) + gap,
                       h * s + lines * round(px * 1.25) + gap + (gap if lines else 0), columns,
                       math.ceil(len(rows) / columns), ncol)

    if scale is not None:
        return made(scale)
    fits = [made(s) for s in range(1, max(2, CARD_WIDTH // w + 1))]
    return max((f for f in fits if f.width <= CARD_WIDTH), key=lambda f: f.scale,
               default=fits[0])


def _fitted(rows: list[list[Cell]], row_labels: Sequence[str], columns: int) -> _Layout:
    """The layout in ``columns`` columns, its text larger when the grid is wider than the card
    (TensorBoard shrinks it to the card: the text reads :data:`TEXT_PX` high there)."""
    fit = _layout(rows, row_labels, TEXT_PX, None, columns)
    if fit.width > CARD_WIDTH:
        fit = _layout(rows, row_labels, math.ceil(TEXT_PX * fit.width / CARD_WIDTH), fit.scale,
                      columns)
    return fit


def _head(title: str, notes: Sequence[str], fit: _Layout,
          width: int) -> list[tuple[str, ImageFont.FreeTypeFont, tuple[int, int, int]]]:
    room = width - 2 * fit.margin
    head = [(t, font(fit.px, bold=True), _INK) for t in _wrap(title, font(fit.px, True), room)]
    return head + [(t, font(fit.px), _NOTE) for note in notes
                   for t in _wrap(note, font(fit.px), room)]


def annotated_grid(rows: Sequence[Sequence[Cell]], title: str, row_labels: Sequence[str] = (),
                   notes: Sequence[str] = ()) -> np.ndarray:
    """Images in rows with their captions, row labels, a title and notes, as one image.

    Small images are enlarged (nearest neighbour) until the grid fills :data:`CARD_WIDTH`;
    the text is :data:`TEXT_PX` pixels high, more when the grid is wider than the card so that
    it reads the same once TensorBoard scales the image down. Many rows flow into columns side
    by side, as many as make the image closest to :data:`_ASPECT` times as wide as high (Time
    Series fits an image into a landscape box: a tall strip would be a thumbnail). Rows may be
    empty (a class without samples keeps its labelled row).

    Args:
        rows: The cells of each row; every image of the same size.
        title: What the image shows, wrapped to its width.
        row_labels: One label per row, drawn left of it (none when empty).
        notes: Lines drawn in brown under the title (what is not shown, what red means).

    Returns:
        ``(H, W, 3)`` uint8, ``W >= CARD_WIDTH``.

    Example:
        >>> cells = [[Cell(torch.rand(8, 8), ("train #3", "label 1"))]]
        >>> image = annotated_grid(cells, "one sample", row_labels=["class 1"])
        >>> image.shape[1] == CARD_WIDTH, image.dtype
        (True, dtype('uint8'))
    """
    from PIL import Image, ImageDraw

    grid = [list(row) for row in rows]
    labels = list(row_labels) or [""] * len(grid)
    if not any(grid):
        raise ValueError("annotated_grid needs at least one image.")

    def grid_w(grid: list[list[Cell]]) -> int:
        return int(next(c.image.shape[-1] for row in grid for c in row))

    def shape(fit: _Layout) -> tuple[int, int]:
        width = max(fit.width, CARD_WIDTH)
        head = len(_head(title, notes, fit, width))
        return width, 3 * fit.margin + head * fit.line + fit.per_column * fit.cell_h

    one = _fitted(grid, row_labels, 1)
    # more columns only while the grid stays within the card and its images stay visible
    # (twice the text's height, or as large as in one column)
    fits = [one] + [f for k in range(2, len(grid) + 1)
                    if (f := _layout(grid, row_labels, TEXT_PX, None, k)).width <= CARD_WIDTH
                    and f.scale * grid_w(grid) >= min(one.scale * grid_w(grid), 2 * TEXT_PX)]
    fit = min(fits, key=lambda f: abs(math.log(shape(f)[0] / shape(f)[1] / _ASPECT)))
    (width, height), margin, line = shape(fit), fit.margin, fit.line
    head = _head(title, notes, fit, width)
    top = margin + len(head) * line + margin
    spots = [(margin + (r // fit.per_column) * (fit.block_w + fit.gap),
              top + (r % fit.per_column) * fit.cell_h) for r in range(len(grid))]
    cells = [(cell, (left + fit.label_w + c * fit.cell_w, y))
             for row, (left, y) in zip(grid, spots, strict=True) for c, cell in enumerate(row)]
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    for tile, (_, (x, y)) in zip(_tiles([c.image for c, _ in cells], fit.scale), cells,
                                 strict=True):
        pixels[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    for k, (text, face, colour) in enumerate(head):
        draw.text((margin, margin + k * line), text, fill=colour, font=face)
    for row, label, (left, y) in zip(grid, labels, spots, strict=True):
        image_h = row[0].image.shape[-2] * fit.scale if row else line
        draw.text((left, y + image_h // 2), label, fill=_INK, font=font(fit.px), anchor="lm")
    for cell, at in cells:
        _annotate(draw, cell, at, fit)
    return np.asarray(canvas)


def _tiles(images: list[torch.Tensor], scale: int) -> list[np.ndarray]:
    """Every image as :func:`~lightning_diag.functional.data.image_grid` draws it, ``(H, W, 3)``
    uint8, made as one strip (one conversion instead of one per image, 80 in a grid)."""
    strip = image_grid([images], pad=0, scale=scale)
    pixels = (strip * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    width = pixels.shape[1] // len(images)
    return [pixels[:, k * width:(k + 1) * width] for k in range(len(images))]


def _annotate(draw: ImageDraw.ImageDraw, cell: Cell, at: tuple[int, int], fit: _Layout) -> None:
    """A cell's caption under its image, and a red frame around an alert's."""
    x, y = at
    h, w = (n * fit.scale for n in cell.image.shape[-2:])
    colour = _RED if cell.alert else _INK
    if cell.alert:
        frame = max(2, fit.px // 6)
        draw.rectangle((x - 1, y - 1, x + w, y + h), outline=_RED, width=frame)
    for k, text in enumerate(cell.caption):
        draw.text((x, y + h + max(3, fit.px // 4) + k * fit.line), text, fill=colour,
                  font=font(fit.px))

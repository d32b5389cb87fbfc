"""A matplotlib figure to pixels: Agg draws the lines and shapes, Pillow the figure's plain text.

Agg lays out and draws a text artist in ~0.7 ms (the text shaped by FreeType through
matplotlib's layout, its bounding box computed twice); Pillow draws the same string with the
same font file in ~0.05 ms. The figures of :mod:`~lightning_diag.tensorboard.figures` hold
20-60 text artists (tick labels, layer names, bar values), so most of their drawing time was
text. :func:`render` hides the figure's own plain text artists (``fig.text``) while Agg draws
the rest, then draws them with Pillow where matplotlib would have put them: same font file
(whatever matplotlib resolves for the artist), size, colour, alignment and 0 or 90 degree
rotation, on top of everything else. Texts Pillow cannot stand in for (math, several lines,
wrapped, a box, other angles, transparency), every text inside an Axes and every text of a
figure with a layout engine (which places them while Agg draws) are left to Agg.

Example:
    >>> from matplotlib.backends.backend_agg import FigureCanvasAgg
    >>> from matplotlib.figure import Figure
    >>> fig = Figure(figsize=(2, 1), dpi=100); _ = FigureCanvasAgg(fig)
    >>> _ = fig.text(0.5, 0.5, "epoch", ha="center", va="center")
    >>> image = render(fig)
    >>> image.shape, bool((image < 128).any()), fig.texts[0].get_visible()
    ((100, 200, 3), True, True)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.text import Text
    from PIL import Image, ImageFont

__all__ = ["render", "text_width"]

_ANGLES = (0.0, 90.0)
_HA = ("left", "center", "right")
_VA = ("top", "center", "bottom", "baseline")


@functools.lru_cache(maxsize=64)
def _font(path: str, px: float) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.truetype(path, px)


@functools.lru_cache(maxsize=64)
def _line_metrics(path: str, px: float) -> tuple[float, float]:
    """Ascent and descent of "lp", which matplotlib takes as a line's least height."""
    _, top, _, bottom = _font(path, px).getbbox("lp", anchor="ls")
    return -float(top), float(bottom)


def _face(text: Text, dpi: float) -> tuple[str, float] | None:
    """The font file matplotlib would draw ``text`` with and its size in pixels (to a quarter
    pixel); None: not a TrueType or OpenType file."""
    from matplotlib.font_manager import findfont

    props = text.get_fontproperties()
    path = findfont(props)
    if not path.lower().endswith((".ttf", ".otf")):
        return None
    return path, round(props.get_size_in_points() * dpi / 72 * 4) / 4


def text_width(text: str, points: float, dpi: float, weight: str = "normal") -> float:
    """Width in pixels of ``text`` drawn by :func:`render` at ``points`` on a ``dpi`` figure."""
    from matplotlib.font_manager import FontProperties, findfont

    path = findfont(FontProperties(size=points, weight=weight))
    return float(_font(path, round(points * dpi / 72 * 4) / 4).getlength(text))


def _plain(text: Text) -> bool:
    """Whether Pillow can stand in for Agg on ``text`` (one line of plain text, no box, at 0
    degrees, or at 90 aligned on its box)."""
    from matplotlib.colors import to_rgba
    from matplotlib.text import Text as PlainText

    s = text.get_text()
    return (type(text) is PlainText and text.get_visible() and bool(s) and "\n" not in s
            and "$" not in s and text.get_bbox_patch() is None and text.get_alpha() is None
            and not text.get_usetex() and not text.get_wrap() and text.get_rotation() in _ANGLES
            and text.get_horizontalalignment() in _HA and text.get_verticalalignment() in _VA
            and not (text.get_rotation() and text.get_verticalalignment() == "baseline")
            and text.get_path_effects() == [] and text.get_clip_path() is None
            and text.get_antialiased() and to_rgba(text.get_color())[3] == 1.0)


def render(fig: Figure) -> np.ndarray:
    """``fig`` (on an Agg canvas) as an ``(H, W, 3)`` uint8 array: Agg for everything but the
    figure's plain texts, Pillow for those (see the module's docstring)."""
    from PIL import Image

    # a layout engine places the texts while Agg draws: it must see them all
    texts = [] if fig.get_layout_engine() is not None else [
        (t, face) for t in fig.texts if _plain(t) and (face := _face(t, fig.dpi))]
    for t, _ in texts:
        t.set_visible(False)
    try:
        fig.canvas.draw()
    finally:
        for t, _ in texts:
            t.set_visible(True)
    canvas = fig.canvas
    width, height = canvas.get_width_height(physical=True)  # type: ignore[call-arg]
    image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(),  # type: ignore[attr-defined]
                             "raw", "RGBA", 0, 1).convert("RGB")
    for t, face in texts:
        _draw(image, t, *face)
    return np.array(image)


def _draw(image: Image.Image, text: Text, path: str, px: float) -> None:
    """``text`` drawn as Agg would place it: its box (advance width by the line's height, at
    least that of "lp") aligned on its anchor, rotated by 0 or 90 degrees."""
    from matplotlib.colors import to_rgb
    from PIL import Image as PILImage
    from PIL import ImageDraw

    s = text.get_text()
    x, y = text.get_transform().transform(text.get_unitless_position())
    y = image.height - y  # Pillow counts rows from the top
    face, (lp_ascent, lp_descent) = _font(path, px), _line_metrics(path, px)
    _, top, _, bottom = face.getbbox(s, anchor="ls")
    ascent, descent = max(-top, lp_ascent), max(bottom, lp_descent)
    width, height = face.getlength(s), ascent + descent
    colour = tuple(round(255 * c) for c in to_rgb(text.get_color()))
    rotated = text.get_rotation() == 90.0
    box_w, box_h = (height, width) if rotated else (width, height)
    left = x - {"left": 0.0, "center": box_w / 2, "right": box_w}[
        text.get_horizontalalignment()]
    va = text.get_verticalalignment()
    top_y = {"top": y, "center": y - box_h / 2, "bottom": y - box_h,
             "baseline": y - ascent}[va]
    if not rotated:
        ImageDraw.Draw(image).text((left, top_y + ascent), s, fill=colour, font=face,
                                   anchor="ls")
        return
    mask = PILImage.new("L", (int(width) + 2, int(height) + 2), 0)
    ImageDraw.Draw(mask).text((1, 1 + ascent), s, fill=255, font=face, anchor="ls")
    mask = mask.transpose(PILImage.Transpose.ROTATE_90)  # reads bottom to top, as Agg's 90
    image.paste(PILImage.new("RGB", mask.size, colour), (round(left) - 1, round(top_y) - 1),
                mask)

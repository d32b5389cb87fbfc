"""Tag bookkeeping and shared drawing of the report (:mod:`lightning_diag.report`).

A :class:`Canvas` hands each tag to the first section that asks for it and renders scalars,
texts, images and histograms the same way in every section.

Example:
    >>> from lightning_diag.tensorboard.events import RunData
    >>> from lightning_diag.tensorboard.tags import CURVES
    >>> Canvas(RunData()).slug(CURVES.prefix)
    ''
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightning_diag.report.html import bars, img, markdown_html
from lightning_diag.tensorboard.events import Histogram, Image, RunData, Series, Text

__all__ = ["Canvas", "Legend", "natural"]

#: Line colours: tab10's ten, then tab20's lighter tones of them; runs differ by line style.
_COLORS = [*map(colormaps["tab10"], range(10)), *map(colormaps["tab20"], range(1, 20, 2))]
_STYLES = ("-", "--", ":", "-.")
#: Past this many names a legend would be taller than its figure: it names the runs only.
MAX_LEGEND = 30


def natural(text: str) -> list[Any]:
    """Sort key reading the numbers in ``text`` as numbers: net.2 before net.10.

    Example:
        >>> sorted(["net.10", "net.1", "net.11", "net.0", "net.2"], key=natural)
        ['net.0', 'net.1', 'net.2', 'net.10', 'net.11']
    """
    # re.split with a group alternates text and digits, so ints only meet ints when compared.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


class Legend:
    """One legend for a figure: a colour per name (a layer, a split), the same in every panel,
    and a line style per run when the report holds several; drawn outside the plots.

    Example:
        >>> legend = Legend(["run_a", "run_b"])
        >>> first = legend.color("net.0")
        >>> legend.color("net.1") != first, legend.color("net.0") == first, legend.style("run_b")
        (True, True, '--')
        >>> _ = legend.style("run_a")
        >>> [h.get_label() for h in legend.handles()]
        ['net.0', 'net.1', 'run run_b', 'run run_a']
    """

    def __init__(self, runs: list[str], named: bool = True) -> None:
        self.runs, self.named = runs, named  # not named: one colour, its chart's title names it
        self.single: Any = _COLORS[0]  # that colour
        self.colors: dict[str, Any] = {}
        self.used_runs: list[str] = []
        self.extra: list[Line2D] = []  # entries of lines drawn apart (a guide line)

    def color(self, name: str) -> Any:
        if not self.named:
            return self.single
        return self.colors.setdefault(name, _COLORS[len(self.colors) % len(_COLORS)])

    def style(self, run: str) -> str:
        if run not in self.used_runs:
            self.used_runs.append(run)
        return _STYLES[self.runs.index(run) % len(_STYLES)] if run in self.runs else "-"

    def handles(self) -> list[Line2D]:
        """Entries: each name in its colour (when there are 2 to :data:`MAX_LEGEND`), then each
        run in its style (when there are several)."""
        names = self.colors if 1 < len(self.colors) <= MAX_LEGEND else {}
        out = [Line2D([], [], color=c, lw=1.6, label=n) for n, c in names.items()]
        if len(self.used_runs) > 1:
            out += [Line2D([], [], color="0.3", lw=1.4, ls=self.style(r), label=f"run {r}")
                    for r in self.used_runs]
        return out + self.extra

    def draw(self, fig: Figure) -> bool:
        """Put the legend right of the plots, in columns of at most 25; False when empty."""
        handles = self.handles()
        if not handles:
            return False
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9,
                   frameon=False, ncols=-(-len(handles) // 25))
        return True


class Canvas:
    """The run data of one report; each section marks the tags it consumed."""

    def __init__(self, data: RunData) -> None:
        self.data = data
        self._used: set[tuple[int, str]] = set()
        self.multi = len(data.runs) > 1

    # -- data selection -------------------------------------------------------------------
    def take(self, kind: dict[str, list], pred: Callable[[str], bool]) -> list[str]:
        """Tags of one kind (scalars, texts, ...) matching ``pred`` that no section showed yet."""
        tags = sorted((t for t in kind if pred(t) and (id(kind), t) not in self._used),
                      key=natural)
        self._used.update((id(kind), t) for t in tags)
        return tags

    def prefixed(self, prefix: str) -> tuple[list[str], list[str], list[str], list[str]]:
        d, p = self.data, (lambda t: t.startswith(prefix))
        return (self.take(d.scalars, p), self.take(d.texts, p), self.take(d.images, p),
                self.take(d.histograms, p))

    def slug(self, prefix: str, x_label: str = "step") -> str:
        """Everything under ``prefix``: texts, images, values, line charts and histograms."""
        scalars, texts, images, hists = self.prefixed(prefix)
        parts = [self.texts(texts), self.images(images)]
        # A number logged once (an initial loss, a final score) reads better as a table row.
        single = [t for t in scalars if all(len(s.values) == 1 for s in self.data.scalars[t])]
        if single:
            parts.append(self.value_table(single, prefix))
        if series := [t for t in scalars if t not in single]:
            parts.append(self.panels([(t[len(prefix):], [t]) for t in series], prefix, x_label))
        if hists:
            parts.append(self.histograms(hists, prefix))
        return "".join(parts)

    # -- rendering ------------------------------------------------------------------------
    def value_table(self, tags: list[str], prefix: str) -> str:
        run_head = "<th>run</th>" if self.multi else ""
        rows = "".join(
            f"<tr><td>{html.escape(' · '.join(filter(None, (t[len(prefix):], s.series))))}</td>"
            + (f"<td>{html.escape(s.run)}</td>" if self.multi else "")
            + f"<td>{s.values[0]:.6g}</td><td>{s.steps[0]}</td></tr>"
            for t in tags for s in self.data.scalars[t]
        )
        return (f"<table class='values'><thead><tr><th>name</th>{run_head}<th>value</th>"
                f"<th>step</th></tr></thead><tbody>{rows}</tbody></table>")

    def legend(self, named: bool = True) -> Legend:
        """A :class:`Legend` for one figure of this report's runs."""
        return Legend(self.data.runs, named)

    def panels(self, panels: list[tuple[str, list[str]]], prefix: str, x_label: str,
               per_row: int = 3, strip_stat: bool = False) -> str:
        """Up to 12 charts per figure, one per ``(title, tags)``; one legend per figure, right
        of the charts, when their lines need names (a panel's one line is named by its title)."""
        out = []
        for start in range(0, len(panels), 12):  # bounded figure size
            chunk = panels[start:start + 12]
            cols = min(per_row, len(chunk))
            rows = -(-len(chunk) // cols)
            fig = Figure(figsize=(4.4 * cols, 3.0 * rows))
            axes = fig.subplots(rows, cols, squeeze=False).ravel()
            # one line per panel: its title names it, one colour serves all
            key = self.legend(named=not all(len(tags) == 1 and not self._sibling_series(tags[0])
                                            for _, tags in chunk))
            for ax, (title, tags) in zip(axes, chunk, strict=False):
                label_x = self.plot_tags(ax, tags, prefix, strip_stat=strip_stat,
                                         epoch_axis=x_label == "epoch-or-step", legend=key)
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(label_x if x_label == "epoch-or-step" else x_label, fontsize=8)
            for ax in axes[len(chunk):]:
                ax.set_visible(False)
            fig.tight_layout()
            outside = key.draw(fig)
            out.append(img(fig, ", ".join(t for t, _ in chunk), tight=False, outside=outside))
        return "".join(out)

    def _sibling_series(self, tag: str) -> bool:
        return any(s.series for s in self.data.scalars.get(tag, []))

    def plot_tags(self, ax: Axes, tags: Iterable[str], prefix: str, legend: Legend,
                  emphasize: tuple[str, ...] = (), strip_stat: bool = False,
                  epoch_axis: bool = False, skip: Collection[str] = ()) -> str:
        """One line per series of each tag, except the sibling runs in ``skip``: coloured by
        its name in ``legend`` (the tag, or its sibling run: ``train``, ``ema``), styled by its
        run; returns the x-axis label."""
        x_label = "step"
        tags = list(tags)
        for tag in tags:
            name = tag[len(prefix):] if prefix and tag.startswith(prefix) else tag
            if strip_stat and "/" in name:
                name = name.split("/", 1)[1]
            for s in self.data.scalars[tag]:
                if s.series in skip:
                    continue
                xs: list[float] = list(s.steps)
                if epoch_axis and (epochs := self._epochs_of(s)) is not None:
                    xs, x_label = epochs, "epoch"
                # a panel of one tag is titled by it: its lines are named by their sibling run
                label = " · ".join(filter(None, (name if len(tags) > 1 or not s.series
                                                 else "", s.series)))
                bold = any(e in name for e in emphasize)
                ax.plot(xs, s.values, marker="o" if len(xs) < 30 else None, ms=3,
                        lw=2.4 if bold else 1.2, color=legend.color(label),
                        ls=legend.style(s.run))
        ax.grid(alpha=0.3)
        return x_label

    def _epochs_of(self, series: Series) -> list[float] | None:
        """Lightning logs an ``epoch`` scalar at every logging step: use it as the x-axis."""
        for epoch_series in self.data.scalars.get("epoch", []):
            if (epoch_series.run, epoch_series.series) == (series.run, series.series):
                at = dict(zip(epoch_series.steps, epoch_series.values, strict=False))
                if all(step in at for step in series.steps):
                    return [at[step] for step in series.steps]
        return None

    def texts(self, tags: list[str]) -> str:
        out = []
        for tag in tags:
            latest: dict[str, Text] = {}
            for t in self.data.texts[tag]:
                if t.source not in latest or t.step >= latest[t.source].step:
                    latest[t.source] = t
            for t in latest.values():
                head = f"{tag} ({t.source})" if self.multi or t.series else tag
                out.append(f"<h4>{html.escape(head)} <small>step {t.step}</small></h4>"
                           f"<div class='text'>{markdown_html(t.text)}</div>")
        return "".join(out)

    def images(self, tags: list[str]) -> str:
        cells = []
        for tag in tags:
            latest: dict[str, Image] = {}
            for im in self.data.images[tag]:
                if im.source not in latest or im.step >= latest[im.source].step:
                    latest[im.source] = im
            for im in latest.values():
                cap = f"{tag} ({im.source})" if self.multi or im.series else tag
                src = base64.b64encode(im.png).decode()
                kind = "jpeg" if im.png[:2] == b"\xff\xd8" else "png"
                cells.append(f"<figure><img src='data:image/{kind};base64,{src}' alt="
                             f"'{html.escape(cap, quote=True)}'><figcaption>{html.escape(cap)} "
                             f"&middot; step {im.step}</figcaption></figure>")
        return f"<div class='gallery'>{''.join(cells)}</div>" if cells else ""

    def histograms(self, tags: list[str], prefix: str) -> str:
        """The last logged histogram of each tag, as small multiples."""
        last: list[tuple[str, Histogram]] = []
        for tag in tags:
            for h in self.data.histograms[tag]:
                if not last or last[-1][0] != tag or last[-1][1].source != h.source:
                    last.append((tag, h))
                elif h.step >= last[-1][1].step:
                    last[-1] = (tag, h)
        out = [_histogram_grid(last[start:start + 16], prefix, self.multi)
               for start in range(0, len(last), 16)]
        return "<h4>Histograms (last logged step)</h4>" + "".join(out) if out else ""


def _histogram_grid(chunk: list[tuple[str, Histogram]], prefix: str, multi: bool) -> str:
    """One figure of up to 16 histograms, four per row."""
    cols = min(4, len(chunk))
    rows = -(-len(chunk) // cols)
    fig = Figure(figsize=(3.4 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (tag, h) in zip(axes, chunk, strict=False):
        bars(ax, h)
        name = tag[len(prefix):] if prefix else tag
        ax.set_title(f"{name} @ {h.step}" + (f" ({h.source})" if multi or h.series else ""),
                     fontsize=8)
        # Shapes matter here, not counts: fewer tick labels keep the drawing fast.
        ax.set_yticks([])
        ax.locator_params(axis="x", nbins=4)
        ax.tick_params(labelsize=7)
    for ax in axes[len(chunk):]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.03, right=0.98, bottom=0.6 / (2.4 * rows),
                        top=1 - 0.35 / (2.4 * rows), wspace=0.12, hspace=0.45)
    return img(fig, "histograms", tight=False)

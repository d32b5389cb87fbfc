"""The report's sections with a layout of their own (:mod:`lightning_diag.report`).

Each function renders one section from a :class:`~lightning_diag.report.canvas.Canvas` and
returns ``""`` when the run logged none of its tags.

Example:
    >>> from lightning_diag.report.canvas import Canvas
    >>> from lightning_diag.tensorboard.events import RunData
    >>> curves(Canvas(RunData()))
    ''
"""

from __future__ import annotations

import html
from collections.abc import Collection

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightning_diag.report.canvas import Canvas
from lightning_diag.report.html import img
from lightning_diag.tensorboard.tags import (
    ACTIVATIONS,
    CURVES,
    CURVES_GAP,
    EMA,
    ENSEMBLE,
    GRADIENT_CHECK,
    GUIDE_RUN,
    OVERFIT,
    UPDATE_RATIO,
    raw_metric,
)

__all__ = ["activations", "before_training", "curves", "ema", "ensemble", "other",
           "update_ratio"]

# log10 of the recipe's healthy update/weight ratio, 1e-3 (step 5.5); a decade either side is
# shaded.
_UPDATE_RATIO_GUIDE = -3.0


def before_training(c: Canvas) -> str:
    return "".join(
        f"<h3>{title}</h3>{content}"
        for title, prefix in (("Gradient check", GRADIENT_CHECK.prefix),
                              ("Overfitting a small sample", OVERFIT.prefix))
        if (content := c.slug(prefix))
    )


_GAP = "accuracy gap (train - val)"


def curves(c: Canvas) -> str:
    """Loss, accuracy and their gap per epoch, one chart each (the gap has a scale of its own);
    LearningCurves' own figure of the same curves, as TensorBoard shows it, folded away."""
    scalars, texts, images, _ = c.prefixed(CURVES.prefix)
    groups: dict[str, list[str]] = {"loss": [], "accuracy": [], _GAP: [], "other": []}
    for tag in scalars:
        name = tag[len(CURVES.prefix):]
        key = (_GAP if tag == CURVES_GAP else "loss" if "loss" in name else
               "accuracy" if "acc" in name else "other")
        groups[key].append(tag)
    panels = [(title, tags) for title, tags in groups.items() if tags]
    figure = ""
    if panels:
        fig = Figure(figsize=(4.6 * len(panels), 3.4))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        names, gap = c.legend(), c.legend(named=False)
        gap.single = "0.3"  # grey: no split's colour, its chart's title names it
        for ax, (title, tags) in zip(axes, panels, strict=True):
            c.plot_tags(ax, tags, CURVES.prefix, names if title != _GAP else gap)
            if title == _GAP:
                ax.axhline(0.0, color="k", lw=0.8)
            ax.set_title(title)
            ax.set_xlabel("epoch")
        fig.tight_layout()
        figure = img(fig, "learning curves", tight=False, outside=names.draw(fig))
    drawn = c.images(images)
    if figure and drawn:
        drawn = ("<details><summary>The same curves as LearningCurves drew them for "
                 f"TensorBoard</summary>{drawn}</details>")
    return figure + drawn + c.texts(texts)


def activations(c: Canvas) -> str:
    prefix = ACTIVATIONS.prefix
    scalars, texts, images, hists = c.prefixed(prefix)
    # ``<prefix><stat>/<layer>``: one chart per statistic, one line per layer.
    by_stat: dict[str, list[str]] = {}
    for tag in scalars:
        by_stat.setdefault(tag[len(prefix):].split("/", 1)[0], []).append(tag)
    out = [c.panels(list(by_stat.items()), prefix, "step", per_row=3, strip_stat=True)
           if by_stat else "", c.images(images), c.texts(texts)]
    if hists:
        out.append(c.histograms(hists, prefix))
    return "".join(out)


def update_ratio(c: Canvas) -> str:
    scalars, texts, images, hists = c.prefixed(UPDATE_RATIO.prefix)
    out = ""
    if scalars:
        fig = Figure(figsize=(9, 4))
        ax = fig.subplots()
        key = c.legend()
        # the logged guide line (a sibling run) is the dashed one drawn here
        c.plot_tags(ax, scalars, UPDATE_RATIO.prefix, key, emphasize=("median",),
                    strip_stat=True, skip=(GUIDE_RUN,))
        # green: the runs' styles are drawn in grey in the legend
        ax.axhline(_UPDATE_RATIO_GUIDE, color="darkgreen", ls="--", lw=1.2)
        key.extra.append(Line2D([], [], color="darkgreen", ls="--", lw=1.2,
                                label="healthy: -3 (1e-3)"))
        ax.axhspan(_UPDATE_RATIO_GUIDE - 1, _UPDATE_RATIO_GUIDE + 1, color="g", alpha=0.08)
        ax.set_xlabel("step")
        ax.set_ylabel("log10 |Δw| / |w|")
        fig.tight_layout()
        out = (img(fig, "update ratios", tight=False, outside=key.draw(fig))
               + "<p class='note'>log10 of the update ratio. Green dashed: "
               "the recipe's healthy ratio of about 1e-3 (-3); shaded: a decade either side. "
               "A weight that did not move (-inf) leaves a gap in its line.</p>")
    return out + c.images(images) + c.texts(texts) + (
        c.histograms(hists, UPDATE_RATIO.prefix) if hists else "")


def ema(c: Canvas) -> str:
    scalars, texts, images, _ = c.prefixed(EMA.prefix)
    if not scalars:
        return ""
    # The same averages, logged through Lightning as ``<metric>_ema`` at global steps: the
    # per-epoch charts below hold them next to the raw weights'.
    c.take(c.data.scalars, lambda t: raw_metric(t) is not None)
    panels = [(t[len(EMA.prefix):], [t]) for t in scalars]
    return (c.panels(panels, EMA.prefix, "epoch") + "<p class='note'>Per epoch: "
            "<b>validation</b> the trained weights, <b>ema</b> their moving average (also "
            "logged as <code>&lt;metric&gt;_ema</code>).</p>" + c.images(images) + c.texts(texts))


def ensemble(c: Canvas) -> str:
    """The members against their ensemble: CheckpointEnsemble's bars, as TensorBoard shows them."""
    _, texts, images, _ = c.prefixed(ENSEMBLE.prefix)
    return c.images(images) + c.texts(texts)


def other(c: Canvas, as_curves: Collection[str] = ()) -> str:
    """Every tag no section showed: one chart per scalar, against epochs where Lightning's
    ``epoch`` scalar allows (that counter is the x-axis, not a chart of its own). The metrics
    LearningCurves read (``as_curves``) are its curves: named here, drawn there."""
    shown = c.take(c.data.scalars, lambda t: t in as_curves)
    rest = c.take(c.data.scalars, lambda t: t not in ("hp_metric", "epoch"))
    by_group: dict[str, list[str]] = {}
    for tag in rest:
        by_group.setdefault(tag.rsplit("/", 1)[0] if "/" in tag else "metrics", []).append(tag)
    parts = [c.texts(c.take(c.data.texts, lambda t: True)),
             c.images(c.take(c.data.images, lambda t: True))]
    for group, tags in by_group.items():
        parts.append(f"<h3>{html.escape(group)}</h3>")
        parts.append(c.panels([(t, [t]) for t in tags], "", "epoch-or-step"))
    hists = c.take(c.data.histograms, lambda t: True)
    if hists:
        parts.append(c.histograms(hists, ""))
    if shown and any(parts):
        parts.insert(0, "<p class='note'>Your metrics " + ", ".join(
            f"<code>{html.escape(t)}</code>" for t in shown) + " are drawn under "
            "<a href='#curves'>Learning curves</a>.</p>")
    return "".join(parts)

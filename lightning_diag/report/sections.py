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

from matplotlib.figure import Figure

from lightning_diag.report.canvas import Canvas
from lightning_diag.report.html import img, legend
from lightning_diag.tensorboard.tags import (
    ACTIVATIONS,
    CURVES,
    ENSEMBLE,
    GRADIENT_CHECK,
    OVERFIT,
    UPDATE_RATIO,
    UPDATE_RATIO_GUIDE,
    raw_metric,
)

__all__ = ["activations", "before_training", "curves", "ema", "ensemble", "other",
           "update_ratio"]

# The recipe's healthy update/weight ratio (step 5.5); a decade either side is shaded.
_UPDATE_RATIO_GUIDE = 1e-3


def before_training(c: Canvas) -> str:
    return "".join(
        f"<h3>{title}</h3>{content}"
        for title, prefix in (("Gradient check", GRADIENT_CHECK.prefix),
                              ("Overfitting a small sample", OVERFIT.prefix))
        if (content := c.slug(prefix))
    )


def curves(c: Canvas) -> str:
    scalars, texts, images, _ = c.prefixed(CURVES.prefix)
    groups: dict[str, list[str]] = {"loss": [], "accuracy": [], "other": []}
    for tag in scalars:
        name = tag[len(CURVES.prefix):]
        key = "loss" if "loss" in name else "accuracy" if "acc" in name else "other"
        groups[key].append(tag)
    panels = [(title, tags) for title, tags in groups.items() if tags]
    figure = ""
    if panels:
        fig = Figure(figsize=(5.2 * len(panels), 3.6))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, tags) in zip(axes, panels, strict=True):
            c.plot_tags(ax, tags, CURVES.prefix)
            ax.set_title(title)
            ax.set_xlabel("epoch")
        figure = img(fig, "learning curves")
    return figure + c.images(images) + c.texts(texts)


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
    # A logged constant guide line would duplicate the dashed one drawn here.
    scalars = [t for t in scalars if t != UPDATE_RATIO_GUIDE]
    out = ""
    if scalars:
        fig = Figure(figsize=(9, 4))
        ax = fig.subplots()
        c.plot_tags(ax, scalars, UPDATE_RATIO.prefix, emphasize=("median",))
        ax.set_yscale("log")
        ax.axhline(_UPDATE_RATIO_GUIDE, color="k", ls="--", lw=1, label="1e-3 guide")
        ax.axhspan(_UPDATE_RATIO_GUIDE / 10, _UPDATE_RATIO_GUIDE * 10, color="g", alpha=0.08)
        ax.set_xlabel("step")
        ax.set_ylabel("|Δw| / |w|")
        legend(ax)
        out = (img(fig, "update ratios") + "<p class='note'>Dashed: the recipe's healthy "
               "ratio of about 1e-3; shaded: a decade either side.</p>")
    return out + c.images(images) + c.texts(texts) + (
        c.histograms(hists, UPDATE_RATIO.prefix) if hists else "")


def ema(c: Canvas) -> str:
    pairs = []
    for tag in c.take(c.data.scalars, lambda t: raw_metric(t) is not None):
        raw = raw_metric(tag) or tag
        pairs.append((raw, [tag] + ([raw] if raw in c.data.scalars else [])))
    return c.panels(pairs, "", "epoch-or-step") if pairs else ""


def ensemble(c: Canvas) -> str:
    prefix = ENSEMBLE.prefix
    scalars, texts, images, _ = c.prefixed(prefix)
    groups: dict[str, list[tuple[str, float]]] = {"accuracy": [], "loss": [], "other": []}
    for tag in scalars:
        for s in c.data.scalars[tag]:
            name = tag[len(prefix):] + (f" ({s.run})" if c.multi else "")
            key = "loss" if "loss" in name else "accuracy" if "acc" in name else "other"
            groups[key].append((name, s.values[-1]))
    panels = [(k, rows) for k, rows in groups.items() if rows and k != "other"]
    out = ""
    if panels:
        height = max(2.5, 0.3 * max(len(rows) for _, rows in panels) + 1)
        fig = Figure(figsize=(6 * len(panels), height))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, rows) in zip(axes, panels, strict=True):
            colors = ["tab:red" if "ensemble" in n else "tab:blue" for n, _ in rows]
            ax.barh([n for n, _ in rows], [v for _, v in rows], color=colors)
            for i, (_, v) in enumerate(rows):
                ax.text(v, i, f" {v:.4g}", va="center", fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{title} (ensemble in red)", fontsize=9)
        out = img(fig, "ensemble vs members")
    if groups["other"]:
        out += c.value_table([t for t in scalars if not any(
            w in t[len(prefix):] for w in ("loss", "acc"))], prefix)
    return out + c.images(images) + c.texts(texts)


def other(c: Canvas) -> str:
    rest = c.take(c.data.scalars, lambda t: t != "hp_metric")
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
    return "".join(parts)

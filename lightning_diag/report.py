"""One self-contained HTML report built from a run's TensorBoard event files.

Every figure is a matplotlib PNG embedded as base64 and every TensorBoard image is embedded as
logged, so the file can be mailed or archived alone. Sections follow the tag scheme of
docs/tensorboard.md and appear only when their tags exist; any other scalar lands in a generic
section, so nothing a run logged is hidden.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> d = tempfile.mkdtemp()
    >>> with SummaryWriter(d) as w:
    ...     for epoch, loss in enumerate([2.3, 1.1, 0.6]):
    ...         w.add_scalar("diag/curves/loss/train", loss, epoch)
    >>> path = build_report(d)
    >>> path.name, "Learning curves" in path.read_text()
    ('report.html', True)
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightning_diag.events import Histogram, Image, RunData, Series, Text, load_runs
from lightning_diag.report_html import CSS, bars, img, legend, markdown_html, section

__all__ = ["ReportFinding", "build_report", "parse_findings_table"]

_SEVERITIES = ("FAIL", "WARN", "INFO")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
# The recipe's healthy update/weight ratio (step 5.5); a decade either side is shaded.
_UPDATE_RATIO_GUIDE = 1e-3


class ReportFinding(NamedTuple):
    """A finding read back from a ``diagnostics/<Check>`` table of one run."""

    run: str
    check: str
    step: int
    severity: str
    code: str
    message: str
    advice: str


def parse_findings_table(text: str) -> list[tuple[str, str, str, str]]:
    """Rows ``(SEVERITY, code, message, advice)`` of the markdown table a diagnostic logs.

    Example:
        >>> parse_findings_table("| severity | code | message | advice |\\n|---|---|---|---|\\n"
        ...                      "| WARN | `data.leakage` | 3 leaks a\\\\|b | Remove them. |")
        [('WARN', 'data.leakage', '3 leaks a|b', 'Remove them.')]
    """
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(line.strip("|"))]
        if len(cells) < 4 or set(cells[0]) <= set("-: ") or cells[0].lower() == "severity":
            continue
        severity, code, message, advice = cells[0].upper(), cells[1].strip("`"), *cells[2:4]
        rows.append((severity, code, message, "" if advice == "-" else advice))
    return rows


def build_report(logdir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run(s) under ``logdir`` and return its path.

    Args:
        logdir: A TensorBoard log directory: one run, or a folder of runs.
        out: Output file; defaults to ``<logdir>/report.html``.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
    """
    root = Path(logdir)
    data = load_runs(root)
    target = Path(out) if out is not None else root / "report.html"
    builder = _Report(data)
    body = builder.render()
    title = f"lightning_diag report: {root.resolve().name}"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    runs = ", ".join(html.escape(r) for r in data.runs) or "none"
    nav = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in builder.toc)
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>Log directory <code>"
        f"{html.escape(str(root.resolve()))}</code> &middot; runs: {runs} &middot; built {when}"
        f"</p><nav><ul>{nav}</ul></nav>{body}</body></html>"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


class _Report:
    """Renders the sections in order; each marks the tags it consumed."""

    def __init__(self, data: RunData) -> None:
        self.data = data
        self._used: set[tuple[int, str]] = set()
        self.toc: list[tuple[str, str]] = []
        self.multi = len(data.runs) > 1

    def render(self) -> str:
        if self.data.empty:
            self.toc.append(("empty", "No data"))
            return section("empty", "No data", "<p>No TensorBoard events were found here "
                            "(no run yet, or a run that logged nothing).</p>")
        sections: list[tuple[str, str, Callable[[], str]]] = [
            ("findings", "Findings", self._findings),
            ("data", "Data inspection", lambda: self._slug("diag/data/")),
            ("before", "Before training", self._before_training),
            ("curves", "Learning curves", self._curves),
            ("activations", "Activations and gradients", self._activations),
            ("update_ratio", "Update ratios", self._update_ratio),
            ("first_layer", "First-layer filters", lambda: self._slug("diag/first_layer/")),
            ("advisor", "Learning-rate advisor", lambda: self._slug("diag/advisor/")),
            ("ema", "EMA vs raw weights", self._ema),
            ("ensemble", "Ensemble vs members", self._ensemble),
            ("tuning", "Tuning", lambda: self._slug("diag/tuning/")),
            ("other", "Other scalars", self._other),
        ]
        out = []
        for anchor, title, fn in sections:
            content = fn()
            if content:
                self.toc.append((anchor, title))
                out.append(section(anchor, title, content))
        return "".join(out)

    # -- data selection -------------------------------------------------------------------
    def _take(self, kind: dict[str, list], pred: Callable[[str], bool]) -> list[str]:
        """Tags of one kind (scalars, texts, ...) matching ``pred`` that no section showed yet."""
        tags = sorted(t for t in kind if pred(t) and (id(kind), t) not in self._used)
        self._used.update((id(kind), t) for t in tags)
        return tags

    def _prefixed(self, prefix: str) -> tuple[list[str], list[str], list[str], list[str]]:
        d, p = self.data, (lambda t: t.startswith(prefix))
        return (self._take(d.scalars, p), self._take(d.texts, p), self._take(d.images, p),
                self._take(d.histograms, p))

    # -- sections -------------------------------------------------------------------------
    def _findings(self) -> str:
        found: list[ReportFinding] = []
        seen: set[tuple[str, ...]] = set()
        for tag in self._take(self.data.texts, lambda t: t.startswith("diagnostics/")):
            check = tag.split("/", 1)[1]
            for text in self.data.texts[tag]:
                for sev, code, msg, advice in parse_findings_table(text.text):
                    key = (text.run, check, sev, code, msg)
                    if key not in seen:
                        seen.add(key)
                        found.append(ReportFinding(text.run, check, text.step, sev, code, msg,
                                                   advice))
        # Finding values are already in the table; their scalars would only clutter "Other".
        self._take(self.data.scalars, lambda t: t.startswith("diagnostics/"))
        if not found:
            return ""
        rank = {s: i for i, s in enumerate(_SEVERITIES)}
        found.sort(key=lambda f: (rank.get(f.severity, 3), f.run, f.check, f.step, f.code))
        counts = " &middot; ".join(
            f"<span class='sev sev-{s.lower()}'>{s}</span> "
            f"{sum(f.severity == s for f in found)}" for s in _SEVERITIES
        )
        run_head = "<th>run</th>" if self.multi else ""
        rows = []
        for f in found:
            run_cell = f"<td>{html.escape(f.run)}</td>" if self.multi else ""
            rows.append(
                f"<tr class='row-{f.severity.lower()}'><td><span class='sev "
                f"sev-{f.severity.lower()}'>{html.escape(f.severity)}</span></td>{run_cell}"
                f"<td>{html.escape(f.check)}</td><td><code>{html.escape(f.code)}</code></td>"
                f"<td>{html.escape(f.message)}</td><td>{html.escape(f.advice)}</td>"
                f"<td>{f.step}</td></tr>"
            )
        return (f"<p class='counts'>{counts}</p><table class='findings'><thead><tr><th>severity"
                f"</th>{run_head}<th>check</th><th>code</th><th>message</th><th>advice</th>"
                f"<th>step</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")

    def _slug(self, prefix: str, x_label: str = "step") -> str:
        scalars, texts, images, hists = self._prefixed(prefix)
        parts = [self._texts(texts), self._images(images)]
        # A number logged once (an initial loss, a final score) reads better as a table row.
        single = [t for t in scalars if all(len(s.values) == 1 for s in self.data.scalars[t])]
        if single:
            parts.append(self._value_table(single, prefix))
        if series := [t for t in scalars if t not in single]:
            parts.append(self._line_grid(series, prefix, x_label=x_label))
        if hists:
            parts.append(self._histograms(hists, prefix))
        return "".join(parts)

    def _before_training(self) -> str:
        return "".join(
            f"<h3>{title}</h3>{content}"
            for title, prefix in (("Initial loss", "diag/initial_loss/"),
                                  ("Gradient check", "diag/gradient_check/"),
                                  ("Overfitting a small sample", "diag/overfit/"))
            if (content := self._slug(prefix))
        )

    def _curves(self) -> str:
        scalars, texts, images, _ = self._prefixed("diag/curves/")
        groups: dict[str, list[str]] = {"loss": [], "accuracy": [], "other": []}
        for tag in scalars:
            name = tag[len("diag/curves/"):]
            key = "loss" if "loss" in name else "accuracy" if "acc" in name else "other"
            groups[key].append(tag)
        panels = [(title, tags) for title, tags in groups.items() if tags]
        figure = ""
        if panels:
            fig = Figure(figsize=(5.2 * len(panels), 3.6))
            axes = fig.subplots(1, len(panels), squeeze=False)[0]
            for ax, (title, tags) in zip(axes, panels, strict=True):
                self._plot_tags(ax, tags, "diag/curves/")
                ax.set_title(title)
                ax.set_xlabel("epoch")
            figure = img(fig, "learning curves")
        return figure + self._images(images) + self._texts(texts)

    def _activations(self) -> str:
        out = []
        for prefix in ("diag/activations/", "diag/gradients/"):
            scalars, texts, images, hists = self._prefixed(prefix)
            # ``diag/activations/<stat>/<layer>``: one chart per statistic, one line per layer.
            by_stat: dict[str, list[str]] = {}
            for tag in scalars:
                by_stat.setdefault(tag[len(prefix):].split("/", 1)[0], []).append(tag)
            if by_stat:
                out.append(self._panels(list(by_stat.items()), prefix, "step", per_row=3,
                                        strip_stat=True))
            out += [self._images(images), self._texts(texts)]
            if hists:
                out.append(self._histograms(hists, prefix))
        return "".join(out)

    def _update_ratio(self) -> str:
        scalars, texts, images, hists = self._prefixed("diag/update_ratio/")
        # A logged constant guide line would duplicate the dashed one drawn here.
        scalars = [t for t in scalars if "guide" not in t]
        out = ""
        if scalars:
            fig = Figure(figsize=(9, 4))
            ax = fig.subplots()
            self._plot_tags(ax, scalars, "diag/update_ratio/", emphasize=("median", "summary"))
            ax.set_yscale("log")
            ax.axhline(_UPDATE_RATIO_GUIDE, color="k", ls="--", lw=1, label="1e-3 guide")
            ax.axhspan(_UPDATE_RATIO_GUIDE / 10, _UPDATE_RATIO_GUIDE * 10, color="g", alpha=0.08)
            ax.set_xlabel("step")
            ax.set_ylabel("|Δw| / |w|")
            legend(ax)
            out = (img(fig, "update ratios") + "<p class='note'>Dashed: the recipe's healthy "
                   "ratio of about 1e-3; shaded: a decade either side.</p>")
        return out + self._images(images) + self._texts(texts) + (
            self._histograms(hists, "diag/update_ratio/") if hists else "")

    def _ema(self) -> str:
        content = self._slug("diag/ema/")
        pairs = []
        for tag in self._take(self.data.scalars, lambda t: t.endswith("_ema")):
            raw = tag[: -len("_ema")]
            tags = [tag] + ([raw] if raw in self.data.scalars else [])
            pairs.append((raw, tags))
        if pairs:
            content += self._panels(pairs, "", "epoch-or-step")
        return content

    def _ensemble(self) -> str:
        prefix = "diag/ensemble/"
        scalars, texts, images, _ = self._prefixed(prefix)
        groups: dict[str, list[tuple[str, float]]] = {"accuracy": [], "loss": [], "other": []}
        for tag in scalars:
            for s in self.data.scalars[tag]:
                name = tag[len(prefix):] + (f" ({s.run})" if self.multi else "")
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
            out += self._value_table([t for t in scalars if not any(
                w in t[len(prefix):] for w in ("loss", "acc"))], prefix)
        return out + self._images(images) + self._texts(texts)

    def _other(self) -> str:
        rest = self._take(self.data.scalars, lambda t: t != "hp_metric")
        by_group: dict[str, list[str]] = {}
        for tag in rest:
            by_group.setdefault(tag.rsplit("/", 1)[0] if "/" in tag else "metrics", []).append(tag)
        parts = [self._texts(self._take(self.data.texts, lambda t: True)),
                 self._images(self._take(self.data.images, lambda t: True))]
        for group, tags in by_group.items():
            parts.append(f"<h3>{html.escape(group)}</h3>")
            parts.append(self._panels([(t, [t]) for t in tags], "", "epoch-or-step"))
        hists = self._take(self.data.histograms, lambda t: True)
        if hists:
            parts.append(self._histograms(hists, ""))
        return "".join(parts)

    # -- rendering helpers ----------------------------------------------------------------
    def _value_table(self, tags: list[str], prefix: str) -> str:
        run_head = "<th>run</th>" if self.multi else ""
        rows = "".join(
            f"<tr><td>{html.escape(t[len(prefix):])}</td>"
            + (f"<td>{html.escape(s.run)}</td>" if self.multi else "")
            + f"<td>{s.values[0]:.6g}</td><td>{s.steps[0]}</td></tr>"
            for t in tags for s in self.data.scalars[t]
        )
        return (f"<table class='values'><thead><tr><th>name</th>{run_head}<th>value</th>"
                f"<th>step</th></tr></thead><tbody>{rows}</tbody></table>")

    def _line_grid(self, tags: list[str], prefix: str, x_label: str) -> str:
        return self._panels([(t[len(prefix):], [t]) for t in tags], prefix, x_label)

    def _panels(self, panels: list[tuple[str, list[str]]], prefix: str, x_label: str,
                per_row: int = 3, strip_stat: bool = False) -> str:
        out = []
        for start in range(0, len(panels), 12):  # bounded figure size
            chunk = panels[start:start + 12]
            cols = min(per_row, len(chunk))
            rows = -(-len(chunk) // cols)
            fig = Figure(figsize=(4.4 * cols, 3.0 * rows))
            axes = fig.subplots(rows, cols, squeeze=False).ravel()
            for ax, (title, tags) in zip(axes, chunk, strict=False):
                label_x = self._plot_tags(ax, tags, prefix, strip_stat=strip_stat,
                                          epoch_axis=x_label == "epoch-or-step")
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(label_x if x_label == "epoch-or-step" else x_label, fontsize=8)
            for ax in axes[len(chunk):]:
                ax.set_visible(False)
            out.append(img(fig, ", ".join(t for t, _ in chunk)))
        return "".join(out)

    def _plot_tags(self, ax: Axes, tags: Iterable[str], prefix: str,
                   emphasize: tuple[str, ...] = (), strip_stat: bool = False,
                   epoch_axis: bool = False) -> str:
        x_label = "step"
        n = 0
        for tag in tags:
            name = tag[len(prefix):] if prefix and tag.startswith(prefix) else tag
            if strip_stat and "/" in name:
                name = name.split("/", 1)[1]
            for s in self.data.scalars[tag]:
                xs: list[float] = list(s.steps)
                if epoch_axis and (epochs := self._epochs_of(s)) is not None:
                    xs, x_label = epochs, "epoch"
                label = f"{name} ({s.run})" if self.multi else name
                bold = any(e in name for e in emphasize)
                ax.plot(xs, s.values, marker="o" if len(xs) < 30 else None,
                        ms=3, lw=2.4 if bold else 1.2, label=label)
                n += 1
        ax.grid(alpha=0.3)
        if 1 < n <= 12:
            legend(ax)
        return x_label

    def _epochs_of(self, series: Series) -> list[float] | None:
        """Lightning logs an ``epoch`` scalar at every logging step: use it as the x-axis."""
        for epoch_series in self.data.scalars.get("epoch", []):
            if epoch_series.run == series.run:
                at = dict(zip(epoch_series.steps, epoch_series.values, strict=False))
                if all(step in at for step in series.steps):
                    return [at[step] for step in series.steps]
        return None

    def _texts(self, tags: list[str]) -> str:
        out = []
        for tag in tags:
            latest: dict[str, Text] = {}
            for t in self.data.texts[tag]:
                if t.run not in latest or t.step >= latest[t.run].step:
                    latest[t.run] = t
            for t in latest.values():
                head = f"{tag} ({t.run})" if self.multi else tag
                out.append(f"<h4>{html.escape(head)} <small>step {t.step}</small></h4>"
                           f"<div class='text'>{markdown_html(t.text)}</div>")
        return "".join(out)

    def _images(self, tags: list[str]) -> str:
        cells = []
        for tag in tags:
            latest: dict[str, Image] = {}
            for im in self.data.images[tag]:
                if im.run not in latest or im.step >= latest[im.run].step:
                    latest[im.run] = im
            for im in latest.values():
                cap = f"{tag} ({im.run})" if self.multi else tag
                src = base64.b64encode(im.png).decode()
                kind = "jpeg" if im.png[:2] == b"\xff\xd8" else "png"
                cells.append(f"<figure><img src='data:image/{kind};base64,{src}' alt="
                             f"'{html.escape(cap, quote=True)}'><figcaption>{html.escape(cap)} "
                             f"&middot; step {im.step}</figcaption></figure>")
        return f"<div class='gallery'>{''.join(cells)}</div>" if cells else ""

    def _histograms(self, tags: list[str], prefix: str) -> str:
        """The last logged histogram of each tag, as small multiples."""
        last: list[tuple[str, Histogram]] = []
        for tag in tags:
            for h in self.data.histograms[tag]:
                if not last or last[-1][0] != tag or last[-1][1].run != h.run:
                    last.append((tag, h))
                elif h.step >= last[-1][1].step:
                    last[-1] = (tag, h)
        out = []
        for start in range(0, len(last), 16):
            chunk = last[start:start + 16]
            cols = min(4, len(chunk))
            rows = -(-len(chunk) // cols)
            fig = Figure(figsize=(3.4 * cols, 2.4 * rows))
            axes = fig.subplots(rows, cols, squeeze=False).ravel()
            for ax, (tag, h) in zip(axes, chunk, strict=False):
                bars(ax, h)
                name = tag[len(prefix):] if prefix else tag
                ax.set_title(f"{name} @ {h.step}" + (f" ({h.run})" if self.multi else ""),
                             fontsize=8)
                # Shapes matter here, not counts: fewer tick labels keep the drawing fast.
                ax.set_yticks([])
                ax.locator_params(axis="x", nbins=4)
                ax.tick_params(labelsize=7)
            for ax in axes[len(chunk):]:
                ax.set_visible(False)
            fig.subplots_adjust(left=0.03, right=0.98, bottom=0.6 / (2.4 * rows),
                                top=1 - 0.35 / (2.4 * rows), wspace=0.12, hspace=0.45)
            out.append(img(fig, "histograms", tight=False))
        return "<h4>Histograms (last logged step)</h4>" + "".join(out) if out else ""

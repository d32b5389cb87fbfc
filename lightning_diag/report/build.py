"""One self-contained HTML report built from a run's TensorBoard event files and findings.

Every figure is a matplotlib PNG embedded as base64 and every TensorBoard image is embedded as
logged, so the file can be mailed or archived alone. The findings come from each run's
``findings.jsonl`` (:func:`~lightning_diag.findings.load_findings_by_run`); the other sections
pick their tags by the roots of :mod:`lightning_diag.tensorboard.tags` and appear only when
those tags exist; any other tag lands in a generic section, so nothing a run logged is hidden.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> from lightning_diag.tensorboard.tags import curve
    >>> d = tempfile.mkdtemp()
    >>> with SummaryWriter(d) as w:
    ...     for epoch, loss in enumerate([2.3, 1.1, 0.6]):
    ...         w.add_scalar(curve("loss/train"), loss, epoch)
    >>> path = build_report(d)
    >>> path.name, "Learning curves" in path.read_text()
    ('report.html', True)
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Callable
from pathlib import Path

from lightning_diag.findings import (
    FINDINGS_FILE,
    Finding,
    Severity,
    finding_rank,
    load_findings_by_run,
)
from lightning_diag.report import sections
from lightning_diag.report.canvas import Canvas
from lightning_diag.report.html import CSS, section
from lightning_diag.tensorboard.events import load_runs
from lightning_diag.tensorboard.tags import DATA, FINDINGS, FIRST_LAYER, TUNING

__all__ = ["build_report"]

#: Indices listed per finding; the rest are counted (the run's findings.jsonl has them all).
MAX_INDICES = 20


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
    found = _same_run_names(root, load_findings_by_run(root))
    target = Path(out) if out is not None else root / "report.html"
    body, toc = _render(Canvas(data), found)
    title = f"lightning_diag report: {root.resolve().name}"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    runs = ", ".join(html.escape(r) for r in data.runs or found) or "none"
    nav = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in toc)
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


def _same_run_names(root: Path, found: dict[str, list[Finding]]) -> dict[str, list[Finding]]:
    """``found`` with the run at ``root`` itself named ``"."``, as the events name it."""
    if not (root / FINDINGS_FILE).is_file():
        return found
    alias = root.resolve().name or str(root)
    return {"." if run == alias else run: f for run, f in found.items()}


def _render(c: Canvas, found: dict[str, list[Finding]]) -> tuple[str, list[tuple[str, str]]]:
    """The sections in order, each shown only when it has content, and their table of contents."""
    if c.data.empty and not any(found.values()):
        return section("empty", "No data", "<p>No TensorBoard events or findings were found "
                       "here (no run yet, or a run that logged nothing).</p>"), [
                           ("empty", "No data")]
    parts: list[tuple[str, str, Callable[[Canvas], str]]] = [
        ("findings", "Findings", lambda c: _findings(c, found)),
        ("data", "Data inspection", lambda c: c.slug(DATA.prefix)),
        ("before", "Before training", sections.before_training),
        ("curves", "Learning curves", sections.curves),
        ("activations", "Activations and gradients", sections.activations),
        ("update_ratio", "Update ratios", sections.update_ratio),
        ("first_layer", "First-layer filters", lambda c: c.slug(FIRST_LAYER.prefix)),
        ("ema", "EMA vs raw weights", sections.ema),
        ("ensemble", "Ensemble vs members", sections.ensemble),
        ("tuning", "Tuning", lambda c: c.slug(TUNING.prefix)),
        ("other", "Other scalars", sections.other),
    ]
    out, toc = [], []
    for anchor, title, fn in parts:
        content = fn(c)
        if content:
            toc.append((anchor, title))
            out.append(section(anchor, title, content))
    return "".join(out), toc


_SEVERITIES = (Severity.FAIL, Severity.WARN, Severity.INFO)
_HEAD = ("check", "code", "message", "advice", "value", "expected", "step", "epoch", "indices")
# message and advice keep a readable width; numbers stay on one line
_CLASS = {**dict.fromkeys((0, 1), " class='id'"), **dict.fromkeys((2, 3), " class='msg'"),
          **dict.fromkeys((4, 5, 6, 7), " class='n'")}


def _findings(c: Canvas, by_run: dict[str, list[Finding]]) -> str:
    """Every finding of the runs' records, FAIL first, then in the order they were found."""
    # TensorBoard's copies of the findings (tables, values) say nothing the records do not.
    tables = c.take(c.data.texts, lambda t: t.startswith(FINDINGS.prefix))
    c.take(c.data.scalars, lambda t: t.startswith(FINDINGS.prefix))
    unrecorded = sorted({t.run for tag in tables for t in c.data.texts[tag]} - set(by_run))
    note = (f"<p class='note'>Run(s) {', '.join(html.escape(r) for r in unrecorded)} logged "
            "findings tables to TensorBoard but have no findings.jsonl (runs from before "
            "findings were recorded): see TensorBoard's Text tab.</p>"
            if unrecorded else "")
    rows = sorted(((run, f) for run, found in by_run.items() for f in found),
                  key=lambda row: finding_rank(row[1]))
    if not rows:
        return note
    multi = c.multi or len(by_run) > 1
    counts = " &middot; ".join(
        f"<span class='sev sev-{s.value}'>{s.value.upper()}</span> "
        f"{sum(f.severity is s for _, f in rows)}" for s in _SEVERITIES)
    head = "".join(f"<th>{h}</th>" for h in (("run",) if multi else ()) + _HEAD)
    body = "".join(
        f"<tr class='row-{f.severity.value}'><td><span class='sev sev-{f.severity.value}'>"
        f"{f.severity.value.upper()}</span></td>"
        + (f"<td>{html.escape(run)}</td>" if multi else "")
        + "".join(f"<td{_CLASS.get(i, '')}>{html.escape(cell)}</td>"
                  for i, cell in enumerate(_cells(f)))
        + "</tr>" for run, f in rows)
    return (f"{note}<p class='counts'>{counts}</p><table class='findings'><thead><tr>"
            f"<th>severity</th>{head}</tr></thead><tbody>{body}</tbody></table>")


def _cells(f: Finding) -> list[str]:
    """The cells of one finding after its severity (and run), as plain text.

    Example:
        >>> _cells(Finding("X", "x.a", Severity.WARN, "m", value=9.123456, expected=(2, 2.5),
        ...                step=0, epoch=0, indices=(3, 7)))
        ['X', 'x.a', 'm', '-', '9.123', '[2, 2.5]', '0', '0', '3, 7']
    """
    expected = f.expected
    shown = ("-" if expected is None else f"[{_num(expected[0])}, {_num(expected[1])}]"
             if isinstance(expected, tuple) else _num(expected))
    more = len(f.indices) - MAX_INDICES
    indices = ", ".join(map(str, f.indices[:MAX_INDICES])) + (f" (+{more} more)" if more > 0
                                                                 else "")
    return [f.check, f.code, f.message, f.advice or "-", "-" if f.value is None else _num(f.value),
            shown, _or_dash(f.step), _or_dash(f.epoch), indices or "-"]


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _or_dash(x: int | None) -> str:
    return "-" if x is None else str(x)

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

import datetime as _dt
import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from lightning_diag.report import sections
from lightning_diag.report.canvas import Canvas
from lightning_diag.report.html import CSS, section
from lightning_diag.tensorboard.events import load_runs

__all__ = ["ReportFinding", "build_report", "parse_findings_table"]

_SEVERITIES = ("FAIL", "WARN", "INFO")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


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
    body, toc = _render(Canvas(data))
    title = f"lightning_diag report: {root.resolve().name}"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    runs = ", ".join(html.escape(r) for r in data.runs) or "none"
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


def _render(c: Canvas) -> tuple[str, list[tuple[str, str]]]:
    """The sections in order, each shown only when it has content, and their table of contents."""
    if c.data.empty:
        return section("empty", "No data", "<p>No TensorBoard events were found here "
                       "(no run yet, or a run that logged nothing).</p>"), [("empty", "No data")]
    parts: list[tuple[str, str, Callable[[Canvas], str]]] = [
        ("findings", "Findings", _findings),
        ("data", "Data inspection", lambda c: c.slug("diag/data/")),
        ("before", "Before training", sections.before_training),
        ("curves", "Learning curves", sections.curves),
        ("activations", "Activations and gradients", sections.activations),
        ("update_ratio", "Update ratios", sections.update_ratio),
        ("first_layer", "First-layer filters", lambda c: c.slug("diag/first_layer/")),
        ("advisor", "Learning-rate advisor", lambda c: c.slug("diag/advisor/")),
        ("ema", "EMA vs raw weights", sections.ema),
        ("ensemble", "Ensemble vs members", sections.ensemble),
        ("tuning", "Tuning", lambda c: c.slug("diag/tuning/")),
        ("other", "Other scalars", sections.other),
    ]
    out, toc = [], []
    for anchor, title, fn in parts:
        content = fn(c)
        if content:
            toc.append((anchor, title))
            out.append(section(anchor, title, content))
    return "".join(out), toc


def _findings(c: Canvas) -> str:
    found: list[ReportFinding] = []
    seen: set[tuple[str, ...]] = set()
    for tag in c.take(c.data.texts, lambda t: t.startswith("diagnostics/")):
        check = tag.split("/", 1)[1]
        for text in c.data.texts[tag]:
            for sev, code, msg, advice in parse_findings_table(text.text):
                key = (text.run, check, sev, code, msg)
                if key not in seen:
                    seen.add(key)
                    found.append(ReportFinding(text.run, check, text.step, sev, code, msg, advice))
    # Finding values are already in the table; their scalars would only clutter "Other".
    c.take(c.data.scalars, lambda t: t.startswith("diagnostics/"))
    if not found:
        return ""
    rank = {s: i for i, s in enumerate(_SEVERITIES)}
    found.sort(key=lambda f: (rank.get(f.severity, 3), f.run, f.check, f.step, f.code))
    counts = " &middot; ".join(
        f"<span class='sev sev-{s.lower()}'>{s}</span> "
        f"{sum(f.severity == s for f in found)}" for s in _SEVERITIES
    )
    run_head = "<th>run</th>" if c.multi else ""
    rows = []
    for f in found:
        run_cell = f"<td>{html.escape(f.run)}</td>" if c.multi else ""
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

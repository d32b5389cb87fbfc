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
    ...         w.add_scalar(curve("loss"), loss, epoch)
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

from lightning_diag.codes import DIAGNOSIS_PREFIX
from lightning_diag.findings import FINDINGS_FILE, Finding, Severity, load_findings_by_run
from lightning_diag.presentation import cells, finding_rank
from lightning_diag.presentation import counts as count
from lightning_diag.report import sections
from lightning_diag.report.canvas import Canvas
from lightning_diag.report.html import CSS, section
from lightning_diag.tensorboard.events import load_runs
from lightning_diag.tensorboard.tags import (
    DATA,
    FINDINGS,
    FINDINGS_CARD,
    FIRST_LAYER,
    ROOTS,
    TAGS,
    TUNING,
)

__all__ = ["build_report"]

#: Indices listed per finding; the rest are counted (the run's findings.jsonl has them all).
MAX_INDICES = 8


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
    here = run_name(root)
    title = f"lightning_diag report: {here}"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    runs = ", ".join(html.escape(here if r == "." else r) for r in data.runs or found) or "none"
    nav = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in toc)
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>Log directory <code>"
        f"{html.escape(str(root.resolve()))}</code> &middot; runs: {runs} &middot; built {when}"
        f"</p>{_verdicts(found)}<nav><ul>{nav}</ul></nav>{body}</body></html>"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def run_name(folder: str | Path) -> str:
    """A run folder as people name it: ``<logger name>/version_N`` for Lightning's version
    folders (``version_0`` alone says nothing), else the folder's own name.

    Example:
        >>> run_name("runs/demo/inject/version_0"), run_name("runs/demo")
        ('inject/version_0', 'demo')
    """
    path = Path(folder).resolve()
    if re.fullmatch(r"version_\d+", path.name) and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(path)


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
    read = _read_as_curves(c, found)
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
        *_group_sections(),
        ("other", "Other scalars",
         lambda c: sections.other(c, read if "curves" in dict(toc) else ())),
    ]
    out: list[str] = []
    toc: list[tuple[str, str]] = []
    for anchor, title, fn in parts:
        content = fn(c)
        if content:
            toc.append((anchor, title))
            out.append(section(anchor, title, content))
    return "".join(out), toc


def _group_sections() -> list[tuple[str, str, Callable[[Canvas], str]]]:
    """A section for each tag group (root of :data:`ROOTS`) that no section above showed, say
    a new check's: everything under its root, titled by its writer."""
    writers = {s.pattern.split("/", 1)[0]: s.writer for s in TAGS}
    return [(root, writers.get(root, root), _everything_under(root + "/")) for root in ROOTS]


def _everything_under(prefix: str) -> Callable[[Canvas], str]:
    return lambda c: c.slug(prefix)


def _read_as_curves(c: Canvas, found: dict[str, list[Finding]]) -> set[str]:
    """The tags of the user's metrics that LearningCurves read (its ``curves.keys`` record) in
    every run that logged them: drawn as learning curves, not again under "Other scalars"."""
    read = {run: {name for f in fs if f.code == "curves.keys"
                  for name in (f.details or {}).get("keys", {}).values()}
            for run, fs in found.items()}
    return {tag for tag, series in c.data.scalars.items()
            if all(tag in read.get(s.run, ()) for s in series)}


def _verdicts(by_run: dict[str, list[Finding]]) -> str:
    """The first line of the page, one per run, read the same way for a healthy run and a
    broken one: the verdict (the diagnosis, else the worst problem, else that no check found
    one), then the run's counts per severity and a link to the findings."""
    lines = []
    for run, found in by_run.items():
        if not found:
            continue
        problems = sorted((f for f in found if f.severity >= Severity.WARN), key=finding_rank)
        checks = len({f.check for f in found if not f.code.startswith(DIAGNOSIS_PREFIX)})
        if problems:
            lead, badge = problems[0], problems[0].severity.value
            more = (0 if lead.code.startswith(DIAGNOSIS_PREFIX) else len(problems) - 1)
            text = html.escape(lead.headline().split("] ", 1)[-1]) + (
                f" (and {more} more problem{'s' * (more != 1)})" if more else "")
        else:
            badge, text = "ok", f"no problem found by any of the {checks} check(s)"
        counts = ", ".join(f"{n} {s.value.upper()}" for s, n in count(found).items())
        who = f" for {html.escape(run)}" if len(by_run) > 1 else ""
        lines.append(f"<p class='verdict'><b>Verdict{who}:</b> <span class='sev sev-{badge}'>"
                     f"{badge.upper()}</span> {text} <span class='vcounts'>&middot; {counts} "
                     "&middot; <a href='#findings'>findings</a></span></p>")
    return "".join(lines)


_HEAD = ("finding", "message", "advice", "value", "expected", "step")


def _findings(c: Canvas, by_run: dict[str, list[Finding]]) -> str:
    """Every finding of the runs' records, FAIL first, then in the order they were found,
    under the counts (the diagnosis, which sums up the others, not counted).

    Badges, codes, numbers and steps never wrap (``class='nw'``); message and advice wrap at
    word boundaries (a path too long for the column breaks where it must); a finding about many
    samples lists a few indices under its message and counts the rest. Cells are
    :func:`lightning_diag.presentation.cells`, as every other view shows a finding.
    """
    # TensorBoard's copies of the findings (tables, values, the first screen's card) say
    # nothing the records do not.
    tables = c.take(c.data.texts, lambda t: t.startswith(FINDINGS.prefix))
    c.take(c.data.scalars, lambda t: t.startswith(FINDINGS.prefix))
    c.take(c.data.images, lambda t: t == FINDINGS_CARD)
    unrecorded = sorted({t.run for tag in tables for t in c.data.texts[tag]} - set(by_run))
    note = (f"<p class='note'>Run(s) {', '.join(html.escape(r) for r in unrecorded)} logged "
            "findings tables to TensorBoard but have no findings.jsonl (runs from before "
            "findings were recorded): see TensorBoard's Text tab.</p>"
            if unrecorded else "")
    rows = sorted(((run, f) for run, found in by_run.items() for f in found),
                  key=lambda row: finding_rank(row[1]))
    if not rows:
        return note
    multi = len(by_run) > 1
    every = [f for _, f in rows]
    counts = " &middot; ".join(
        f"<span class='sev sev-{s.value}'>{s.value.upper()}</span> {n}"
        for s, n in count(every).items())
    head = "".join(f"<th>{h}</th>" for h in ("severity", *(("run",) if multi else ()), *_HEAD))
    body = "".join(_row(f, run if multi else None) for run, f in rows)
    return (f"{note}<p class='counts'>{counts}</p><table class='findings'><thead><tr>{head}"
            f"</tr></thead><tbody>{body}</tbody></table>")


def _row(f: Finding, run: str | None) -> str:
    """One finding as a table row (``run``: its run's cell, when the table has several runs)."""
    sev = f.severity.value
    cell = cells(f)
    e = html.escape
    indices = (f"<div class='idx'>indices: {e(_indices(f))}</div>" if f.indices else "")
    tip = "; ".join(([f"epoch {f.epoch}"] if f.epoch is not None else [])
                    + ([f"steps {', '.join(map(str, f.steps()))}"] if len(f.steps()) > 3 else []))
    epoch = f" title='{tip}'" if tip else ""
    about = f"{f.check} &middot; {e(f.subject)}" if f.subject else e(f.check)
    return (
        f"<tr class='row-{sev}'><td><span class='sev sev-{sev}'>{sev.upper()}</span></td>"
        + (f"<td class='run'>{e(run).replace('/', '/<wbr>')}</td>" if run is not None else "")
        + f"<td class='nw'><code class='code'>{e(cell.code)}</code><div class='check'>{about}"
        f"</div></td><td class='msg'>{e(cell.message)}{indices}</td><td class='msg'>"
        f"{e(cell.advice)}</td><td class='nw'>{e(cell.value)}</td><td class='nw'>"
        f"{e(cell.expected)}</td><td class='nw'{epoch}>{e(cell.steps)}</td></tr>")


def _indices(f: Finding) -> str:
    """The first :data:`MAX_INDICES` indices of ``f``, and how many there are in all.

    Example:
        >>> _indices(Finding("X", "x.a", Severity.WARN, "m", indices=range(30)))
        '0, 1, 2, 3, 4, 5, 6, 7, ... (30 in all)'
    """
    shown = ", ".join(map(str, f.indices[:MAX_INDICES]))
    return shown + (f", ... ({len(f.indices)} in all)" if len(f.indices) > MAX_INDICES else "")

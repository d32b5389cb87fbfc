"""One presentation of a :class:`~lightning_diag.findings.Finding`, used by every place that
shows one: the terminal line (:func:`headline`), the warning text (:func:`line`), the
TensorBoard findings table and the HTML report (:func:`cells`), and ``lightning-diag check``
(:func:`format_findings`).

- A number has 4 significant digits; NaN and infinities are spelled as in the record
  (``NaN``, ``Infinity``, ``-Infinity``); a value the code registry declares a fraction is a
  percentage (``8.333%``), and so is its expected range.
- The steps a fact was seen at: ``0``, ``1, 3``, or ``10-230 (23x)``.
- A finding is named by its code, then its subject when it has one
  (``activations.dead_units net.5``).
- An INFO finding is a reading, not a verdict: its expected range is shown only when its value
  lies inside it (a summary whose worst reading is out of range would read as a failure; the
  WARN or FAIL of that check says so).
- Counts of FAIL, WARN and INFO leave the diagnosis out: it sums up the others.

Example:
    >>> from lightning_diag.findings import Finding, Severity
    >>> f = Finding("DataInspection", "data.leakage", Severity.FAIL, "30 pairs (8.3%).",
    ...             value=30 / 360, expected=0.0, step=0)
    >>> headline(f)
    '[FAIL] data.leakage: share of the validation set 8.333% (expected 0%) at step 0'
    >>> step_list([10 * i for i in range(1, 24)])
    '10-230 (23x)'
"""

from __future__ import annotations

import math
import shutil
import textwrap
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from lightning_diag.codes import DIAGNOSIS_PREFIX, spec
from lightning_diag.severity import Severity

if TYPE_CHECKING:
    from lightning_diag.findings import Finding

__all__ = ["Cells", "cells", "counts", "counts_text", "finding_rank", "format_findings",
           "headline", "line", "number", "sort_findings", "step_list", "title"]

#: The severities, worst first, as listings count them.
SEVERITIES = (Severity.FAIL, Severity.WARN, Severity.INFO)
_SPELLED = {math.inf: "Infinity", -math.inf: "-Infinity"}


def number(x: float, percent: bool = False) -> str:
    """``x`` with 4 significant digits (a percentage of a fraction when ``percent``).

    Example:
        >>> number(16.49563), number(0.0833, percent=True), number(float("nan")), number(1e-5)
        ('16.5', '8.33%', 'NaN', '1e-05')
    """
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return _SPELLED[x]
    return f"{100 * x:.4g}%" if percent else f"{x:.4g}"


def _percent(f: Finding) -> bool:
    declared = spec(f.code)
    return declared is not None and declared.percent


def _inside(value: float, expected: float | tuple[float, float]) -> bool:
    if isinstance(expected, tuple):
        return expected[0] <= value <= expected[1]
    return value == expected


def shown_expected(f: Finding) -> float | tuple[float, float] | None:
    """``f.expected``, unless ``f`` is an INFO reading whose value lies outside it."""
    if (f.expected is not None and f.severity is Severity.INFO and f.value is not None
            and not _inside(f.value, f.expected)):
        return None
    return f.expected


def step_list(steps: list[int]) -> str:
    """``steps`` as every view shows them: up to three listed, more as their range and count.

    Example:
        >>> step_list([]), step_list([4]), step_list([1, 3]), step_list(list(range(0, 100, 10)))
        ('', '4', '1, 3', '0-90 (10x)')
    """
    if len(steps) <= 3:
        return ", ".join(map(str, steps))
    return f"{steps[0]}-{steps[-1]} ({len(steps)}x)"


def title(f: Finding) -> str:
    """The finding's name: its code, then its subject when it has one."""
    return f"{f.code} {f.subject}" if f.subject else f.code


def headline(f: Finding) -> str:
    """One short line for a terminal: severity, name, the measured number (labelled as the
    code registry declares it) with the expected range, and the step(s); no advice. Without a
    number, the message's first sentence, cut at a space before 90 characters.

    Example:
        >>> from lightning_diag.findings import Finding, Severity
        >>> Finding("U", "update_ratio.too_high", Severity.WARN, "Median ratio 1.31 ...",
        ...         value=1.3071, expected=(1e-05, 0.2), step=1).headline()
        '[WARN] update_ratio.too_high: median update ratio 1.307 (expected 1e-05 to 0.2) at step 1'
        >>> Finding("D", "data.summary", Severity.INFO, "Data inspected. 3 splits.").headline()
        '[INFO] data.summary: Data inspected.'
    """
    text = f"[{f.severity.value.upper()}] {title(f)}"
    if f.value is None:
        first = f.message.split(". ")[0].rstrip(".") + "."
        return f"{text}: {first if len(first) <= 90 else first[:88].rsplit(' ', 1)[0] + ' ...'}"
    declared = spec(f.code)
    label = f"{declared.value} " if declared is not None and declared.value else ""
    percent = _percent(f)
    text += f": {label}{number(f.value, percent)}"
    expected = shown_expected(f)
    if isinstance(expected, tuple):
        text += f" (expected {number(expected[0], percent)} to {number(expected[1], percent)})"
    elif expected is not None:
        text += f" (expected {number(expected, percent)})"
    steps = f.steps()
    if steps:
        text += f" at step{'s' if len(steps) > 1 else ''} {step_list(steps)}"
    return text


def line(f: Finding) -> str:
    """The finding in one line with its message and advice: ``[FAIL] code: message Advice: ...``
    (the text of a :class:`~lightning_diag.findings.DiagnosticWarning`)."""
    text = f"[{f.severity.value.upper()}] {title(f)}: {f.message}"
    return f"{text} Advice: {f.advice}" if f.advice else text


class Cells(NamedTuple):
    """A finding as the cells of a findings table (TensorBoard's, the HTML report's)."""

    severity: str
    code: str
    subject: str
    message: str
    advice: str
    value: str
    expected: str
    steps: str


def cells(f: Finding) -> Cells:
    """The cells of ``f`` in a findings table; ``-`` where there is nothing to show.

    Example:
        >>> from lightning_diag.findings import Finding, Severity
        >>> cells(Finding("X", "x.a", Severity.WARN, "m", value=9.123456, expected=(2, 2.5),
        ...               step=0, details={"steps": [0, 10, 20, 30, 40]}))[4:]
        ('-', '9.123', '[2, 2.5]', '0-40 (5x)')
    """
    percent = _percent(f)
    expected = shown_expected(f)
    shown = ("-" if expected is None else
             f"[{number(expected[0], percent)}, {number(expected[1], percent)}]"
             if isinstance(expected, tuple) else number(expected, percent))
    return Cells(f.severity.value.upper(), f.code, f.subject, f.message, f.advice or "-",
                 "-" if f.value is None else number(f.value, percent), shown,
                 step_list(f.steps()) or "-")


def finding_rank(f: Finding) -> tuple[bool, int]:
    """The sort key of :func:`sort_findings` (for listings that pair findings with more)."""
    return (not f.code.startswith(DIAGNOSIS_PREFIX), -f.severity.rank)


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """The order every listing uses (terminal, TensorBoard, report, ``lightning-diag check``):
    the diagnosis first, then FAIL, WARN, INFO; within a severity, in publication order.

    Example:
        >>> from lightning_diag.findings import Finding, Severity
        >>> found = [Finding("A", "a.x", Severity.INFO, "m"), Finding("B", "b.y", Severity.FAIL,
        ...          "m"), Finding("D", "diagnosis.summary", Severity.WARN, "m")]
        >>> [f.code for f in sort_findings(found)]
        ['diagnosis.summary', 'b.y', 'a.x']
    """
    return sorted(findings, key=finding_rank)


def counts(findings: Iterable[Finding]) -> dict[Severity, int]:
    """How many findings of each severity, the diagnosis left out (it sums up the others)."""
    out = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        if not f.code.startswith(DIAGNOSIS_PREFIX):
            out[f.severity] += 1
    return out


def counts_text(findings: Iterable[Finding]) -> str:
    """``"2 fail, 7 warn, 13 info"``, and ``", and the diagnosis"`` when there is one.

    Example:
        >>> from lightning_diag.findings import Finding, Severity
        >>> counts_text([Finding("A", "a.x", Severity.FAIL, "m"),
        ...              Finding("D", "diagnosis.summary", Severity.FAIL, "m")])
        '1 fail, 0 warn, 0 info, and the diagnosis'
    """
    found = list(findings)
    text = ", ".join(f"{n} {s.value}" for s, n in counts(found).items())
    return text + (", and the diagnosis" if any(f.code.startswith(DIAGNOSIS_PREFIX)
                                                 for f in found) else "")


def format_findings(findings: list[Finding], width: int | None = None,
                    min_severity: Severity = Severity.INFO) -> str:
    """The findings as terminal text, worst first, each with its message and advice, wrapped;
    those below ``min_severity`` counted, not listed (the diagnosis is always listed).

    Example:
        >>> from lightning_diag.findings import Finding
        >>> print(format_findings([Finding("X", "x.bad", Severity.WARN, "3 of 4 broken.",
        ...                                advice="Fix them.")], width=40))
        Findings: 0 fail, 1 warn, 0 info
        ========================================
        [WARN] x.bad  (X)
            3 of 4 broken.
            advice: Fix them.
    """
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    head = f"Findings: {counts_text(findings)}"
    lines = [head, "=" * min(width, len(head) + 10)]
    wrap = textwrap.TextWrapper(width=width, initial_indent="    ", subsequent_indent="    ")
    shown = [f for f in sort_findings(findings)
             if f.severity >= min_severity or f.code.startswith(DIAGNOSIS_PREFIX)]
    for f in shown:
        steps = f.steps()
        seen = f", seen at steps {step_list(steps)}" if len(steps) > 1 else ""
        lines.append(f"[{f.severity.value.upper():4}] {title(f)}  ({f.check}{seen})")
        lines += wrap.wrap(f.message)
        if f.advice:
            lines += wrap.wrap(f"advice: {f.advice}")
    hidden = len(findings) - len(shown)
    if hidden:
        lines.append(f"({hidden} below {min_severity.value.upper()} not shown)")
    if not findings:
        lines.append("(none)")
    return "\n".join(lines)

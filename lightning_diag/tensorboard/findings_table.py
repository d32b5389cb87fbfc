"""The run's findings as TensorBoard shows them: one markdown table (Text dashboard) and the
count of problems per severity (scalars, on the first cards TensorBoard opens on).

Each cell is :func:`lightning_diag.presentation.cells`: the same numbers, steps and names as the
terminal, the report and ``lightning-diag check``.

Example:
    >>> from lightning_diag.findings import Finding, Severity
    >>> head, _, *table = findings_table([Finding("X", "x.a", Severity.INFO, "m"), Finding(
    ...     "Y", "y.b", Severity.FAIL, "n", step=2)], step=2).splitlines()
    >>> head.split(". ")[0]
    '**2 findings** (1 fail, 0 warn, 1 info) at step 2'
    >>> for line in table:
    ...     print(line)
    | severity | code | message | advice | value | expected | step |
    |---|---|---|---|---|---|---|
    | FAIL | `y.b` | n | - | - | - | 2 |
    | INFO | `x.a` | m | - | - | - | - |
"""

from __future__ import annotations

import textwrap

from lightning_diag.findings import Finding
from lightning_diag.markdown import markdown_table
from lightning_diag.presentation import cells, counts_text, sort_findings

__all__ = ["TABLE_HEADER", "findings_table", "table_rows", "table_row"]

#: Advice stays the fourth column, where readers of the older four-column table look for it.
TABLE_HEADER = ["severity", "code", "message", "advice", "value", "expected", "step"]


def findings_table(found: list[Finding], step: int) -> str:
    """The markdown of the TensorBoard findings table: a count line, then one row per finding
    in the order of :func:`~lightning_diag.presentation.sort_findings`."""
    head = (f"**{len(found)} finding{'s' * (len(found) != 1)}** ({counts_text(found)}) at step "
            f"{step}. The table on top, of the latest step, is the current one.")
    return f"{head}\n\n{table_rows(found)}"


def table_rows(found: list[Finding]) -> str:
    """The table itself: what :func:`findings_table` writes when it changes."""
    return markdown_table(TABLE_HEADER, [table_row(f) for f in sort_findings(found)])


def table_row(f: Finding) -> list[str]:
    """The cells of one finding in the TensorBoard findings table.

    Example:
        >>> from lightning_diag.findings import Severity
        >>> table_row(Finding("X", "x.a", Severity.WARN, "m", value=0.123456,
        ...                   expected=(0, float("inf")), step=3))
        ['WARN', '`x.a`', 'm', '-', '0.1235', '[0, Infinity]', '3']
    """
    c = cells(f)
    subject = "<br>".join(textwrap.wrap(c.subject.replace(",", ", "), WIDTH)).replace(", ", ",")
    code = f"`{c.code}`" + (f"<br>{subject}" if subject else "")
    return [c.severity, code, _wrapped(c.message), _wrapped(c.advice), c.value, c.expected,
            c.steps]


#: Characters per line of a long cell.
WIDTH = 24


def _wrapped(text: str, width: int = WIDTH) -> str:
    """``text`` in lines of at most ``width`` characters joined by ``<br>``.

    TensorBoard gives a table the card's width, no more: when the cells' lines are longer in
    all than the card is wide, the browser squeezes every column below its words, which it
    then breaks anywhere ("WAR/N", "severi/ty"). Lines this short keep the whole table within
    a card 1100 pixels wide. A `code span` is kept on one line (markdown would show a
    ``<br>`` inside it as text), or loses its backticks when longer than a line; a word longer
    than a line (a path) is cut.

    Example:
        >>> _wrapped("run `lightning-diag tune` first", width=20)
        'run<br>`lightning-diag tune`<br>first'
        >>> _wrapped("saved to /tmp/a/long/path.pt", width=12)
        'saved to<br>/tmp/a/long/<br>path.pt'
    """
    pieces = text.split("`")
    joined = "".join(
        p if i % 2 == 0 else f"`{p.replace(' ', chr(0))}`" if len(p) <= width else p
        for i, p in enumerate(pieces))
    words = [chunk for word in joined.split() for chunk in (
        [word] if "`" in word else [word[k:k + width] for k in range(0, len(word), width)])]
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines).replace("\0", " ") or text

"""The run's findings as TensorBoard shows them: one markdown table (Text dashboard) and a card
on the page TensorBoard opens on (an image in the first group of Time Series: the count of
FAIL, WARN and INFO findings, the diagnosis' likely causes and the codes that failed).

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
    | finding | message | advice | measured |
    |---|---|---|---|
    | **FAIL**<br>`y.b` | n | - | step 2 |
    | INFO<br>`x.a` | m | - | - |
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_diag.codes import DIAGNOSIS_PREFIX, spec
from lightning_diag.findings import Finding, Severity
from lightning_diag.markdown import markdown_table
from lightning_diag.presentation import cells, counts, counts_text, sort_findings, title

if TYPE_CHECKING:
    import numpy as np
    from PIL import ImageFont

__all__ = ["TABLE_HEADER", "FindingsCard", "findings_card", "findings_table", "table_rows",
           "table_row"]

#: The columns: the severity heads the finding's name; the measured value, its expected range
#: and the steps share the last. Four columns fit a window 1280 pixels wide.
TABLE_HEADER = ["finding", "message", "advice", "measured"]


def findings_table(found: list[Finding], step: int) -> str:
    """The markdown of the TensorBoard findings table: a count line, the diagnosis as
    paragraphs (prose reads badly in a narrow cell), then one row per other finding in the
    order of :func:`~lightning_diag.presentation.sort_findings`."""
    head = (f"**{len(found)} finding{'s' * (len(found) != 1)}** ({counts_text(found)}) at step "
            f"{step}. The table on top, of the latest step, is the current one.")
    return f"{head}\n\n{table_rows(found)}"


def table_rows(found: list[Finding]) -> str:
    """The diagnosis and the table: what :func:`findings_table` writes when it changes."""
    ordered = sort_findings(found)
    diagnosis = [f for f in ordered if f.code.startswith(DIAGNOSIS_PREFIX)]
    prose = "".join(
        f"**{f.severity.value.upper()} `{title(f)}`**: {_escaped(f.message)}\n\n"
        + (f"**Advice**: {_escaped(f.advice)}\n\n" if f.advice else "") for f in diagnosis)
    return prose + markdown_table(TABLE_HEADER, [table_row(f) for f in ordered
                                                 if f not in diagnosis])


def table_row(f: Finding) -> list[str]:
    """The cells of one finding in the TensorBoard findings table: its severity (FAIL in bold)
    above its code and subject; the measured value with what it measures (as the code registry
    declares it), its expected range and the steps seen, in one cell.

    Example:
        >>> from lightning_diag.findings import Severity
        >>> table_row(Finding("X", "x.a", Severity.WARN, "m", value=0.123456, expected=(0, 0.1),
        ...                   step=3, subject="net.1"))
        ['WARN<br>`x.a`<br>net.1', 'm', '-', '0.1235<br>expected [0, 0.1]<br>step 3']
        >>> table_row(Finding("G", "gradients.vanishing", Severity.FAIL, "m", value=0.0))[-1]
        'gradient RMS ratio<br>first/last layer: 0'
    """
    c = cells(f)
    subject = "<br>".join(textwrap.wrap(c.subject.replace(",", ", "), WIDTH)).replace(", ", ",")
    code = f"`{c.code}`" + (f"<br>{subject}" if subject else "")
    declared = spec(f.code)
    measured = []
    if c.value != "-":
        label = declared.value if declared is not None else ""
        measured.append(_wrapped(f"{label}: {c.value}" if label else c.value, MEASURED))
    if c.expected != "-":  # the range kept whole
        measured.append(f"expected{' ' if len(c.expected) + 9 <= MEASURED else '<br>'}"
                        f"{c.expected}")
    if c.steps != "-":
        measured.append(f"step{'s' * (len(f.steps()) > 1)} {c.steps}")
    severity = f"**{c.severity}**" if f.severity is Severity.FAIL else c.severity
    return [f"{severity}<br>{code}", _wrapped(c.message), _wrapped(c.advice),
            "<br>".join(measured) or "-"]


def _escaped(text: str) -> str:
    """``text`` on one markdown line (no table, no line breaks of its own)."""
    return " ".join(text.split())


#: Characters per line of a long cell, and of the measured one.
WIDTH, MEASURED = 24, 20


def _wrapped(text: str, width: int = WIDTH) -> str:
    """``text`` in lines of at most ``width`` characters joined by ``<br>``.

    TensorBoard gives a table the card's width, no more: when the cells' lines are longer in
    all than the card is wide, the browser squeezes every column below its words, which it
    then breaks anywhere ("WAR/N", "severi/ty"). Lines this short keep the four columns within
    the Text dashboard's card in a window 1280 pixels wide (a card about 840 pixels wide,
    measured in Chromium against TensorBoard 2.21). A `code span` is kept on one line
    (markdown would show a ``<br>`` inside it as text), or loses its backticks when longer
    than a line; a word longer than a line (a path) is cut.

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


# -- the card on the first screen -------------------------------------------------------------
#: Colours of the card's text per severity (and of the "nothing to fix" line).
_COLOURS = {Severity.FAIL: (200, 30, 30), Severity.WARN: (170, 95, 0),
            Severity.INFO: (110, 110, 110)}
_INK, _GREY, _GREEN = (25, 25, 25), (110, 110, 110), (20, 120, 50)
#: The card in CSS pixels (rendered at twice that): as wide as the Images dashboard's card,
#: about as high as Time Series' image box (215 pixels) once scaled to its width.
CARD_SIZE = (345, 190)
_SCALE, _MARGIN, _LINE = 2, 8, 16

#: text, colour (None: blank, an indent as wide as the text), size in CSS pixels, bold
Span = tuple[str, "tuple[int, int, int] | None", int, bool]


@dataclass(frozen=True)
class FindingsCard:
    """What the card says: lines of coloured spans, and the counts it was made from.

    ``text`` is the card as plain text: two cards with the same text are the same card (the
    run record writes one only when it changes).
    """

    counts: dict[Severity, int]
    lines: tuple[tuple[Span, ...], ...]

    @property
    def text(self) -> str:
        return "\n".join("".join(span[0] for span in line if span[1]) for line in self.lines)

    @property
    def metadata(self) -> dict[str, str]:
        """What the PNG's text chunks hold, for programs: the counts (``fail=2 warn=7
        info=14``) and the card's text."""
        return {"counts": " ".join(f"{s.value}={n}" for s, n in self.counts.items()),
                "text": self.text}

    def image(self) -> np.ndarray:
        """The card as an ``(H, W, 3)`` uint8 image, :data:`CARD_SIZE` at twice the pixels."""
        import numpy as np
        from PIL import Image, ImageDraw

        from lightning_diag.tensorboard.grids import font

        width, height = (_SCALE * n for n in CARD_SIZE)
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        y = _SCALE * _MARGIN
        for line in self.lines:
            x = _SCALE * _MARGIN
            size = max(span[2] for span in line)
            for text, colour, px, bold in line:
                face = font(_SCALE * px, bold)
                if colour is not None:
                    draw.text((x, y + _SCALE * (size - px)), text, fill=colour, font=face)
                x += round(face.getlength(text))
            y += _SCALE * round(size * 1.3)
        return np.asarray(canvas)


def findings_card(found: list[Finding], final: bool = False) -> FindingsCard:
    """The card that says, on the page TensorBoard opens on, whether anything failed.

    The counts per severity (the diagnosis left out: it sums up the others), big and
    coloured; the diagnosis' likely causes in the order to fix them; then the FAIL and WARN
    findings by name, as many as the card holds (the table on the Text dashboard has them
    all). ``final``: the fit is over.

    Example:
        >>> card = findings_card([Finding("Y", "y.b", Severity.FAIL, "n")], final=True)
        >>> print(card.text)
        1 FAIL  ·  0 WARN  ·  0 INFO
        end of fit · every finding: Text tab, 0_findings/table
        FAIL  y.b
        >>> card.metadata["counts"], card.image().shape
        ('fail=1 warn=0 info=0', (380, 690, 3))
    """
    from lightning_diag.tensorboard.grids import font

    n = counts(found)
    head: list[Span] = []
    for severity, k in n.items():
        if head:
            head.append(("  \u00b7  ", _GREY, 20, True))
        head.append((f"{k} {severity.value.upper()}", _COLOURS[severity] if k else _GREY, 20,
                     True))
    when = "end of fit" if final else "so far"
    lines: list[tuple[Span, ...]] = [
        tuple(head), ((f"{when} \u00b7 every finding: Text tab, 0_findings/table", _GREY, 11,
                       False),)]
    room = (CARD_SIZE[1] - 2 * _MARGIN - 26 - 15) // _LINE  # lines left under the head
    width = CARD_SIZE[0] - 2 * _MARGIN
    body: list[tuple[tuple[Span, ...], int]] = []  # each line, and how many findings it names
    causes = [c for f in found if f.code.startswith(DIAGNOSIS_PREFIX)
              for c in f.details.get("causes", []) if isinstance(c, dict) and "title" in c]
    if causes:
        body.append(((("likely causes, in the order to fix them:", _INK, 12, True),), 0))
        for i, cause in enumerate(causes, 1):
            colour = _COLOURS.get(Severity(cause.get("severity", "warn")), _INK)
            body.append((((_fit(f"{i}. {cause['title']}", font(12), width), colour, 12,
                           False),), 0))
    for severity in (Severity.FAIL, Severity.WARN):
        names = [title(f) for f in sort_findings(found)
                 if f.severity is severity and not f.code.startswith(DIAGNOSIS_PREFIX)]
        body += _listing(severity, names, font(12), width)
    if not n[Severity.FAIL] and not n[Severity.WARN]:
        body.append(((("nothing to fix: no FAIL or WARN finding", _GREEN, 12, True),), 0))
    if len(body) > room:
        left = sum(k for _, k in body[room - 1:])
        body = [*body[:room - 1], (((f"+ {left} more in the table (Text tab)", _GREY, 12,
                                      False),), 0)]
    return FindingsCard(n, tuple(lines + [line for line, _ in body]))


def _listing(severity: Severity, names: list[str], face: ImageFont.FreeTypeFont,
             width: int) -> list[tuple[tuple[Span, ...], int]]:
    """``FAIL  a.b, c.d, ...`` wrapped to ``width`` pixels, the label on the first line only,
    each line with the number of names it holds."""
    label = f"{severity.value.upper()}  "
    indent = face.getlength(label)
    out: list[tuple[tuple[Span, ...], int]] = []
    line: list[str] = []
    for name in [*names, ""]:  # "": the end
        if line and (not name or indent + face.getlength(", ".join([*line, name])) > width):
            text = ", ".join(line) + ("," if name else "")
            out.append((((label, _COLOURS[severity] if not out else None, 12, True),
                         (_fit(text, face, width - indent), _INK, 12, False)), len(line)))
            line = []
        if name:
            line.append(name)
    return out


def _fit(text: str, face: ImageFont.FreeTypeFont, width: float) -> str:
    """``text`` cut to ``width`` pixels, with an ellipsis when cut."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "\u2026") > width:
        text = text[:-1]
    return text.rstrip() + "\u2026"

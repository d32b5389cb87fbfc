"""Markdown as TensorBoard's text plugin, terminals and the generated doc tables show it.

Example:
    >>> print(markdown_table(["lr", "loss"], [["1e-3", "0.5"]]))
    | lr | loss |
    |---|---|
    | 1e-3 | 0.5 |
"""

from __future__ import annotations

__all__ = ["markdown_table", "replace_between"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; pipes escaped, newlines turned into spaces."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def replace_between(doc: str, begin: str, end: str, text: str) -> str:
    """``doc`` with what lies between the marker lines ``begin`` and ``end`` replaced by
    ``text`` (a generated table in a doc page).

    Raises:
        ValueError: the markers are missing.

    Example:
        >>> print(replace_between("a\\n<b>\\nold\\n<e>\\nz", "<b>", "<e>", "new"))
        a
        <b>
        <BLANKLINE>
        new
        <BLANKLINE>
        <e>
        z
    """
    start, stop = doc.find(begin), doc.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"The table markers are missing; put these two lines where the table "
                         f"goes:\n{begin}\n{end}")
    return f"{doc[:start]}{begin}\n\n{text}\n\n{doc[stop:]}"

"""How much a finding matters: :class:`Severity`, ordered ``INFO < WARN < FAIL``.

Its own module, below the code registry and the presentation that both need it
(:mod:`lightning_diag.findings` re-exports it: import it from there).

Example:
    >>> from lightning_diag.findings import Severity
    >>> Severity.WARN < Severity.FAIL, str(Severity.INFO)
    (True, 'info')
"""

from __future__ import annotations

import enum

__all__ = ["Severity"]

_ORDER = {"info": 0, "warn": 1, "fail": 2}


class Severity(str, enum.Enum):
    """How much a finding matters, ordered ``INFO < WARN < FAIL``."""

    INFO = "info"
    WARN = "warn"
    FAIL = "fail"

    @property
    def rank(self) -> int:
        return _ORDER[self.value]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank >= other.rank

    def __str__(self) -> str:
        return self.value

"""The one result type every diagnostic produces.

Example:
    >>> from lightning_diag.findings import Finding, Severity
    >>> f = Finding(check="InitialLossCheck", code="initial_loss.mismatch",
    ...             severity=Severity.FAIL, message="Initial loss 9.1 is outside [2.07, 2.53].",
    ...             advice="Scale down the last layer.")
    >>> f.severity >= Severity.WARN
    True
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DiagnosticError", "DiagnosticWarning", "Finding", "Severity"]

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


@dataclass(frozen=True)
class Finding:
    """One diagnostic result.

    Attributes:
        check: Name of the callback (or function) that produced it, e.g. ``"GradientCheck"``.
        code: Stable dotted identifier, e.g. ``"gradient_check.mismatch"``; a public contract.
        severity: ``Severity.INFO``, ``WARN`` or ``FAIL``.
        message: One sentence with the measured value and the expected range.
        advice: What the recipe says to do about it (may be empty for info findings).
        value: The measured number, when there is one.
        expected: The expected value or ``(low, high)`` range, when there is one.
        step: Global step at which it was found, when known.
        epoch: Epoch at which it was found, when known.
        indices: Dataset indices the finding is about; empty when not about samples.
        details: Extra structured data (per-tensor tables, curves); not part of the contract.
    """

    check: str
    code: str
    severity: Severity
    message: str
    advice: str = ""
    value: float | None = None
    expected: float | tuple[float, float] | None = None
    step: int | None = None
    epoch: int | None = None
    indices: tuple[int, ...] = ()
    details: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.severity, Severity):
            object.__setattr__(self, "severity", Severity(self.severity))
        if not isinstance(self.indices, tuple):
            object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))

    def format(self) -> str:
        """A one-line human-readable rendering: ``[FAIL] code: message Advice: ...``."""
        text = f"[{self.severity.value.upper()}] {self.code}: {self.message}"
        return f"{text} Advice: {self.advice}" if self.advice else text

    def to_markdown_row(self) -> str:
        """The finding as a row of the markdown table logged to TensorBoard."""
        cells = [self.severity.value.upper(), f"`{self.code}`", self.message, self.advice or "-"]
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


class DiagnosticError(RuntimeError):
    """Raised by a ``strict=True`` diagnostic when it finds a FAIL, before compute is wasted.

    Attributes:
        findings: The FAIL findings that stopped the run.
    """

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        lines = "\n".join(f"  {f.format()}" for f in self.findings)
        super().__init__(f"{len(self.findings)} diagnostic failure(s):\n{lines}")


class DiagnosticWarning(UserWarning):
    """Category of the warnings lightning_diag emits for WARN and FAIL findings."""

"""What a monitor's rule concludes, before a callback stamps it with its name, step and epoch.

The monitors' rules (:mod:`.activations`, :mod:`.update_ratio`, :mod:`.advisor`,
:mod:`.curves`) are pure functions of the statistics a callback measured: each returns
:class:`Verdict` records, so that it can be checked without a Trainer, and the callback turns
each into one :class:`~lightning_diag.findings.Finding` (``MonitorCallback.publish_verdicts``).

Example:
    >>> v = Verdict("update_ratio.too_low", "Median update ratio 1e-07.", 1e-07, (1e-05, 0.2))
    >>> v.severity.value, v.advice, v.subject
    ('warn', '', '')
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lightning_diag.findings import Severity

__all__ = ["Verdict"]


class Verdict(NamedTuple):
    """A finding's code, message, measured value, expected range, details, advice, subject
    (the layer or metric it is about: one finding per subject) and severity."""

    code: str
    message: str
    value: float | None
    expected: tuple[float, float] | None
    details: dict[str, Any] | None = None
    advice: str = ""
    subject: str = ""
    severity: Severity = Severity.WARN

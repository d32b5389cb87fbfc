"""The terminal lines of the findings: one short line each on the ``lightning_diag`` logger, and
a :class:`~lightning_diag.findings.DiagnosticWarning` for WARN and FAIL when a warnings filter
asks for it (see ``docs/api.md``).

Nobody configured logging (no handler on the root logger or on ``lightning_diag``): the
``lightning_diag`` logger prints WARNING and above itself, through ``tqdm.write`` so that a
progress bar stays whole, as Python's last-resort handler would without it. Once logging is
configured, your handlers decide.

Example:
    >>> from lightning_diag.findings import Finding, Severity
    >>> say([Finding("X", "x.ok", Severity.INFO, "Fine.")])  # INFO: below the default level
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable

from lightning.pytorch.utilities import rank_zero_warn
from tqdm import tqdm

from lightning_diag.findings import DiagnosticWarning, Finding, Severity

__all__ = ["log", "say"]

log = logging.getLogger("lightning_diag")

_LOG_LEVEL = {
    Severity.INFO: logging.INFO, Severity.WARN: logging.WARNING, Severity.FAIL: logging.ERROR
}


class _TerminalHandler(logging.Handler):
    """Python's last-resort output for the ``lightning_diag`` logger (WARNING and above, the bare
    message, on stderr), written with ``tqdm.write`` so that a running progress bar is redrawn
    below the line instead of being cut by it. Silent as soon as another handler would handle
    the record: configured logging decides alone.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if _handled_elsewhere(record, self):
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # what logging's own handlers do: report, never raise into the run
            self.handleError(record)


def _handled_elsewhere(record: logging.LogRecord, mine: logging.Handler) -> bool:
    """Whether a handler other than ``mine`` on the record's logger chain takes ``record``."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not mine and record.levelno >= h.level for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def _warning_wanted(message: str) -> bool:
    """Whether a warnings filter covers a :class:`DiagnosticWarning` with ``message``: without
    one it is not issued (the logger's line is the default output); with one, it decides."""
    return any(issubclass(DiagnosticWarning, category) and (text is None or text.match(message))
               for _, text, category, *_ in warnings.filters)


if not any(isinstance(h, _TerminalHandler) for h in log.handlers):  # once, even on reload
    log.addHandler(_TerminalHandler())


def say(findings: Iterable[Finding]) -> None:
    """Each finding's :meth:`~lightning_diag.findings.Finding.headline` on the logger at its
    level, and a :class:`DiagnosticWarning` for WARN and FAIL where a filter wants one."""
    for f in findings:
        log.log(_LOG_LEVEL[f.severity], f.headline())
        if f.severity >= Severity.WARN and _warning_wanted(f.format()):
            rank_zero_warn(f.format(), category=DiagnosticWarning)

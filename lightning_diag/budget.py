"""A byte budget for the files lightning_diag writes in one run: ``findings.jsonl`` and what it
writes to TensorBoard (as far as it can count it: the events of its own writers' helpers, its
findings table and counts; not the texts a few callbacks write once at fit start).

Past the budget the library stops writing and one finding, ``record.byte_budget``, says so;
the training goes on, and Lightning's own logging keeps the room it needs. The budget of a run
is the smaller of :data:`DEFAULT_MAX_BYTES` (or the ``LIGHTNING_DIAG_MAX_BYTES`` environment
variable, or ``RunRecord.of(trainer).max_bytes``; ``0`` for no budget) and half the disk space
free in the run's log directory when the budget is made.

Example:
    >>> budget = ByteBudget(limit=100)
    >>> budget.charge(60), budget.charge(60), budget.exceeded, budget.spent
    (True, False, True, 60)
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MAX_BYTES", "ENV_VAR", "ByteBudget", "budget_of", "max_bytes_setting",
           "run_limit"]

#: The default budget: 2 GiB. A run at the defaults writes kilobytes to a few megabytes;
#: histograms of 200 layers at every step, ~0.5 MB a step.
DEFAULT_MAX_BYTES = 2 * 1024**3
ENV_VAR = "LIGHTNING_DIAG_MAX_BYTES"
_ATTRIBUTE = "_lightning_diag_budget"


class ByteBudget:
    """Bytes a run's writers may still write; thread-safe (events are written off the training
    thread too).

    Attributes:
        limit: The budget in bytes; None: no limit.
        spent: Bytes charged so far.
        exceeded: A charge was refused: nothing more is written.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.spent = 0
        self.exceeded = False
        self._lock = threading.Lock()

    def charge(self, nbytes: int) -> bool:
        """Count ``nbytes`` about to be written; False (and nothing counted) past the budget."""
        with self._lock:
            if self.exceeded:
                return False
            if self.limit is not None and self.spent + nbytes > self.limit:
                self.exceeded = True
                return False
            self.spent += nbytes
            return True


def max_bytes_setting() -> int | None:
    """The budget asked for by ``LIGHTNING_DIAG_MAX_BYTES`` (``0``: none), else the default.

    Raises:
        ValueError: the variable is not a whole number of bytes.
    """
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    if not raw.isdigit():
        raise ValueError(f"`{ENV_VAR}` must be a whole number of bytes (0: no budget), got "
                         f"{raw!r}.")
    return int(raw) or None


def run_limit(max_bytes: int | None, directory: Path | None) -> int | None:
    """``max_bytes``, at most half the disk space free in ``directory`` (its nearest existing
    parent) now: the library never takes the last of a disk."""
    if directory is None:
        return max_bytes
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is None:
        return max_bytes
    try:
        half_free = shutil.disk_usage(existing).free // 2
    except OSError:  # no way to tell: the configured budget alone
        return max_bytes
    return half_free if max_bytes is None else min(max_bytes, half_free)


def budget_of(writer: Any) -> ByteBudget:
    """The budget of the run a TensorBoard ``SummaryWriter`` writes: the one the run's record
    set (``RunRecord``), else one made now from :func:`max_bytes_setting`."""
    found: ByteBudget | None = writer.__dict__.get(_ATTRIBUTE)
    if found is None:
        limit = run_limit(max_bytes_setting(), Path(writer.get_logdir()))
        found = writer.__dict__[_ATTRIBUTE] = ByteBudget(limit)
    return found

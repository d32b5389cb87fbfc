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

import dataclasses
import enum
import json
import math
import os
import re
import shutil
import textwrap
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DIAGNOSIS_PREFIX",
    "FINDINGS_FILE",
    "FORMAT_VERSION",
    "DiagnosticError",
    "DiagnosticWarning",
    "Finding",
    "Severity",
    "append_findings",
    "finding_rank",
    "format_findings",
    "sort_findings",
    "load_findings",
    "load_findings_by_run",
    "updated",
]

#: Name of the JSON Lines file, one finding per line, that each run writes in its log directory.
FINDINGS_FILE = "findings.jsonl"
#: Version of the record :meth:`Finding.to_dict` writes; bumped when a field changes meaning.
FORMAT_VERSION = 1
#: Strict JSON has no non-finite numbers; they are written as these strings (which JavaScript's
#: ``Number()`` and Python's ``float()`` both parse) and read back as floats.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FIELDS = ("check", "code", "severity", "message", "advice", "value", "expected", "step",
           "epoch", "indices", "details", "subject")

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
            A finding seen again at later steps (:func:`updated`) keeps every step in
            ``details["steps"]``.
        subject: What the finding is about when one check reports the same code for several
            things (a layer, a data split, a set of metric names); empty otherwise. ``check``,
            ``code`` and ``subject`` name one fact (:attr:`key`).
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
    subject: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.severity, Severity):
            object.__setattr__(self, "severity", Severity(self.severity))
        if not isinstance(self.indices, tuple):
            object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))

    def format(self) -> str:
        """A one-line human-readable rendering: ``[FAIL] code: message Advice: ...``."""
        text = f"[{self.severity.value.upper()}] {self.code}: {self.message}"
        return f"{text} Advice: {self.advice}" if self.advice else text

    @property
    def key(self) -> tuple[str, str, str]:
        """The fact this finding states: ``(check, code, subject)``; one finding per key."""
        return self.check, self.code, self.subject

    def steps(self) -> list[int]:
        """Every step this fact was seen at (one finding updated, see :func:`updated`)."""
        seen = self.details.get("steps")
        if isinstance(seen, list) and seen:
            return [int(s) for s in seen]
        return [] if self.step is None else [self.step]

    def headline(self) -> str:
        """One short line for a terminal: severity, code, subject, the measured number with the
        expected range, and the step(s); no advice. Without a number, the message's first
        sentence, cut at a space before 90 characters.

        Example:
            >>> Finding("U", "update_ratio.too_high", Severity.WARN, "Median ratio 1.31 ...",
            ...         value=1.3071, expected=(1e-05, 0.2), step=1).headline()
            '[WARN] update_ratio.too_high: 1.31 (expected 1e-05 to 0.2) at step 1'
            >>> Finding("D", "data.summary", Severity.INFO, "Data inspected. 3 splits.").headline()
            '[INFO] data.summary: Data inspected.'
        """
        text = f"[{self.severity.value.upper()}] {self.code}"
        if self.subject:
            text += f" {self.subject}"
        if self.value is None:
            first = self.message.split(". ")[0].rstrip(".") + "."
            return f"{text}: {first if len(first) <= 90 else first[:88].rsplit(' ', 1)[0] + ' ...'}"
        text += f": {_short(self.value)}"
        if isinstance(self.expected, tuple):
            text += f" (expected {_short(self.expected[0])} to {_short(self.expected[1])})"
        elif self.expected is not None:
            text += f" (expected {_short(self.expected)})"
        steps = self.steps()
        if steps:
            text += f" at step{'s' if len(steps) > 1 else ''} {_step_list(steps)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The finding as a record strict JSON can hold: one line of ``findings.jsonl``.

        Tensors and numpy values become numbers or lists, dataclasses (e.g. the per-tensor rows
        of ``details["table"]``) become dicts, tuples become lists, enums their value, and
        anything else JSON cannot hold its ``repr``: it never raises. Strict JSON has no NaN or
        infinity, so non-finite floats are written as the strings ``"NaN"``, ``"Infinity"`` and
        ``"-Infinity"``; :meth:`from_dict` reads them back as floats (in ``details`` too, so a
        ``details`` string spelled exactly like one of them also comes back as a float).

        Example:
            >>> f = Finding("X", "x.bad", Severity.WARN, "loss 2.5", value=2.5, expected=(0, 1),
            ...             details={"loss": float("nan")})
            >>> d = f.to_dict()
            >>> d["version"], d["severity"], d["expected"], d["details"]
            (1, 'warn', [0, 1], {'loss': 'NaN'})
            >>> Finding.from_dict(d) == f
            True
        """
        record: dict[str, Any] = {"version": FORMAT_VERSION}
        for name in _FIELDS:
            record[name] = _jsonable(getattr(self, name))
        record["severity"] = self.severity.value
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Finding:
        """The finding a :meth:`to_dict` record describes; keys it does not know are ignored.

        ``expected`` comes back as a number or a ``(low, high)`` tuple, ``indices`` as a tuple,
        and the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` as floats. ``details``
        comes back as plain JSON data (dicts, lists, numbers, strings), not as the objects that
        were written.

        Raises:
            ValueError: ``record`` is not a finding record (a field is missing or has the wrong
                type), or it was written by a newer format version than this one reads.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"a finding record is a JSON object, got {type(record).__name__}")
        version = record.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"finding record version {version!r} is not one this lightning_diag "
                             f"reads (<= {FORMAT_VERSION}); upgrade lightning_diag")
        try:
            expected = record.get("expected")
            details = record.get("details", {})
            if not isinstance(details, Mapping):
                raise TypeError(f"`details` is a {type(details).__name__}, not an object")
            return cls(
                check=_text(record["check"]),
                code=_text(record["code"]),
                severity=Severity(record["severity"]),
                message=_text(record["message"]),
                advice=_text(record.get("advice", "")),
                value=_optional_number(record.get("value")),
                expected=(_pair(expected) if isinstance(expected, list)
                          else _optional_number(expected)),
                step=_optional_int(record.get("step")),
                epoch=_optional_int(record.get("epoch")),
                indices=tuple(_integer(i) for i in record.get("indices", ())),
                details=_from_jsonable(dict(details)),
                subject=_text(record.get("subject", "")),
            )
        except KeyError as err:
            raise ValueError(f"finding record lacks the field {err.args[0]!r}") from err
        except TypeError as err:
            raise ValueError(f"malformed finding record: {err}") from err


def _short(x: float) -> str:
    return f"{x:.3g}"


def _step_list(steps: list[int], most: int = 6) -> str:
    """``steps`` joined, the middle ones elided past ``most``.

    Example:
        >>> _step_list([1, 3]), _step_list(list(range(0, 100, 10)))
        ('1, 3', '0, 10, 20, ..., 80, 90 (10 steps)')
    """
    if len(steps) <= most:
        return ", ".join(map(str, steps))
    head, tail = steps[: most // 2], steps[-(most // 2 - 1):]
    return f"{', '.join(map(str, head))}, ..., {', '.join(map(str, tail))} ({len(steps)} steps)"


def _jsonable(obj: Any, active: frozenset[int] = frozenset()) -> Any:
    """``obj`` as strict-JSON data (see :meth:`Finding.to_dict`); ``active`` guards cycles."""
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value, active)
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else _spelled(obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return _jsonable(obj.tolist(), active)
    if isinstance(obj, torch.Tensor):
        try:
            return _jsonable(obj.detach().cpu().tolist(), active)
        except (RuntimeError, NotImplementedError):  # e.g. a meta tensor has no values to copy
            return _safe_repr(obj)
    if isinstance(obj, os.PathLike):
        return _jsonable(os.fspath(obj), active)
    is_dataclass = dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    if not (is_dataclass or isinstance(obj, (Mapping, list, tuple, set, frozenset))):
        return _safe_repr(obj)
    if id(obj) in active:
        return "..."
    inner = active | {id(obj)}
    if is_dataclass:
        return {f.name: _jsonable(getattr(obj, f.name), inner) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {_key(k): _jsonable(v, inner) for k, v in obj.items()}
    return [_jsonable(v, inner) for v in obj]


def _spelled(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _key(key: Any) -> str:
    value = key.value if isinstance(key, enum.Enum) else key
    return value if isinstance(value, str) else str(value)


def _safe_repr(obj: Any) -> str:
    try:
        return repr(obj)
    # A user object's __repr__ may raise anything, and the record must still be written.
    except Exception:
        return f"<{type(obj).__name__} object>"


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def _text(x: Any) -> str:
    if not isinstance(x, str):
        raise TypeError(f"expected a string, got {x!r}")
    return x


def _number(x: Any) -> float:
    if isinstance(x, str) and x in _NON_FINITE:
        return _NON_FINITE[x]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"expected a number, got {x!r}")
    return x


def _optional_number(x: Any) -> float | None:
    return None if x is None else _number(x)


def _pair(x: list[Any]) -> tuple[float, float]:
    if len(x) != 2:
        raise TypeError(f"`expected` is a number or a (low, high) pair, got {x!r}")
    return _number(x[0]), _number(x[1])


def _integer(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected an integer, got {x!r}")
    return x


def _optional_int(x: Any) -> int | None:
    return None if x is None else _integer(x)


def append_findings(path: str | Path, findings: Iterable[Finding]) -> None:
    """Append ``findings`` to the JSON Lines file ``path``, one :meth:`Finding.to_dict` a line.

    The lines are strict JSON and ASCII, written in one call and closed (flushed) before this
    returns, so a run that crashes afterwards keeps them.

    Raises:
        OSError: The file or its folder cannot be written; the caller decides whether it matters.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / FINDINGS_FILE
        >>> append_findings(path, [Finding("X", "x.ok", Severity.INFO, "fine", value=1.0)])
        >>> path.read_text().count("\\n"), '"code": "x.ok"' in path.read_text()
        (1, True)
    """
    lines = "".join(json.dumps(f.to_dict(), allow_nan=False) + "\n" for f in findings)
    if not lines:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as fh:
        fh.write(lines)


def updated(old: Finding, new: Finding) -> Finding:
    """One fact (same :attr:`Finding.key`) seen again: the worse of ``old`` and ``new`` (the
    higher severity, then the value farther outside the expected range; ``new`` when neither
    says), with the steps of both in ``details["steps"]``.

    Example:
        >>> first = Finding("U", "u.high", Severity.WARN, "ratio 1.31", value=1.31,
        ...                 expected=(0.0, 0.2), step=1)
        >>> later = Finding("U", "u.high", Severity.WARN, "ratio 0.30", value=0.30,
        ...                 expected=(0.0, 0.2), step=3)
        >>> both = updated(first, later)
        >>> both.message, both.step, both.steps()
        ('ratio 1.31', 1, [1, 3])
    """
    worst = old if _worse(old, new) else new
    steps = sorted(set(old.steps()) | set(new.steps()))
    return dataclasses.replace(worst, details={**worst.details, "steps": steps})


def _worse(a: Finding, b: Finding) -> bool:
    """Whether ``a`` is strictly worse than ``b`` (two readings of one fact)."""
    if a.severity != b.severity:
        return a.severity > b.severity
    bad_a, bad_b = _excess(a), _excess(b)
    return bad_a is not None and bad_b is not None and bad_a > bad_b


def _excess(f: Finding) -> float | None:
    """How far ``f.value`` lies outside ``f.expected``; None when there is nothing to compare."""
    if f.value is None or f.expected is None:
        return None
    if math.isnan(f.value):
        return math.inf
    if isinstance(f.expected, tuple):
        low, high = f.expected
        return max(f.value - high, low - f.value)
    return abs(f.value - f.expected)


def load_findings_by_run(logdir: str | Path) -> dict[str, list[Finding]]:
    """The findings of every run under ``logdir``, keyed by run folder, in the order written.

    Every ``findings.jsonl`` under ``logdir`` (``logdir`` itself included) is one run, keyed by
    its folder relative to ``logdir`` (e.g. ``"tb/version_0"``), or by the folder's own name when
    the file sits directly in ``logdir``. Runs are in natural order (``version_2`` before
    ``version_10``). A line that is not a finding record (e.g. the last line of a run killed
    mid-write) is skipped with a warning naming the file and line. A fact seen again is appended
    again, updated (:func:`updated`): the latest record of each :attr:`Finding.key` is kept, in
    the place of the first (records written without a ``subject`` field, by older versions, are
    all kept).

    Raises:
        FileNotFoundError: ``logdir`` does not exist or is not a directory.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> append_findings(root / "tb" / "version_0" / FINDINGS_FILE,
        ...                 [Finding("X", "x.bad", Severity.WARN, "bad")])
        >>> {run: [f.code for f in found] for run, found in load_findings_by_run(root).items()}
        {'tb/version_0': ['x.bad']}
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"log directory {str(root)!r} does not exist or is not a directory")
    runs: dict[str, list[Finding]] = {}
    files = (p for p in root.rglob(FINDINGS_FILE) if p.is_file())
    for path in sorted(files, key=lambda p: _natural(p.relative_to(root).as_posix())):
        folder = path.parent.relative_to(root).as_posix()
        run = (root.resolve().name or str(root)) if folder == "." else folder
        runs[run] = _read_findings_file(path)
    return runs


def load_findings(logdir: str | Path) -> list[Finding]:
    """The findings of every run under ``logdir``, run after run (see :func:`load_findings_by_run`).

    Raises:
        FileNotFoundError: ``logdir`` does not exist or is not a directory.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> append_findings(root / FINDINGS_FILE, [Finding("X", "x.nan", Severity.FAIL, "NaN loss",
        ...                                                value=float("nan"), step=7)])
        >>> (found,) = load_findings(root)
        >>> found.code, found.value, found.step
        ('x.nan', nan, 7)
    """
    return [f for found in load_findings_by_run(logdir).values() for f in found]


def _natural(text: str) -> list[Any]:
    # re.split with a group alternates text and digits, so ints only meet ints when compared.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _read_findings_file(path: Path) -> list[Finding]:
    found: list[Finding] = []
    place: dict[tuple[str, str, str], int] = {}  # where each fact's first record sits
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                finding = Finding.from_dict(record)
            except ValueError as err:  # bad JSON, bad UTF-8 or not a finding record
                warnings.warn(f"{path}:{lineno}: skipped a line that is not a finding record "
                              f"({err}).", stacklevel=3)
                continue
            if "subject" in record and finding.key in place:  # an update of that fact
                found[place[finding.key]] = finding
                continue
            if "subject" in record:
                place[finding.key] = len(found)
            found.append(finding)
    return found


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
    """Category of the warnings lightning_diag emits for WARN and FAIL findings.

    Silent by default, like ``DeprecationWarning``: the terminal already gets one short line per
    finding from the ``lightning_diag`` logger. It is issued only when a warnings filter covers
    it (its category or a parent's: ``warnings.simplefilter("error", DiagnosticWarning)``,
    ``-W default`` or ``-W error::UserWarning``, pytest's ``filterwarnings =
    ["error::lightning_diag.DiagnosticWarning"]`` or ``pytest.warns``), and that filter decides
    what happens to it: ``error`` makes a finding fatal, ``default`` shows it. The text is
    :meth:`Finding.format`.
    """


#: Codes under this prefix are the combined diagnosis of a run: it heads every listing.
DIAGNOSIS_PREFIX = "diagnosis."


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """The order every listing uses (terminal, TensorBoard, report, ``lightning-diag check``):
    the diagnosis first, then FAIL, WARN, INFO; within a severity, in publication order.

    Example:
        >>> found = [Finding("A", "a.x", Severity.INFO, "m"), Finding("B", "b.y", Severity.FAIL,
        ...          "m"), Finding("D", "diagnosis.summary", Severity.WARN, "m")]
        >>> [f.code for f in sort_findings(found)]
        ['diagnosis.summary', 'b.y', 'a.x']
    """
    return sorted(findings, key=finding_rank)


def finding_rank(f: Finding) -> tuple[bool, int]:
    """The sort key of :func:`sort_findings` (for listings that pair findings with more)."""
    return (not f.code.startswith(DIAGNOSIS_PREFIX), -f.severity.rank)


def format_findings(findings: list[Finding], width: int | None = None) -> str:
    """The findings as terminal text, FAIL first, each with its message and advice, wrapped.

    Example:
        >>> print(format_findings([Finding("X", "x.bad", Severity.WARN, "3 of 4 broken.",
        ...                                advice="Fix them.")], width=40))
        Findings: 0 fail, 1 warn, 0 info
        ========================================
        [WARN] x.bad  (X)
            3 of 4 broken.
            advice: Fix them.
    """
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    counts = {s: sum(f.severity is s for f in findings) for s in Severity}
    head = (f"Findings: {counts[Severity.FAIL]} fail, {counts[Severity.WARN]} warn, "
            f"{counts[Severity.INFO]} info")
    lines = [head, "=" * min(width, len(head) + 10)]
    wrap = textwrap.TextWrapper(width=width, initial_indent="    ", subsequent_indent="    ")
    for f in sort_findings(findings):
        steps = f.steps()
        seen = f", seen at steps {_step_list(steps)}" if len(steps) > 1 else ""
        lines.append(f"[{f.severity.value.upper():4}] {f.code}  ({f.check}{seen})")
        lines += wrap.wrap(f.message)
        if f.advice:
            lines += wrap.wrap(f"advice: {f.advice}")
    if not findings:
        lines.append("(none)")
    return "\n".join(lines)

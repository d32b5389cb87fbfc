"""The one result type every diagnostic produces, and its record: ``findings.jsonl``.

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
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_diag import jsonable
from lightning_diag.codes import DIAGNOSIS_PREFIX
from lightning_diag.presentation import (
    finding_rank,
    format_findings,
    headline,
    line,
    sort_findings,
)
from lightning_diag.severity import Severity

__all__ = ["DIAGNOSIS_PREFIX", "FINDINGS_FILE", "FORMAT_VERSION", "UPDATE_VERSION",
           "DiagnosticError", "DiagnosticWarning", "Finding", "FindingsFile", "Severity",
           "append_findings", "append_lines", "encode", "finding_rank", "format_findings",
           "load_findings", "load_findings_by_run", "load_findings_files", "merge",
           "read_findings_file", "sort_findings", "update_record", "updated"]

#: Name of the JSON Lines file, one finding per line, that each run writes in its log directory.
FINDINGS_FILE = "findings.jsonl"
#: Version of the record :meth:`Finding.to_dict` writes; bumped when a field changes meaning.
FORMAT_VERSION = 1
#: Version of an update record (:func:`update_record`), which older readers skip.
UPDATE_VERSION = 2
_FIELDS = ("check", "code", "severity", "message", "advice", "value", "expected", "step",
           "epoch", "indices", "details", "subject")
#: The fields naming a fact (:attr:`Finding.key`), which an update record repeats.
_KEY = ("check", "code", "subject")


@dataclass(frozen=True)
class Finding:
    """One diagnostic result.

    Attributes:
        check: Name of the callback (or function) that produced it, e.g. ``"GradientCheck"``.
        code: Stable dotted identifier, e.g. ``"gradient_check.mismatch"``; a public contract
            (every code is declared in :mod:`lightning_diag.codes`).
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
        """A one-line rendering: ``[FAIL] code: message Advice: ...``
        (:func:`lightning_diag.presentation.line`)."""
        return line(self)

    def headline(self) -> str:
        """One short line for a terminal (:func:`lightning_diag.presentation.headline`)."""
        return headline(self)

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

    def to_dict(self) -> dict[str, Any]:
        """The finding as a record strict JSON can hold: one line of ``findings.jsonl``.

        Values are converted by :func:`lightning_diag.jsonable.to_json` (tensors and numpy
        values become numbers or lists, dataclasses dicts, anything else its ``repr``; it never
        raises). Non-finite floats are written as the strings ``"NaN"``, ``"Infinity"`` and
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
            record[name] = jsonable.to_json(getattr(self, name))
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
                check=jsonable.text(record["check"]),
                code=jsonable.text(record["code"]),
                severity=Severity(record["severity"]),
                message=jsonable.text(record["message"]),
                advice=jsonable.text(record.get("advice", "")),
                value=jsonable.optional_number(record.get("value")),
                expected=(jsonable.pair(expected) if isinstance(expected, list)
                          else jsonable.optional_number(expected)),
                step=jsonable.optional_int(record.get("step")),
                epoch=jsonable.optional_int(record.get("epoch")),
                indices=tuple(jsonable.integer(i) for i in record.get("indices", ())),
                details=jsonable.from_json(dict(details)),
                subject=jsonable.text(record.get("subject", "")),
            )
        except KeyError as err:
            raise ValueError(f"finding record lacks the field {err.args[0]!r}") from err
        except TypeError as err:
            raise ValueError(f"malformed finding record: {err}") from err


# -- one fact seen again ---------------------------------------------------------------------
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


def merge(into: list[Finding], new: Iterable[Finding]) -> tuple[list[Finding], list[Finding]]:
    """Record ``new`` in ``into``, one finding per fact: a fact already there is
    :func:`updated` in place. Returns the findings as recorded and the "loud" ones among them
    (new facts, and updates whose severity rose: those worth telling a person again).

    Example:
        >>> kept = [Finding("U", "u.high", Severity.WARN, "ratio 1.31", value=1.31, step=1)]
        >>> out, loud = merge(kept, [Finding("U", "u.high", Severity.FAIL, "ratio 5", step=2)])
        >>> len(kept), kept[0].severity, loud == out
        (1, <Severity.FAIL: 'fail'>, True)
    """
    out, loud = [], []
    for f in new:
        i = next((k for k, old in enumerate(into) if old.key == f.key), None)
        if i is None:
            into.append(f)
            loud.append(f)
        else:
            f, old = updated(into[i], f), into[i]
            into[i] = f
            if f.severity > old.severity:
                loud.append(f)
        out.append(f)
    return out, loud


# -- the record: findings.jsonl ----------------------------------------------------------------
def update_record(old: Finding, new: Finding) -> dict[str, Any] | None:
    """The record of what changed from ``old`` to ``new`` (one fact, the later reading): the
    fact's key, the steps not seen before, and each other field that changed; None when
    nothing did. Appending it instead of the whole finding keeps ``findings.jsonl`` linear in
    the steps seen.

    Example:
        >>> first = Finding("U", "u.high", Severity.WARN, "ratio 1.31", value=1.31,
        ...                 expected=(0.0, 0.2), step=1)
        >>> both = updated(first, Finding("U", "u.high", Severity.WARN, "ratio 0.3", value=0.3,
        ...                               expected=(0.0, 0.2), step=3))
        >>> update_record(first, both)
        {'version': 2, 'update': True, 'check': 'U', 'code': 'u.high', 'subject': '', 'steps': [3]}
    """
    before, after = old.to_dict(), new.to_dict()
    steps = sorted(set(new.steps()) - set(old.steps()))
    for record in (before, after):
        record["details"] = {k: v for k, v in record["details"].items() if k != "steps"}
    changed = {k: v for k, v in after.items()
               if k not in _KEY and k != "version" and before.get(k) != v}
    if not steps and not changed:
        return None
    return {"version": UPDATE_VERSION, "update": True, **{k: after[k] for k in _KEY},
            "steps": steps, **changed}


def encode(records: Iterable[Mapping[str, Any]]) -> bytes:
    """Records as JSON lines: strict JSON, ASCII, one a line."""
    return "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("ascii")


def append_lines(path: str | Path, data: bytes) -> None:
    """Append ``data`` (:func:`encode`) to ``path``, on a fresh line: a last line left
    half-written (a killed process, a full disk) stays a line of its own, to be skipped by the
    reader, instead of swallowing the first record appended. Written in one call and closed
    (flushed) before this returns, so a run that crashes afterwards keeps it.

    Raises:
        OSError: The file or its folder cannot be written; the caller decides whether it matters.
    """
    if not data:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("ab+") as fh:  # appends whatever the position; reads from anywhere
        if fh.seek(0, 2) > 0:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                data = b"\n" + data
        fh.write(data)


def append_findings(path: str | Path, findings: Iterable[Finding]) -> None:
    """Append ``findings`` to the JSON Lines file ``path``, one :meth:`Finding.to_dict` a line
    (:func:`append_lines`).

    Raises:
        OSError: The file or its folder cannot be written; the caller decides whether it matters.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / FINDINGS_FILE
        >>> append_findings(path, [Finding("X", "x.ok", Severity.INFO, "fine", value=1.0)])
        >>> path.read_text().count("\\n"), '"code": "x.ok"' in path.read_text()
        (1, True)
    """
    append_lines(path, encode(f.to_dict() for f in findings))


@dataclass
class FindingsFile:
    """What a ``findings.jsonl`` holds, as read back.

    Attributes:
        path: The file.
        findings: One finding per fact (updates merged), in the order first written.
        lines: Its lines that are not blank.
        skipped: Those of them that are not records (a line cut short, corrupt data, an update
            of a fact with no record before it): each was warned about.
    """

    path: Path
    findings: list[Finding]
    lines: int = 0
    skipped: int = 0


def read_findings_file(path: str | Path) -> FindingsFile:
    """Read one ``findings.jsonl``: each record, each update merged into its fact
    (:func:`update_record`), each line that is neither skipped with a warning naming the file
    and line.

    A fact written again whole (by versions before update records) keeps its latest record in
    the place of the first; records without a ``subject`` field (older versions) are all kept.
    """
    source = Path(path)
    out = FindingsFile(source, [])
    place: dict[tuple[str, str, str], int] = {}  # where each fact's first record sits
    with source.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            out.lines += 1
            try:
                record = json.loads(raw)
                if isinstance(record, dict) and record.get("update") is True:
                    key = tuple(jsonable.text(record.get(k, "")) for k in _KEY)
                    if key not in place:
                        raise ValueError("an update of a fact with no record before it")
                    i = place[key]
                    out.findings[i] = _apply(out.findings[i], record)
                    continue
                finding = Finding.from_dict(record)
            # bad JSON or UTF-8, not a record, or nested deeper than the parser goes
            except (ValueError, TypeError, RecursionError) as err:
                out.skipped += 1
                warnings.warn(f"{source}:{lineno}: skipped a line that is not a finding record "
                              f"({type(err).__name__}: {err})."[:400], stacklevel=3)
                continue
            if "subject" in record and finding.key in place:  # a whole record written again
                out.findings[place[finding.key]] = finding
                continue
            if "subject" in record:
                place[finding.key] = len(out.findings)
            out.findings.append(finding)
    return out


def _apply(old: Finding, update: Mapping[str, Any]) -> Finding:
    """``old`` with an update record's changes and steps."""
    record = old.to_dict()
    steps = old.steps()
    record.update({k: v for k, v in update.items() if k in _FIELDS and k not in _KEY})
    record["version"] = FORMAT_VERSION
    new_steps = [jsonable.integer(s) for s in update.get("steps", [])]
    merged = Finding.from_dict(record)
    details = {k: v for k, v in merged.details.items() if k != "steps"}
    return dataclasses.replace(merged, details={**details,
                                                "steps": sorted(set(steps) | set(new_steps))})


def load_findings_files(logdir: str | Path) -> dict[str, FindingsFile]:
    """Every ``findings.jsonl`` under ``logdir`` read (:func:`read_findings_file`), keyed by
    run as :func:`load_findings_by_run` keys them, with how many lines each skipped.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or is not a directory.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"log directory {str(root)!r} does not exist or is not a directory")
    runs: dict[str, FindingsFile] = {}
    files = (p for p in root.rglob(FINDINGS_FILE) if p.is_file())
    for path in sorted(files, key=lambda p: _natural(p.relative_to(root).as_posix())):
        folder = path.parent.relative_to(root).as_posix()
        run = (root.resolve().name or str(root)) if folder == "." else folder
        runs[run] = read_findings_file(path)
    return runs


def load_findings_by_run(logdir: str | Path) -> dict[str, list[Finding]]:
    """The findings of every run under ``logdir``, keyed by run folder, in the order written.

    Every ``findings.jsonl`` under ``logdir`` (``logdir`` itself included) is one run, keyed by
    its folder relative to ``logdir`` (e.g. ``"tb/version_0"``), or by the folder's own name when
    the file sits directly in ``logdir``. Runs are in natural order (``version_2`` before
    ``version_10``). A line that is not a finding record (e.g. the last line of a run killed
    mid-write) is skipped with a warning naming the file and line
    (:func:`load_findings_files` also counts them). A fact seen again is one finding: its
    update records are merged into it.

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
    return {run: read.findings for run, read in load_findings_files(logdir).items()}


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

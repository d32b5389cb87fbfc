"""One run-level record per Trainer: every finding of the fit, and everything done with them
for the run as a whole.

The diagnostic callbacks hand their findings to the record of their trainer
(:meth:`RunRecord.publish`) and never read each other; the record

- keeps them, one finding per fact, in each callback's ``.findings`` (the list is the record's
  store for that callback), and answers for the run (:meth:`RunRecord.findings`, what
  ``lightning_diag.findings(trainer)`` returns);
- appends them to ``<log_dir>/findings.jsonl`` as they are published, a fact seen again as an
  update record of what changed (:func:`~lightning_diag.findings.update_record`): the file grows
  with the facts and steps seen, and a crash keeps what was found;
- prints one line per new or worse finding (:mod:`lightning_diag.terminal`);
- keeps TensorBoard's view of them (:mod:`lightning_diag.tensorboard.findings_table`): the
  findings table, written again only when a finding is new or worse and at the end of the fit,
  never twice with the same content, and the card with the number of FAIL, WARN and INFO
  findings on the page TensorBoard opens on, written likewise;
- makes the run's diagnosis once per fit, after every diagnostic callback's ``on_fit_end``
  whatever their order, and also when one of them stepped aside
  (:func:`~lightning_diag.checks.diagnosis.diagnose`);
- holds the run's byte budget (:mod:`lightning_diag.budget`): past it, one finding
  ``record.byte_budget`` says so and the library stops writing; the training goes on.

Files are written on global rank zero only.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> RunRecord.of(trainer) is RunRecord.of(trainer), RunRecord.of(trainer).findings()
    (True, [])
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import lightning.pytorch as pl

from lightning_diag import terminal
from lightning_diag.budget import ByteBudget, budget_of, max_bytes_setting, run_limit
from lightning_diag.checks.diagnosis import diagnose
from lightning_diag.findings import (
    FINDINGS_FILE,
    Finding,
    Severity,
    append_lines,
    encode,
    merge,
    update_record,
)
from lightning_diag.guard import ConfigurationError
from lightning_diag.tensorboard.findings_table import (
    FindingsCard,
    findings_card,
    findings_table,
    table_rows,
)
from lightning_diag.tensorboard.tags import FINDINGS_CARD, FINDINGS_TABLE
from lightning_diag.tensorboard.writer import encode_png, log_dir, log_png, tensorboard_writer

__all__ = ["RunRecord"]

#: The record's own findings (the byte budget) carry this check name.
CHECK = "RunRecord"
#: Each trainer's record, as long as the trainer lives.
_RECORDS: weakref.WeakKeyDictionary[pl.Trainer, RunRecord] = weakref.WeakKeyDictionary()


class Member(Protocol):
    """What the record needs of a diagnostic callback."""

    findings: list[Finding]
    strict: bool


class RunRecord:
    """The record of one Trainer's run (see the module's docstring); :meth:`of` finds it.

    Attributes:
        max_bytes: The byte budget of the library's files per run (None: no limit; set it
            before ``fit``), at most half the free disk space; by default
            ``LIGHTNING_DIAG_MAX_BYTES`` or :data:`~lightning_diag.budget.DEFAULT_MAX_BYTES`.
    """

    def __init__(self) -> None:
        try:
            self.max_bytes: int | None = max_bytes_setting()
        except ValueError as err:
            raise ConfigurationError(str(err)) from None
        self._members: list[Member] = []
        self._begin()

    @classmethod
    def of(cls, trainer: pl.Trainer) -> RunRecord:
        """The record of ``trainer``, made on first use; it lives as long as the trainer."""
        record = _RECORDS.get(trainer)
        if record is None:
            record = _RECORDS[trainer] = cls()
        return record

    def _begin(self) -> None:
        """A new fit: nothing found yet."""
        self._members = []
        self._open = True
        self._ending = False
        self._ended: set[int] = set()
        self._diagnosed = False
        self._written: dict[tuple[int, tuple[str, str, str]], Finding] = {}
        self._shown = ""  # the table last written to TensorBoard
        self._card = ""  # the card last written to TensorBoard
        self._said_unwritable = False
        self._said_budget = False
        self._budget: ByteBudget | None = None
        self._own = _Own()

    # -- members ---------------------------------------------------------------------------
    def join(self, member: Member, trainer: pl.Trainer) -> None:
        """``member``'s ``setup`` for a fit: its findings start empty. The first callback to
        join a fit again (or after the last one ended) starts a new fit of the record."""
        if not self._open or any(m is member for m in self._members):
            self._begin()
        member.findings = []
        self._members.append(member)
        self._budget_for(trainer)

    def _member(self, member: Member) -> int:
        for i, m in enumerate(self._members):
            if m is member:
                return i
        self._members.append(member)  # publishing without a setup of its own for this fit
        return len(self._members) - 1

    def findings(self) -> list[Finding]:
        """Every finding of the fit: each callback's, in the order they joined (their order on
        the trainer), the diagnosis in the callback that ended last."""
        return [f for m in self._members for f in m.findings]

    def first(self, predicate: Callable[[Finding], bool],
              among: Iterable[object] | None = None) -> Finding | None:
        """The first finding of the fit that meets ``predicate``, among the findings of the
        callbacks ``among`` (all when None), in their order; no copy is made."""
        members = self._members if among is None else [
            m for m in self._members if any(m is a for a in among)]
        return next((f for m in members for f in m.findings if predicate(f)), None)

    # -- publishing ------------------------------------------------------------------------
    def publish(self, member: Member, trainer: pl.Trainer, new: Iterable[Finding],
                forced: bool = False) -> tuple[list[Finding], list[Finding]]:
        """Record ``new`` as ``member``'s findings (stamped with the trainer's step and epoch
        where the check left them out), print the new or worse ones, write them (``forced``:
        past the byte budget).

        Returns:
            The findings as recorded (a fact seen again, updated), and those printed.
        """
        index = self._member(member)
        out, loud = merge(member.findings, (_stamped(trainer, f) for f in new))
        if not out:
            return out, loud
        if trainer.is_global_zero:
            terminal.say(loud)
            self._append(trainer, index, out, forced)
            if loud and not self._ending:
                self._show(trainer)
            self._tell_budget(trainer)
        return out, loud

    def _append(self, trainer: pl.Trainer, index: int, batch: list[Finding],
                forced: bool = False) -> None:
        """Append ``batch`` to findings.jsonl: a new fact whole, a known one as what changed."""
        directory = log_dir(trainer)
        if directory is None:
            return
        records = []
        for f in batch:
            key = (index, f.key)
            before = self._written.get(key)
            record = f.to_dict() if before is None else update_record(before, f)
            self._written[key] = f
            if record is not None:
                records.append(record)
        data = encode(records)
        if not data or not (self._budget_for(trainer).charge(len(data)) or forced):
            return
        try:
            append_lines(directory / FINDINGS_FILE, data)
        except OSError as err:
            if not self._said_unwritable:
                self._said_unwritable = True
                terminal.log.warning("lightning_diag could not append findings to %s (%s); they "
                                     "are still in `.findings`, the logs and TensorBoard.",
                                     directory / FINDINGS_FILE, err)

    def _show(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Write the findings table and the card to TensorBoard where they changed (the card
        always changes at the end of the fit: it says so)."""
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        every = self.findings()
        step = trainer.global_step
        rows = table_rows(every)
        changed = bool(every) and rows != self._shown
        if not (changed or final):
            return
        budget = self._budget_for(trainer)
        if changed:
            text = findings_table(every, step)
            if not budget.charge(len(text)):
                return
            self._shown = rows
            writer.add_text(FINDINGS_TABLE, text, global_step=step)
        card = findings_card(every, final)
        if card.text != self._card:
            self._card = card.text
            png, shape = _card_png(card)
            log_png(trainer, FINDINGS_CARD, png, shape, step)

    # -- the end of the fit ----------------------------------------------------------------
    def fit_ending(self) -> None:
        """A callback's ``on_train_end`` or ``on_fit_end`` begins: the summaries published from
        now on are shown once, with the diagnosis, at the end of the fit."""
        self._ending = True

    def fit_ended(self, member: Member, trainer: pl.Trainer, attached: list[Any]) -> None:
        """``member``'s ``on_fit_end`` is over (whether it ran or stepped aside). Once every
        diagnostic callback ``attached`` to the trainer is, the run's diagnosis is made (when
        the problems come from two checks or more; one check's findings already carry their
        advice), kept with ``member``'s findings, and the table is written a last time."""
        self._member(member)
        self._ended.add(id(member))
        if (self._diagnosed or not any(cb is member for cb in attached)
                or not all(id(cb) in self._ended for cb in attached)):
            return
        self._diagnosed, self._open = True, False
        try:
            found = diagnose(self.findings(), min_checks=2)
            if found is not None:
                self.publish(member, trainer, [found])
            self._ending = False
            if trainer.is_global_zero:
                self._tell_budget(trainer)
                self._show(trainer, final=True)
        except Exception:  # the run is over: a failed summary must not fail it
            if member.strict:
                raise
            terminal.log.exception("lightning_diag could not make the run's diagnosis or write "
                                   "its findings table.")
        finally:
            self._ending = False

    # -- the byte budget -------------------------------------------------------------------
    def _budget_for(self, trainer: pl.Trainer) -> ByteBudget:
        """The fit's budget: the TensorBoard writer's (shared with the writers' helpers),
        else the record's own; its limit from :attr:`max_bytes` and the free disk space."""
        if self._budget is None:
            writer = tensorboard_writer(trainer)
            limit = run_limit(self.max_bytes, log_dir(trainer))
            self._budget = budget_of(writer) if writer is not None else ByteBudget(limit)
            self._budget.limit = limit
        return self._budget

    def _tell_budget(self, trainer: pl.Trainer) -> None:
        """Once the budget is exceeded: one finding says so (written past the budget)."""
        budget = self._budget_for(trainer)
        if not budget.exceeded or self._said_budget:
            return
        self._said_budget = True
        limit = f"{budget.limit:,}" if budget.limit is not None else "no limit"
        notice = Finding(
            CHECK, "record.byte_budget", Severity.WARN,
            f"lightning_diag wrote {budget.spent:,} bytes of its own files in this run, its "
            f"budget ({limit} bytes: the smaller of `max_bytes` and half the free disk space): "
            "it stopped writing them (findings.jsonl, TensorBoard); the training goes on and "
            "findings are still collected in `.findings` and printed.",
            advice="Give the log directory more room, log less often (`every_n_steps`), or "
                   "raise the budget: `LIGHTNING_DIAG_MAX_BYTES` or "
                   "`RunRecord.of(trainer).max_bytes` (docs/reliability.md).",
            value=float(budget.spent))
        self.publish(self._own, trainer, [notice], forced=True)


#: The cards last encoded, by what they show: many runs of one process (a search's trials)
#: end on the same card ("nothing to fix"), drawn and encoded once (~4 ms each).
_CARD_PNGS: dict[str, tuple[bytes, tuple[int, ...]]] = {}


def _card_png(card: FindingsCard) -> tuple[bytes, tuple[int, ...]]:
    """``card`` as PNG bytes (its numbers in text chunks) and its image's shape."""
    key = repr((card.lines, card.metadata))
    if key not in _CARD_PNGS:
        if len(_CARD_PNGS) >= 16:
            _CARD_PNGS.pop(next(iter(_CARD_PNGS)))
        image = card.image()
        _CARD_PNGS[key] = encode_png(image, card.metadata), image.shape
    return _CARD_PNGS[key]


def _stamped(trainer: pl.Trainer, f: Finding) -> Finding:
    """``f`` with the trainer's step and epoch where the (Trainer-free) check left them out."""
    if f.step is not None:
        return f
    return dataclasses.replace(f, step=trainer.global_step, epoch=trainer.current_epoch)


@dataclasses.dataclass
class _Own:
    """The record's own findings (the byte budget), kept as a member's."""

    findings: list[Finding] = dataclasses.field(default_factory=list)
    strict: bool = False

"""The run record (lightning_diag/record.py): findings.jsonl that survives a torn line and grows
with the facts and steps, the byte budget, one warning per run, one table version per content
and the counts on the first screen, and the fit-end diagnosis whatever the callbacks' order."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from lightning_diag.base import DiagnosticCallback, findings
from lightning_diag.findings import (
    FINDINGS_FILE,
    Finding,
    Severity,
    append_findings,
    load_findings,
    read_findings_file,
)
from lightning_diag.guard import ConfigurationError
from lightning_diag.presentation import counts
from lightning_diag.record import RunRecord
from lightning_diag.tensorboard.tags import FINDINGS_CARD, FINDINGS_TABLE
from tests.helpers import (
    Classifier,
    card_counts,
    digits,
    events,
    loader,
    mlp,
    text_events,
    trainer,
)


class Every(DiagnosticCallback):
    """Publishes, at every training step, the facts it is given: ``code -> (severity, value)``
    readings, one fact per code (seen again at each step)."""

    slug = "every"

    def __init__(self, facts: dict[str, tuple[Severity, float]] | None = None,
                 worse_each_step: bool = False) -> None:
        super().__init__()
        self.facts = facts or {"every.high": (Severity.WARN, 1.0)}
        self.worse_each_step = worse_each_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        grow = step if self.worse_each_step else 0
        self.publish(trainer, [
            self.finding(trainer, code, severity, f"reading {value + grow}", value=value + grow,
                         expected=(0.0, 0.5), details={"layer": "net.1"})
            for code, (severity, value) in self.facts.items()])


class Other(Every):
    """Another check (the diagnosis combines the problems of two checks or more)."""


def _fit(tmp_path: Path, callbacks: list[Any], steps: int = 4, **kw: Any) -> Any:
    t = trainer(tmp_path, callbacks, limit_train_batches=steps, limit_val_batches=0, **kw)
    t.fit(Classifier(mlp(width=8)), loader(digits(32 * steps, True)))
    return t


def _record(t: Any) -> Path:
    return Path(t.logger.log_dir) / FINDINGS_FILE


# -- findings.jsonl -----------------------------------------------------------------------------
def test_an_append_after_a_torn_line_starts_a_fresh_line_and_the_loader_skips_it(tmp_path):
    path = tmp_path / FINDINGS_FILE
    append_findings(path, [Finding("X", "x.first", Severity.WARN, "first")])
    with path.open("a") as fh:
        fh.write('{"version": 1, "check": "X", "code": "x.cut", "sev')  # a killed process
    append_findings(path, [Finding("X", "x.after", Severity.WARN, "after")])
    assert path.read_text().splitlines()[2].startswith('{"version": 1, "check": "X", "code": '
                                                       '"x.after"')
    with pytest.warns(UserWarning, match=f"{FINDINGS_FILE}:2: skipped"):
        read = read_findings_file(path)
    assert [f.code for f in read.findings] == ["x.first", "x.after"]
    assert (read.lines, read.skipped) == (3, 1)


def test_a_deeply_nested_line_is_skipped_not_a_recursion_error(tmp_path):
    path = tmp_path / FINDINGS_FILE
    append_findings(path, [Finding("X", "x.ok", Severity.INFO, "fine")])
    with path.open("a") as fh:
        fh.write("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.warns(UserWarning, match="RecursionError"):
        read = read_findings_file(path)
    assert [f.code for f in read.findings] == ["x.ok"] and read.skipped == 1


def test_a_fact_seen_at_every_step_grows_the_file_by_its_new_step_only(tmp_path):
    cb = Every()
    sizes = []

    class Sizes(DiagnosticCallback):  # after Every's publication of each step
        def on_train_batch_end(self, trainer, *args):
            sizes.append(_record(trainer).stat().st_size)

    t = _fit(tmp_path, [cb, Sizes()], steps=12)
    growth = [b - a for a, b in itertools.pairwise(sizes)]  # each step's update
    assert len(set(growth)) <= 2 and max(growth) < 120, growth  # one short line a step
    (loaded,) = load_findings(t.logger.log_dir)
    (kept,) = cb.findings
    assert loaded.to_dict() == kept.to_dict() and loaded.steps() == list(range(1, 13))


def test_a_worse_reading_writes_the_fields_that_changed_and_the_loader_rebuilds_it(tmp_path):
    cb = Every(worse_each_step=True)
    t = _fit(tmp_path, [cb], steps=3)
    lines = [json.loads(x) for x in _record(t).read_text().splitlines()]
    assert [x.get("update", False) for x in lines] == [False, True, True]
    assert set(lines[1]) == {"version", "update", "check", "code", "subject", "steps",
                             "message", "value", "step"}  # details and the rest unchanged
    (loaded,) = load_findings(t.logger.log_dir)
    assert loaded.to_dict() == cb.findings[0].to_dict() and loaded.value == 4.0  # step 3


def test_an_unwritable_record_is_warned_once_per_run_not_per_callback(tmp_path, caplog):
    (tmp_path / "tb" / "version_0" / FINDINGS_FILE).mkdir(parents=True)  # opening it fails
    first, second = Every({"every.a": (Severity.INFO, 0.1)}), Every({"every.b": (
        Severity.INFO, 0.2)})
    with caplog.at_level(logging.WARNING, logger="lightning_diag"):
        t = _fit(tmp_path, [first, second], steps=3)
    assert t.global_step == 3 and first.findings and second.findings
    failures = [r for r in caplog.records if "could not append" in r.getMessage()]
    assert len(failures) == 1


# -- the byte budget ----------------------------------------------------------------------------
def test_past_the_byte_budget_one_finding_says_so_and_the_library_stops_writing(tmp_path):
    cb = Every(worse_each_step=True)
    t = trainer(tmp_path, [cb], limit_train_batches=8, limit_val_batches=0)
    RunRecord.of(t).max_bytes = 1500
    t.fit(Classifier(mlp(width=8)), loader(digits(256, True)))
    assert t.global_step == 8  # the training went on
    (notice,) = [f for f in findings(t) if f.code == "record.byte_budget"]
    assert notice.severity is Severity.WARN and "1,500" in notice.message
    size = _record(t).stat().st_size
    assert size < 1500 + 2000  # the last records before the budget, and the notice
    written = load_findings(t.logger.log_dir)
    assert [f.code for f in written][-1] == "record.byte_budget"
    assert len(cb.findings[0].steps()) == 8 > len(written[0].steps())  # kept, not written


def test_the_budget_is_at_most_half_the_free_disk(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2000))
    t = _fit(tmp_path, [Every(worse_each_step=True)], steps=8)
    assert "record.byte_budget" in {f.code for f in findings(t)}
    assert _record(t).stat().st_size < 1000 + 2000


def test_a_plain_run_is_far_below_the_default_budget(tmp_path):
    t = _fit(tmp_path, [Every()], steps=4)
    budget = RunRecord.of(t)._budget_for(t)
    assert budget.limit is not None and budget.spent * 1000 < budget.limit
    assert not budget.exceeded and "record.byte_budget" not in {f.code for f in findings(t)}


def test_a_bad_budget_setting_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DIAG_MAX_BYTES", "lots")
    t = trainer(tmp_path, [Every()], limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(ConfigurationError, match="LIGHTNING_DIAG_MAX_BYTES"):
        t.fit(Classifier(mlp(width=8)), loader(digits(32, True)))
    monkeypatch.setenv("LIGHTNING_DIAG_MAX_BYTES", "0")  # no budget
    t = trainer(tmp_path / "none", [Every()], limit_train_batches=1, limit_val_batches=0)
    assert RunRecord.of(t).max_bytes is None


# -- TensorBoard ---------------------------------------------------------------------------------
def test_one_table_version_per_content_and_the_counts_on_the_first_cards(tmp_path):
    # the same facts at every step: one version for them, and one at the end with the summary
    cbs = [Every({"every.bad": (Severity.FAIL, 2.0)}),
           Other({"every.note": (Severity.INFO, 0.1)}), Other({"every.odd": (Severity.WARN, 1.0)})]
    t = _fit(tmp_path, cbs, steps=6)
    acc = events(t.logger.log_dir)
    tables = text_events(acc, FINDINGS_TABLE)
    bodies = [table.split("\n\n", 1)[1] for table in tables]
    assert len(bodies) == len(set(bodies))  # never the same table twice
    # each callback's first findings (new facts), then once at the end of the fit (the steps
    # seen since and the diagnosis); 6 steps of the same facts in between write nothing
    assert [e.step for e in acc.Tensors(f"{FINDINGS_TABLE}/text_summary")] == [1, 1, 1, 6]
    every = findings(t)
    assert "diagnosis.summary" in {f.code for f in every}  # two checks with problems
    n = counts(every)
    assert (n[Severity.FAIL], n[Severity.WARN]) == (1, 1)  # the diagnosis is not counted
    assert tables[-1].startswith("**4 findings** (1 fail, 1 warn, 1 info, and the diagnosis)")
    # the card: the counts when first found (each callback's first finding), and at the end
    cards = acc.Images(FINDINGS_CARD)
    assert [(e.step, card_counts(e)) for e in cards] == [
        (1, "fail=1 warn=0 info=0"), (1, "fail=1 warn=0 info=1"), (1, "fail=1 warn=1 info=1"),
        (t.global_step, "fail=1 warn=1 info=1")]
    assert card_counts(cards[-1]) == " ".join(f"{s.value}={k}" for s, k in n.items())


# -- the fit-end diagnosis ----------------------------------------------------------------------
def test_the_diagnosis_waits_for_every_callback_whatever_their_order(tmp_path):
    first = Every({"every.bad": (Severity.FAIL, 2.0)})
    second = Other({"every.odd": (Severity.WARN, 1.0)})
    t = trainer(tmp_path, [first, second], limit_train_batches=1, limit_val_batches=0)
    record = RunRecord.of(t)
    record.join(first, t)
    record.join(second, t)
    for cb in (first, second):
        cb.publish(t, [cb.finding(t, next(iter(cb.facts)), cb.facts[next(iter(cb.facts))][0],
                                  "m")])
    second.on_fit_end(t, None)  # Lightning calls them in list order; here the other way round
    assert not any(f.code == "diagnosis.summary" for f in findings(t))
    first.on_fit_end(t, None)
    first.on_fit_end(t, None)  # never twice
    assert [f.code for f in findings(t)].count("diagnosis.summary") == 1
    assert any(f.code == "diagnosis.summary" for f in first.findings)  # the last to end

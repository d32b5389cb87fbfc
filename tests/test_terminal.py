"""What a user sees while training: one short line per finding (the ``lightning_diag`` logger,
through ``tqdm.write``), ``DiagnosticWarning`` silent unless a filter of the user's asks for it,
and a fact seen again as one updated finding (in ``.findings`` and in ``findings.jsonl`` as the
loaders read it back)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

from lightning_diag import terminal
from lightning_diag.base import DiagnosticCallback, log
from lightning_diag.findings import (
    FINDINGS_FILE,
    DiagnosticWarning,
    Finding,
    Severity,
    append_findings,
    format_findings,
    load_findings,
)
from tests.helpers import Classifier, digits, loader, mlp, trainer


class Readings(DiagnosticCallback):
    """Publishes one fact (``readings.high``) at the global steps it is given."""

    slug = "readings"

    def __init__(self, readings: dict[int, tuple[Severity, float]]) -> None:
        super().__init__()
        self.readings = readings

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step in self.readings:
            severity, value = self.readings[trainer.global_step]
            self.publish(trainer, [self.finding(
                trainer, "readings.high", severity, f"Ratio {value:g}, above 0.2.",
                advice="Lower the learning rate.", value=value, expected=(0.0, 0.2))])


def _fit(tmp_path: Any, cb: DiagnosticCallback, progress_bar: bool = False) -> Any:
    t = trainer(tmp_path, [cb], limit_train_batches=4, limit_val_batches=0,
                enable_progress_bar=progress_bar)
    t.fit(Classifier(mlp()), loader(digits(128)))
    return t


@pytest.fixture
def unconfigured_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``lightning_diag`` logger as in a script that configured no logging: pytest's capture
    handlers (on the root logger, and on any logger that does not propagate) count as none."""
    monkeypatch.setattr(terminal, "_handled_elsewhere", lambda record, mine: False)


def test_the_terminal_handler_steps_back_when_another_handler_takes_the_record():
    record = logging.LogRecord("lightning_diag", logging.WARNING, "", 0, "m", None, None)
    (mine,) = [h for h in log.handlers if isinstance(h, terminal._TerminalHandler)]
    assert terminal._handled_elsewhere(record, mine)  # pytest's capture handlers take it here
    alone = logging.getLogger("lightning_diag_probe_alone")
    alone.propagate = False
    alone.addHandler(mine)
    try:
        record.name = alone.name
        assert not terminal._handled_elsewhere(record, mine)
        alone.addHandler(logging.NullHandler())  # any handler of the user's: it decides
        assert terminal._handled_elsewhere(record, mine)
    finally:
        alone.handlers.clear()


def test_each_finding_is_one_short_line_on_stderr(tmp_path, capsys, unconfigured_logging):
    cb = Readings({1: (Severity.WARN, 1.31), 3: (Severity.WARN, 0.30)})
    _fit(tmp_path, cb, progress_bar=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "readings.high" in line]
    # seen twice, printed once (the update is silent), short, without advice or a file:line
    assert lines == ["[WARN] readings.high: 1.31 (expected 0 to 0.2) at step 1"]
    assert "Advice" not in err and "base.py" not in err


def test_a_severity_that_rises_is_printed_again(tmp_path, capsys, unconfigured_logging):
    _fit(tmp_path, Readings({1: (Severity.WARN, 0.3), 2: (Severity.FAIL, 5.0)}))
    lines = [line for line in capsys.readouterr().err.splitlines() if "readings" in line]
    assert [line.split()[0] for line in lines] == ["[WARN]", "[FAIL]"]
    assert lines[1].endswith("at steps 1, 2")


def test_configured_logging_decides_alone(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_diag"):
        _fit(tmp_path, Readings({1: (Severity.WARN, 1.0)}))
    assert [r.getMessage() for r in caplog.records if "readings" in r.getMessage()] == [
        "[WARN] readings.high: 1 (expected 0 to 0.2) at step 1"]
    assert "readings.high" not in capsys.readouterr().err  # no second copy from ours


def test_diagnostic_warning_is_silent_unless_a_filter_asks(tmp_path):
    with warnings.catch_warnings(record=True) as caught:  # the filters as they are
        _fit(tmp_path, Readings({1: (Severity.WARN, 1.0)}))
    assert not [w for w in caught if issubclass(w.category, DiagnosticWarning)]
    with pytest.warns(DiagnosticWarning, match=r"readings\.high: Ratio 1.*Advice"):
        _fit(tmp_path, Readings({1: (Severity.WARN, 1.0)}))
    # a user's "error" filter makes a finding fatal: the guard lets it through
    with warnings.catch_warnings(), pytest.raises(DiagnosticWarning, match="readings.high"):
        warnings.simplefilter("error", DiagnosticWarning)
        _fit(tmp_path, Readings({1: (Severity.WARN, 1.0)}))


def test_a_fact_seen_again_is_one_finding_with_the_worst_value_and_every_step(tmp_path):
    cb = Readings({1: (Severity.WARN, 1.31), 3: (Severity.WARN, 0.30)})
    t = _fit(tmp_path, cb)
    (only,) = cb.findings
    assert (only.value, only.step, only.steps()) == (1.31, 1, [1, 3])
    record = Path(t.logger.log_dir) / FINDINGS_FILE
    lines = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    # the first reading whole, then only what changed: the new step (appended, not rewritten)
    assert lines[0]["details"].get("steps") is None and lines[0]["step"] == 1
    assert lines[1] == {"version": 2, "update": True, "check": "Readings",
                        "code": "readings.high", "subject": "", "steps": [3]}
    (loaded,) = load_findings(t.logger.log_dir)
    assert loaded == only and loaded.steps() == [1, 3]
    assert "(Readings, seen at steps 1, 3)" in format_findings([loaded])


def test_loaders_keep_the_latest_record_of_a_fact_in_the_place_of_the_first(tmp_path):
    def f(code: str, value: float, subject: str = "") -> Finding:
        return Finding("C", code, Severity.WARN, f"{code} {value}", value=value, subject=subject)

    append_findings(tmp_path / FINDINGS_FILE, [f("c.a", 1.0, "net.1"), f("c.a", 2.0, "net.2"),
                                               f("c.b", 3.0), f("c.a", 5.0, "net.1")])
    assert [(x.code, x.subject, x.value) for x in load_findings(tmp_path)] == [
        ("c.a", "net.1", 5.0), ("c.a", "net.2", 2.0), ("c.b", "", 3.0)]
    # records of older versions (no `subject` field) are all kept
    old = {"version": 1, "check": "C", "code": "c.old", "severity": "warn", "message": "m"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / FINDINGS_FILE).write_text(json.dumps(old) + "\n" + json.dumps(old) + "\n")
    assert len(load_findings(tmp_path / "old")) == 2


def test_headline_without_a_number_cuts_the_first_sentence():
    long = Finding("D", "data.summary", Severity.INFO, "x" * 200 + ". Then more.")
    assert long.headline().startswith("[INFO] data.summary: xxx") and len(long.headline()) < 120

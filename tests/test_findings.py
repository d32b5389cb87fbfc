import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import lightning_diag
from lightning_diag.base import DiagnosticCallback
from lightning_diag.callbacks import DataInspection, InitialLossCheck
from lightning_diag.checks.gradients import TensorGradientError, check_gradients
from lightning_diag.examples.digits import DigitsClassifier, load_digits_tensors
from lightning_diag.findings import (
    FINDINGS_FILE,
    FORMAT_VERSION,
    DiagnosticError,
    DiagnosticWarning,
    Finding,
    Severity,
    append_findings,
    load_findings,
    load_findings_by_run,
)
from lightning_diag.tensorboard.findings_table import TABLE_HEADER, table_row
from lightning_diag.tensorboard.tags import FINDINGS_TABLE
from lightning_diag.tensorboard.writer import markdown_table
from tests.helpers import Classifier, digits, events, loader, mlp, text_events, trainer


def test_severity_order_and_str_values():
    assert Severity.INFO < Severity.WARN < Severity.FAIL
    assert max([Severity.WARN, Severity.FAIL, Severity.INFO]) is Severity.FAIL
    assert Severity("warn") is Severity.WARN
    assert Severity.FAIL == "fail"


def test_finding_is_frozen_and_normalizes_fields():
    f = Finding("X", "x.bad", "warn", "msg 3.0", indices=[3, 1])  # type: ignore[arg-type]
    assert f.severity is Severity.WARN
    assert f.indices == (3, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.code = "y"  # type: ignore[misc]
    assert f.format() == "[WARN] x.bad: msg 3.0"


def test_diagnostic_error_lists_failures():
    f = Finding("X", "x.fail", Severity.FAIL, "broken", advice="fix it")
    err = DiagnosticError([f])
    assert err.findings == [f]
    assert "x.fail" in str(err) and "fix it" in str(err)


# --- the record: Finding.to_dict / from_dict -----------------------------------------------------


def _strict_round_trip(f: Finding) -> tuple[dict, Finding]:
    """to_dict -> strict JSON text -> from_dict; strict JSON refuses NaN, so this also proves
    that the record holds no bare non-finite number."""
    text = json.dumps(f.to_dict(), allow_nan=False)
    return json.loads(text), Finding.from_dict(json.loads(text))


def test_round_trip_keeps_every_field():
    f = Finding("X", "x.bad", Severity.FAIL, "loss 2.5", advice="fix it", value=2.5,
                expected=(0.5, 1.5), step=7, epoch=2, indices=(4, 1),
                details={"split": "train", "n": 3, "ok": True, "none": None, "nested": {"a": [1]}})
    record, back = _strict_round_trip(f)
    assert record["version"] == FORMAT_VERSION
    assert set(record) == {"version", *(fld.name for fld in dataclasses.fields(Finding))}
    assert back == f and back.details == f.details
    assert isinstance(back.expected, tuple) and isinstance(back.indices, tuple)
    assert back.severity is Severity.FAIL


@pytest.mark.parametrize("expected", [None, 2.0, 3, (1.0, 2.0)])
def test_expected_comes_back_as_a_number_or_a_pair(expected):
    _, back = _strict_round_trip(Finding("X", "x.a", Severity.INFO, "m", expected=expected))
    assert back.expected == expected and type(back.expected) is type(expected)


def test_non_finite_values_survive_as_strict_json():
    inf, nan = math.inf, math.nan
    f = Finding("X", "x.nan", Severity.FAIL, "NaN loss", value=nan, expected=(-inf, inf),
                details={"losses": [1.0, nan, inf, -inf], "worst": -inf})
    record, back = _strict_round_trip(f)
    assert record["value"] == "NaN" and record["expected"] == ["-Infinity", "Infinity"]
    assert math.isnan(back.value) and back.expected == (-inf, inf)
    assert back.details["worst"] == -inf
    first, middle, *rest = back.details["losses"]
    assert first == 1.0 and math.isnan(middle) and rest == [inf, -inf]


@dataclasses.dataclass
class _Row:
    name: str
    error: float
    shape: tuple[int, ...]


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


class _Broken:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_numpy_tensors_dataclasses_and_the_rest_become_json():
    cycle: list = [1]
    cycle.append(cycle)
    f = Finding(
        "X", "x.a", Severity.WARN, "m", value=np.float32(0.5),  # type: ignore[arg-type]
        expected=(np.int64(1), torch.tensor(2.0)),  # type: ignore[arg-type]
        step=np.int64(3),  # type: ignore[arg-type]
        indices=np.array([5, 6]),  # type: ignore[arg-type]
        details={"t": torch.tensor([[1.0, float("nan")]]), "a": np.arange(3),
                 "s": np.float64(-np.inf), "row": _Row("w", 1e-3, (2, 3)), "tup": (1, (2, 3)),
                 "set": {7}, "sev": Severity.FAIL, "path": Path("/x/y"), "obj": _Opaque(),
                 "broken": _Broken(), 3: "int key", "cycle": cycle,
                 "bf16": torch.tensor(1.5, dtype=torch.bfloat16),
                 "meta": torch.empty(2, device="meta")},
    )
    record, back = _strict_round_trip(f)
    assert record["value"] == 0.5 and record["expected"] == [1, 2.0] and record["step"] == 3
    assert back.value == 0.5 and back.expected == (1, 2.0) and back.indices == (5, 6)
    d = back.details
    assert d["t"][0][0] == 1.0 and math.isnan(d["t"][0][1]) and d["s"] == -math.inf
    assert d["a"] == [0, 1, 2] and d["tup"] == [1, [2, 3]] and d["set"] == [7]
    assert d["row"] == {"name": "w", "error": 1e-3, "shape": [2, 3]}
    assert d["sev"] == "fail" and d["path"] == "/x/y" and d["3"] == "int key"
    assert d["obj"] == "<opaque>" and d["broken"] == "<_Broken object>"
    assert d["cycle"] == [1, "..."] and d["bf16"] == 1.5 and d["meta"].startswith("tensor(")


def test_real_gradient_check_finding_round_trips():
    x, y = load_digits_tensors()
    (f,) = check_gradients(DigitsClassifier(arch="mlp"), (x[:8], y[:8]), coords_per_tensor=2)
    table = f.details["table"]
    assert table and all(isinstance(r, TensorGradientError) for r in table)
    _, back = _strict_round_trip(f)
    assert back == f
    assert back.details["table"] == [dataclasses.asdict(r) for r in table]
    assert back.details["tolerance"] == f.details["tolerance"]


@pytest.mark.parametrize(("record", "match"), [
    ({"version": FORMAT_VERSION + 1, "check": "X", "code": "c", "severity": "info",
      "message": "m"}, "version"),
    ({"version": 1, "check": "X", "severity": "info", "message": "m"}, "lacks the field 'code'"),
    ({"version": 1, "check": "X", "code": "c", "severity": "bad", "message": "m"}, "bad"),
    ({"version": 1, "check": "X", "code": "c", "severity": "info", "message": "m",
      "expected": [1, 2, 3]}, "pair"),
    ({"version": 1, "check": "X", "code": "c", "severity": "info", "message": "m",
      "value": "high"}, "number"),
    ({"version": 1, "check": "X", "code": "c", "severity": "info", "message": "m",
      "step": 1.5}, "integer"),
    ([1, 2], "JSON object"),
])
def test_from_dict_rejects_what_is_not_a_record(record, match):
    with pytest.raises(ValueError, match=match):
        Finding.from_dict(record)


# --- reading findings.jsonl back -----------------------------------------------------------------


def _write(path: Path, *codes: str) -> None:
    append_findings(path, [Finding("X", c, Severity.WARN, f"found {c}") for c in codes])


def test_load_findings_by_run_keys_runs_by_folder_in_natural_order(tmp_path):
    root = tmp_path / "runs"
    _write(root / "tb" / "version_10" / FINDINGS_FILE, "c.ten")
    _write(root / "tb" / "version_2" / FINDINGS_FILE, "c.two", "c.two_b")
    _write(root / FINDINGS_FILE, "c.root")
    by_run = load_findings_by_run(root)
    assert {k: [f.code for f in v] for k, v in by_run.items()} == {
        "runs": ["c.root"], "tb/version_2": ["c.two", "c.two_b"], "tb/version_10": ["c.ten"]}
    assert list(by_run) == ["runs", "tb/version_2", "tb/version_10"]
    assert [f.code for f in load_findings(root)] == ["c.root", "c.two", "c.two_b", "c.ten"]
    assert [f.code for f in load_findings(root / "tb" / "version_2")] == ["c.two", "c.two_b"]
    assert list(load_findings_by_run(root / "tb" / "version_2")) == ["version_2"]


def test_load_findings_is_exported_and_empty_without_files(tmp_path):
    assert lightning_diag.load_findings is load_findings
    assert "load_findings" in lightning_diag.__all__
    assert lightning_diag.load_findings(tmp_path) == []


def test_load_findings_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        load_findings(tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_findings_by_run(tmp_path / "file")


def test_corrupt_lines_are_skipped_with_a_warning_naming_file_and_line(tmp_path):
    path = tmp_path / FINDINGS_FILE
    _write(path, "c.first")
    with path.open("ab") as fh:
        fh.write(b'{"version": 1, "check": "X"}\n\n\xff\xfe\n')
    _write(path, "c.last")
    with path.open("a") as fh:
        fh.write('{"version": 1, "check": "X", "code": "c.cut", "sev')  # a run killed mid-write
    with pytest.warns(UserWarning) as caught:
        found = load_findings(tmp_path)
    assert [f.code for f in found] == ["c.first", "c.last"]
    assert sorted(str(w.message).split(": ")[0] for w in caught) == [
        f"{path}:2", f"{path}:4", f"{path}:6"]


# --- publish: findings.jsonl written as published, TensorBoard table rendered from the record ---


def _duplicated_digits() -> TensorDataset:
    x, y = digits(64, flatten=True).tensors
    return TensorDataset(torch.cat([x, x[:2]]), torch.cat([y, y[:2]]))


class _CrashingClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("boom in training_step")


def test_a_run_that_crashes_keeps_what_was_found(tmp_path):
    cb = DataInspection(max_images=1)
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(DiagnosticWarning):
        trainer(tmp_path, [cb], limit_train_batches=1, limit_val_batches=0).fit(
            _CrashingClassifier(mlp(width=8)), loader(_duplicated_digits()))
    found = load_findings(tmp_path)
    assert [f.code for f in found] == [f.code for f in cb.findings]
    assert "data.exact_duplicate" in {f.code for f in found}
    assert (tmp_path / "tb" / "version_0" / FINDINGS_FILE).is_file()


def test_published_record_and_tensorboard_table_carry_value_expected_and_step(tmp_path):
    torch.manual_seed(0)
    net = mlp(width=8)
    with torch.no_grad():
        net[-1].weight.mul_(30)
    cb = InitialLossCheck(num_batches=1)
    with pytest.warns(DiagnosticWarning):
        trainer(tmp_path, [cb], limit_train_batches=1, limit_val_batches=0).fit(
            Classifier(net), loader(digits(64, True)))
    run = tmp_path / "tb" / "version_0"
    by_run = load_findings_by_run(tmp_path)
    assert list(by_run) == ["tb/version_0"] and by_run["tb/version_0"] == cb.findings
    mismatch = next(f for f in cb.findings if f.code == "initial_loss.mismatch")
    (table,) = text_events(events(run), FINDINGS_TABLE)
    _, _, header, _, *rows = table.splitlines()
    assert header == "| finding | message | advice | measured |"
    cells = next(r for r in rows if "initial_loss.mismatch" in r).strip("| ").split(" | ")
    low, high = mismatch.expected  # type: ignore[misc]
    assert cells[3].split("<br>") == [
        f"initial loss: {mismatch.value:.4g}", "expected", f"[{low:.4g}, {high:.4g}]", "step 0"]


def test_table_rows_escape_pipes_and_newlines():
    f = Finding("X", "x.a", Severity.INFO, "a|b", advice="do\nthis", value=math.nan)
    _, _, row = markdown_table(TABLE_HEADER, [table_row(f)]).splitlines()
    assert row == "| INFO<br>`x.a` | a\\|b | do this | NaN |"


class _EveryStep(DiagnosticCallback):
    """Publishes one finding per training batch, each about its own step (one fact each)."""

    slug = "every_step"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.publish(trainer, [self.finding(trainer, "every_step.seen", Severity.INFO, "seen",
                                            subject=f"step {trainer.global_step}")])


def test_unwritable_findings_file_warns_once_and_the_fit_goes_on(tmp_path, caplog):
    (tmp_path / "tb" / "version_0" / FINDINGS_FILE).mkdir(parents=True)  # opening it fails
    cb = _EveryStep()
    with caplog.at_level(logging.WARNING, logger="lightning_diag"):
        t = trainer(tmp_path, [cb], limit_train_batches=3, limit_val_batches=0)
        t.fit(Classifier(mlp(width=8)), loader(digits(96, True)))
    assert t.global_step == 3 and len(cb.findings) == 3
    failures = [r for r in caplog.records if "could not append" in r.getMessage()]
    assert len(failures) == 1 and FINDINGS_FILE in failures[0].getMessage()


def test_no_log_dir_or_not_rank_zero_writes_no_file(tmp_path, monkeypatch):
    cb = _EveryStep()
    trainer(tmp_path, [cb], logger=False, limit_train_batches=2, limit_val_batches=0).fit(
        Classifier(mlp(width=8)), loader(digits(64, True)))
    assert len(cb.findings) == 2 and not list(tmp_path.rglob(FINDINGS_FILE))
    t = trainer(tmp_path, [cb])
    monkeypatch.setattr(type(t), "is_global_zero", property(lambda self: False))
    cb.publish(t, [cb.finding(t, "every_step.seen", Severity.INFO, "seen")])
    assert not list(tmp_path.rglob(FINDINGS_FILE))
    monkeypatch.undo()
    cb.publish(t, [cb.finding(t, "every_step.seen", Severity.INFO, "seen")])
    assert [f.code for f in load_findings(tmp_path)] == ["every_step.seen"]

import logging

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_diag.base import DiagnosticCallback, FitStartCheck, HookRegistry, findings
from lightning_diag.findings import DiagnosticError, DiagnosticWarning, Severity
from lightning_diag.tensorboard.tags import FINDINGS, FINDINGS_TABLE
from tests.helpers import Classifier, digits, events, loader, mlp, text_events, trainer


class Probe(FitStartCheck):
    slug = "probe"

    def __init__(self, severity: Severity = Severity.WARN, strict: bool = False) -> None:
        super().__init__(strict=strict)
        self.severity = severity
        self.runs = 0

    def run_check(self, trainer, pl_module):
        self.runs += 1
        return [self.finding(trainer, "probe.result", self.severity, "measured 2.5, expected 1",
                             advice="do something", value=2.5)]


def _fit(tmp_path, cb, **kw):
    t = trainer(tmp_path, [cb], limit_train_batches=2, limit_val_batches=0, **kw)
    t.fit(Classifier(mlp()), loader(digits(64)))
    return t


def test_publish_logs_to_tensorboard_python_logging_and_warnings(tmp_path, caplog):
    cb = Probe()
    with pytest.warns(DiagnosticWarning, match="probe.result"), caplog.at_level(logging.WARNING):
        t = _fit(tmp_path, cb)
    assert [f.code for f in findings(t)] == ["probe.result"]
    assert "probe.result" in caplog.text
    acc = events(t.logger.log_dir)
    (text,) = text_events(acc, FINDINGS_TABLE)
    assert "probe.result" in text and "do something" in text
    # the value is in the table, not a lone dot of its own
    assert not any(tag.startswith(FINDINGS.prefix) for tag in acc.Tags()["scalars"])


class Other(Probe):
    slug = "other"

    def run_check(self, trainer, pl_module):
        return [self.finding(trainer, "other.broken", Severity.FAIL, "measured 9", value=9.0)]


def test_one_findings_table_for_every_callback_fail_first_rewritten(tmp_path):
    t = trainer(tmp_path, [Probe(Severity.INFO), Other()], limit_train_batches=2,
                limit_val_batches=0)
    with pytest.warns(DiagnosticWarning):
        t.fit(Classifier(mlp()), loader(digits(64)))
    acc = events(t.logger.log_dir)
    texts = acc.Tensors(f"{FINDINGS_TABLE}/text_summary")
    assert [e.step for e in texts] == [0, 0]  # rewritten by each callback's publish
    last = texts[-1].tensor_proto.string_val[0].decode()
    assert last.startswith("**2 findings** (1 fail, 0 warn, 1 info) at step 0.")
    rows = [r for r in last.splitlines() if r.startswith("| ") and "`" in r]
    assert [r.split(" | ")[0] for r in rows] == ["| **FAIL**<br>`other.broken`",
                                                 "| INFO<br>`probe.result`"]
    assert [t for t in acc.Tags()["tensors"] if t.endswith("/text_summary")] == [
        f"{FINDINGS_TABLE}/text_summary"]


def test_strict_raises_on_fail_before_training(tmp_path):
    cb = Probe(Severity.FAIL, strict=True)
    model = Classifier(mlp())
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(DiagnosticError, match="probe.result"), pytest.warns(DiagnosticWarning):
        t = trainer(tmp_path, [cb], limit_train_batches=2, limit_val_batches=0)
        t.fit(model, loader(digits(64)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))


def test_strict_must_be_bool():
    with pytest.raises(TypeError, match="strict"):
        Probe(strict="yes")  # type: ignore[arg-type]


def test_no_tensorboard_logger_still_collects(tmp_path):
    cb = Probe(Severity.INFO)
    cb2 = Probe(Severity.INFO)
    t = _fit(tmp_path, cb, logger=CSVLogger(str(tmp_path)))
    assert cb.require_tensorboard(t, "images") is False
    assert cb.require_tensorboard(t, "images") is False
    assert [f.code for f in cb.findings] == ["probe.result", "probe.no_tensorboard"]
    _fit(tmp_path / "none", cb2, logger=False)
    assert [f.code for f in cb2.findings] == ["probe.result"]


def test_fast_dev_run_and_resume_skip_side_experiments(tmp_path):
    cb = Probe(Severity.INFO)
    t = trainer(tmp_path, [cb], fast_dev_run=True)
    t.fit(Classifier(mlp()), loader(digits(64)))
    assert cb.runs == 0 and [f.code for f in cb.findings] == ["probe.skipped"]
    assert "fast_dev_run" in cb.findings[0].message
    state = cb.state_dict()
    cb.load_state_dict({"done": True})
    assert cb.done and state == {"done": False}


def test_findings_reset_at_each_fit(tmp_path):
    cb = Probe(Severity.INFO)
    _fit(tmp_path, cb)
    _fit(tmp_path, cb)
    assert cb.runs == 2 and len(cb.findings) == 1


def test_hook_registry_removes_all_handles():
    hooks = HookRegistry()
    layer = torch.nn.Linear(2, 2)
    hooks.forward(layer, lambda m, i, o: None)
    hooks.add(layer.register_full_backward_hook(lambda m, gi, go: None))
    assert len(hooks) == 2
    hooks.remove_all()
    assert not layer._forward_hooks and not layer._backward_hooks and len(hooks) == 0


def test_base_removes_hooks_on_exception(tmp_path):
    class Hooker(DiagnosticCallback):
        def on_train_start(self, trainer, pl_module):
            self.hooks.forward(pl_module.net[1], lambda m, i, o: None)

    class Boom(Classifier):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    model = Boom(mlp())
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [Hooker()], limit_val_batches=0).fit(model, loader(digits(64)))
    assert not model.net[1]._forward_hooks

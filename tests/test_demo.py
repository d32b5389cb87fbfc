"""The demo on a tiny budget: the recipe runs end to end, prints the table, writes the report."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import pytest
import torch

from lightning_diag import terminal
from lightning_diag.examples.demo import (
    BrokenDigitsDataModule,
    mis_scale_last_layer,
    recipe_callbacks,
    run_demo,
    tensorboard_command,
)
from lightning_diag.examples.digits import DigitsClassifier
from lightning_diag.findings import Finding, Severity, format_findings, sort_findings
from lightning_diag.presentation import title


def _tiny(tmp_path, capsys, inject, report=True):
    threads = torch.get_num_threads()
    result = run_demo(tmp_path / "runs", inject=inject, epochs=1, limit_batches=2,
                      progress_bar=False, report=report,
                      callbacks=recipe_callbacks(overfit_max_steps=10))
    assert torch.get_num_threads() == threads  # restored
    return result, capsys.readouterr().out


@pytest.mark.slow
def test_tiny_demo_prints_findings_and_writes_report(tmp_path, capsys):
    result, out = _tiny(tmp_path, capsys, inject=False)
    assert result.log_dir == tmp_path / "runs" / "clean" / "version_0"
    assert result.report is not None and result.report.is_file()
    html = result.report.read_text()
    assert "id='findings'" in html and "data:image/png;base64," in html
    assert result.findings and {f.check for f in result.findings} >= {
        "DataInspection", "GradientCheck", "InitialLossCheck", "OverfitSmallBatch"}
    assert out.index("Findings:") < out.index("TensorBoard:") < out.index("HTML report:")
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in out
    assert str(result.report) in out
    # With 10 overfitting steps the small-sample check cannot pass: FAIL listed first.
    assert "overfit.not_reached" in out
    assert out.index("[FAIL]") < out.index("[INFO]")


@pytest.mark.slow
def test_tiny_injected_demo_finds_the_planted_bugs(tmp_path, capsys):
    result, out = _tiny(tmp_path, capsys, inject=True, report=False)
    planted = {"data.exact_duplicate", "data.conflicting_labels", "data.leakage",
               "initial_loss.mismatch"}
    assert planted <= {f.code for f in result.findings if f.severity >= Severity.WARN}
    assert all(code in out for code in planted)
    assert result.log_dir.parent.name == "inject" and result.report is None
    assert "HTML report:" not in out
    # one diagnosis heads the findings, and no advice contradicts it: the update ratio (1.31)
    # and the divergence at step 1 say the learning rate is too high
    (diagnosis,) = [f for f in result.findings if f.code == "diagnosis.summary"]
    assert sort_findings(result.findings)[0] is diagnosis
    listed = {c["cause"]: c for c in diagnosis.details["causes"]}
    assert next(iter(listed)) == "data"
    assert {"update_ratio.too_high", "advisor.divergence"} <= set(listed["lr_high"]["evidence"])
    advice = [f.advice for f in result.findings if f.severity >= Severity.WARN
              and f.code != "diagnosis.summary"] + [c["next_step"] for c in listed.values()]
    assert not [a for a in advice if "raise the learning rate" in a.lower()]


@pytest.mark.slow
def test_demo_terminal_prints_each_finding_once_then_the_table(tmp_path, capsys, caplog,
                                                               monkeypatch):
    # as in a script without logging configured (pytest's capture handlers count as none)
    monkeypatch.setattr(terminal, "_handled_elsewhere", lambda record, mine: False)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # conftest quiets Lightning
    result = run_demo(tmp_path / "runs", inject=True, epochs=1, limit_batches=2,
                      progress_bar=False, report=False,
                      callbacks=recipe_callbacks(overfit_max_steps=10))
    out, err = capsys.readouterr()
    loud = [f for f in result.findings if f.severity >= Severity.WARN]
    assert loud
    for f in loud:  # once while training, one short line; once in the table at the end
        (line,) = [line for line in err.splitlines() if f" {f.code}" in line]
        assert line.startswith(f"[{f.severity.value.upper()}] {f.code}") and len(line) < 130
        assert out.count(f"] {title(f)}  (") == 1  # the code, and its subject if any
    assert "Advice" not in err and "base.py" not in err and out.count("Findings:") == 1
    lightning = [r.getMessage() for r in caplog.records if r.name.startswith("lightning.")]
    assert any("`Trainer.fit` stopped" in m for m in lightning)  # Lightning's own lines stay
    assert not [m for m in lightning if "Tip:" in m or "available:" in m]
    exe, flag, logdir = shlex.split(result.tensorboard_command)
    assert exe == "tensorboard" or Path(exe).is_file()
    assert flag == "--logdir" and logdir == str((tmp_path / "runs").resolve())
    assert f"TensorBoard:  {result.tensorboard_command}" in out


def test_tensorboard_command_is_absolute_and_names_the_venv_executable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exe = tmp_path / "venv" / "bin" / "tensorboard"
    exe.parent.mkdir(parents=True)
    exe.touch()
    monkeypatch.setattr(sys, "executable", str(exe.parent / "python"))
    assert tensorboard_command("runs/my demo") == (
        f"{exe} --logdir '{tmp_path / 'runs' / 'my demo'}'")
    exe.unlink()  # no tensorboard next to this Python: the one on the PATH
    assert tensorboard_command("runs").startswith("tensorboard --logdir /")


def test_broken_datamodule_plants_duplicates_and_leaks():
    dm = BrokenDigitsDataModule(duplicates=5, conflicting=2, leaks=3)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    assert len(x) == 1437 + 5 + 3
    assert torch.equal(x[1437:1442], x[:5])
    assert (y[1437:1439] != y[:2]).all() and torch.equal(y[1439:1442], y[2:5])
    assert torch.equal(x[-3:], dm.val_set.tensors[0][:3])
    with pytest.raises(ValueError, match="conflicting"):
        BrokenDigitsDataModule(duplicates=1, conflicting=2)
    with pytest.raises(ValueError, match="leaks"):
        BrokenDigitsDataModule(leaks=-1)


def test_mis_scale_last_layer_scales_only_the_last_linear():
    model = DigitsClassifier(arch="mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mis_scale_last_layer(model, factor=3.0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.6.weight", "net.6.bias"}
    torch.testing.assert_close(after["net.6.weight"], 3.0 * before["net.6.weight"])
    with pytest.raises(ValueError, match="nn.Linear"):
        mis_scale_last_layer(torch.nn.Conv2d(1, 1, 1))


def test_format_findings_orders_by_severity_with_advice():
    fs = [Finding("A", "a.info", Severity.INFO, "fine"),
          Finding("B", "b.fail", Severity.FAIL, "broken", advice="fix it"),
          Finding("C", "c.warn", Severity.WARN, "hmm")]
    text = format_findings(fs, width=80)
    assert text.splitlines()[0] == "Findings: 1 fail, 1 warn, 1 info"
    assert text.index("b.fail") < text.index("c.warn") < text.index("a.info")
    assert "advice: fix it" in text
    assert "(none)" in format_findings([], width=80)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"num_threads": 0}])
def test_run_demo_validates_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        run_demo(tmp_path, **kwargs)

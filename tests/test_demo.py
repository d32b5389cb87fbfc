"""The demo on a tiny budget: the recipe runs end to end, prints the table, writes the report."""

from __future__ import annotations

import pytest
import torch

from lightning_diag.examples.demo import (
    BrokenDigitsDataModule,
    mis_scale_last_layer,
    recipe_callbacks,
    run_demo,
)
from lightning_diag.examples.digits import DigitsClassifier
from lightning_diag.findings import Finding, Severity, format_findings


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

"""The run's one diagnosis: root causes in order, evidence, next steps, no contradiction."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_diag import diagnose, findings
from lightning_diag.base import DiagnosticCallback
from lightning_diag.callbacks import (
    ActivationHistogram,
    DataInspection,
    LRPlateauAdvisor,
    UpdateRatioMonitor,
)
from lightning_diag.checks.diagnosis import causes
from lightning_diag.findings import FINDINGS_FILE, Finding, Severity, sort_findings
from lightning_diag.tensorboard.tags import FINDINGS_TABLE
from tests.helpers import Classifier, digits, events, loader, mlp, text_events, trainer

W, F = Severity.WARN, Severity.FAIL


def finding(check, code, severity=W, advice="", **kw):
    return Finding(check, code, severity, f"{code} measured", advice=advice, **kw)


#: The findings of the demo's injected run, as they were before the diagnosis existed.
INJECTED = [
    finding("DataInspection", "data.exact_duplicate"),
    finding("DataInspection", "data.conflicting_labels"),
    finding("DataInspection", "data.leakage", F),
    finding("InitialLossCheck", "initial_loss.mismatch", F),
    finding("ActivationHistogram", "activations.dead_units", subject="net.5"),
    finding("ActivationHistogram", "activations.dead_units", subject="net.10"),
    finding("ActivationHistogram", "gradients.vanishing"),
    finding("UpdateRatioMonitor", "update_ratio.too_high"),
    finding("LRPlateauAdvisor", "advisor.divergence",
            details={"flagged_in_batch": {}, "data_checked": True}),
    finding("LRPlateauAdvisor", "advisor.underfit",
            advice="Underfitting: use a bigger model, train longer, perhaps raise the "
                   "learning rate."),
    Finding("GradientCheck", "gradient_check.ok", Severity.INFO, "fine"),
]


def test_the_injected_run_gets_one_diagnosis_without_contradiction():
    d = diagnose(INJECTED)
    assert d is not None and d.code == "diagnosis.summary" and d.check == "Diagnosis"
    assert d.severity is F and d.details["problems"] == 10
    listed = d.details["causes"]
    assert [c["cause"] for c in listed] == ["data", "initialization", "lr_high"]
    high = listed[2]
    assert high["evidence"] == ["update_ratio.too_high", "advisor.divergence"]
    # dead units and the vanishing gradient they cause are one problem, explained by the rate;
    # so is the underfitting, whose "raise the learning rate" would contradict it
    assert high["explains"] == ["activations.dead_units x2", "gradients.vanishing",
                                "advisor.underfit"]
    assert high["dropped"] == ['`advisor.underfit`: "perhaps raise the learning rate" is '
                               "dropped: the learning rate is already too high"]
    assert all("raise the learning rate" not in c["next_step"].lower() for c in listed)
    assert high["next_step"].startswith("Lower the learning rate about 10x")
    assert d.message.startswith("3 likely root causes, in the order to fix them: (1) The data")
    assert "[update_ratio.too_high, advisor.divergence; explains activations.dead_units x2" \
        in d.message
    assert d.advice.startswith("(1) Look at the data first (recipe 1): remove the duplicates; "
                               "fix the conflicting labels; take the leaked samples out")
    assert sort_findings([*INJECTED, d])[0] is d


def test_a_divergence_on_flagged_samples_is_the_data():
    found = [finding("DataInspection", "data.non_finite", F, indices=(37,)),
             finding("LRPlateauAdvisor", "advisor.divergence", F,
                     details={"flagged_in_batch": {"data.non_finite": [37]}})]
    (cause,) = causes(found)
    assert cause.key == "data" and [f.code for f in cause.evidence] == [
        "data.non_finite", "advisor.divergence"]
    assert "the loss diverged on flagged samples" in cause.next_step()


def test_a_divergence_alone_names_both_readings_of_the_recipe():
    (cause,) = causes([finding("LRPlateauAdvisor", "advisor.divergence",
                               details={"flagged_in_batch": {}, "data_checked": True})])
    assert cause.key == "lr_high" and "or the model is unstable" in cause.title()


def test_the_overfit_ladder_decides_between_the_rate_and_a_bug():
    def overfit(verdict, at=None):
        return finding("OverfitSmallBatch", "overfit.not_reached", W if at else F,
                       details={"ladder": {"verdict": verdict, "overfits_at": at, "steps": 80}})

    low = diagnose([overfit("lr_too_low", 1e-2), finding("UpdateRatioMonitor",
                                                         "update_ratio.too_low")])
    (cause,) = low.details["causes"]
    assert cause["cause"] == "lr_low" and cause["evidence"] == ["overfit.not_reached",
                                                                "update_ratio.too_low"]
    assert "to about 1e-02 where the overfit test memorizes its sample in 80 steps" in \
        cause["next_step"]
    (bug,) = diagnose([overfit("no_rate")]).details["causes"]
    assert bug["cause"] == "implementation" and "no learning rate overfits" in bug["next_step"]


def test_the_stronger_learning_rate_evidence_wins_and_says_what_it_drops():
    found = [finding("UpdateRatioMonitor", "update_ratio.too_high"),
             finding("LRPlateauAdvisor", "advisor.divergence", F),
             finding("X", "update_ratio.too_low"),
             finding("LRPlateauAdvisor", "advisor.plateau", advice="Decay the learning rate.")]
    (cause,) = causes(found)
    assert cause.key == "lr_high"
    assert [f.code for f in cause.explains] == ["update_ratio.too_low", "advisor.plateau"]
    assert cause.dropped == ["`update_ratio.too_low`: contradicted by the stronger evidence "
                             "that the learning rate is too high"]  # decaying agrees with it
    low = causes([finding("UpdateRatioMonitor", "update_ratio.too_low"),
                  finding("LRPlateauAdvisor", "advisor.plateau")])
    assert low[0].dropped == ['`advisor.plateau`: "decay the learning rate" is dropped: the '
                              "learning rate is already too low"]


def test_no_problem_no_diagnosis_and_one_check_alone_is_not_combined():
    assert diagnose([Finding("A", "a.ok", Severity.INFO, "fine"),
                     finding("A", "a.error"), finding("B", "b.skipped")]) is None
    one = [finding("DataInspection", "data.exact_duplicate"),
           finding("DataInspection", "data.conflicting_labels")]
    assert diagnose(one, min_checks=2) is None and diagnose(one) is not None
    (other,) = diagnose([finding("EMAWeights", "ema.non_finite", advice="Look.")]
                        ).details["causes"]
    assert other["cause"] == "other" and other["next_step"] == (
        "See each finding's advice: `ema.non_finite`: Look..")


class Broken(DiagnosticCallback):
    """A last diagnostic callback whose own on_fit_end fails: the diagnosis is made anyway."""

    slug = "broken"

    def on_fit_end(self, trainer, pl_module):
        raise RuntimeError("a bug of ours")


@pytest.mark.parametrize("last", ["advisor", "broken"])
def test_a_real_run_publishes_one_diagnosis_at_fit_end(tmp_path, last):
    torch.manual_seed(0)
    cbs = [DataInspection(max_images=1), ActivationHistogram(every_n_steps=2),
           UpdateRatioMonitor(every_n_steps=2), LRPlateauAdvisor(save_batch=False)]
    if last == "broken":
        cbs.append(Broken())
    t = trainer(tmp_path, cbs, max_epochs=1, limit_train_batches=8, limit_val_batches=0)
    t.fit(Classifier(mlp(), lr=50.0, optimizer="sgd"),
          loader(digits(256), batch_size=32, shuffle=False))
    found = findings(t)
    (d,) = [f for f in found if f.code == "diagnosis.summary"]
    assert d in cbs[-1].findings and not any(d in cb.findings for cb in cbs[:-1])
    assert "lr_high" in [c["cause"] for c in d.details["causes"]]
    assert sort_findings(found)[0] is d
    log_dir = tmp_path / "tb" / "version_0"
    records = [json.loads(line) for line in (log_dir / FINDINGS_FILE).read_text().splitlines()]
    assert [r["code"] for r in records].count("diagnosis.summary") == 1
    table = text_events(events(log_dir), FINDINGS_TABLE)[-1]
    assert table.index("diagnosis.summary") < table.index("update_ratio.too_high")

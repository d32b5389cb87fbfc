"""Every monitoring callback ends the fit with one INFO verdict ``<slug>.summary`` carrying its key
number, so that "ran and healthy" reads differently from "did not run"."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_diag.callbacks import (
    ActivationHistogram,
    EMAWeights,
    FirstLayerVisualization,
    LearningCurves,
    LRPlateauAdvisor,
    UpdateRatioMonitor,
)
from lightning_diag.findings import Finding, Severity
from tests.helpers import Classifier, cnn, digits, loader, trainer


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Finding]]:
    """A healthy tiny fit (2 epochs of 4 steps, validated) with every monitoring callback."""
    pl.seed_everything(0)
    cbs = [ActivationHistogram(every_n_steps=2), UpdateRatioMonitor(every_n_steps=2),
           EMAWeights(decay=0.9, evaluate="both"), LearningCurves(),
           FirstLayerVisualization(every_n_epochs=1), LRPlateauAdvisor(min_epochs=1)]
    t = trainer(tmp_path_factory.mktemp("verdicts"), cbs, max_epochs=2, limit_train_batches=4,
                limit_val_batches=1)
    t.fit(Classifier(cnn()), loader(digits(128)), loader(digits(32), shuffle=False))
    return {cb.slug: cb.findings for cb in cbs}


def _summary(found: list[Finding], slug: str) -> Finding:
    (summary,) = [f for f in found if f.code == f"{slug}.summary"]
    assert summary.severity is Severity.INFO
    assert found[-1] is summary  # the last word of the fit
    return summary


def test_activations_summary_names_the_worst_dead_layer(healthy):
    s = _summary(healthy["activations"], "activations")
    assert s.value is not None and 0.0 <= s.value <= 0.5 and s.expected == (0.0, 0.5)
    assert "4 logging step(s)" in s.message  # steps 0, 2, 4, 6
    assert "no bounded layer" in s.message and "gradient RMS ratio" in s.message


def test_update_ratio_summary_is_the_median_over_the_run_against_the_guide(healthy):
    s = _summary(healthy["update_ratio"], "update_ratio")
    medians = [m for _, m in s.details["medians"]]
    assert len(medians) == 5  # steps 0, 1, 2, 4, 6
    assert s.value == pytest.approx(sorted(medians)[2])
    assert "x the recipe's guide of about 0.001" in s.message


def test_ema_summary_compares_the_average_with_the_raw_weights(healthy):
    s = _summary(healthy["ema"], "ema")
    assert s.details["monitor"] == "val_acc"
    ema, raw = s.details["ema_vs_raw"]["val_acc"]
    assert s.value == pytest.approx(ema - raw)
    assert "`val_acc` EMA" in s.message and "`val_loss`" in s.message


def test_curves_summary_gives_the_last_loss_and_accuracy(healthy):
    s = _summary(healthy["curves"], "curves")
    assert s.message.startswith("Learning curves after 2 epoch(s): train loss")
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val"} <= set(s.details["last"])
    assert s.value == s.details["last"]["loss/val"]


def test_first_layer_summary_counts_the_filters_drawn(healthy):
    s = _summary(healthy["first_layer"], "first_layer")
    assert s.value == 8.0 and s.details["layer"] == "net.0 (Conv2d)"
    assert s.details["drawn_at"] == [4, 8]  # each epoch's end; the fit's end is the same step


def test_advisor_summary_states_its_plateau_counter(healthy):
    s = _summary(healthy["advisor"], "advisor")
    assert s.message.startswith("Plateau counter on `val_loss`: ")
    assert s.expected == (0.0, 3.0) and s.value is not None and 0 <= s.value <= 1

"""The model-family matrix: every callback on models nobody here tuned the library on.

For each family of ``tests/families.py`` (an image classifier, per-pixel segmentation, a token
language model whose ``forward`` takes two tensors, a recurrent language model carrying its hidden
state and trained with clipping, a regression on bare-tensor batches returning ``{"loss": ...}``,
a multi-label model, dict batches keyed as Hugging Face models expect with ``/`` metric names
through torchmetrics), with every callback attached and a second instance of the stateful ones:

* the fit completes, and no callback reports an internal error;
* the healthy variant gets no WARN or FAIL;
* the initial-loss finding carries the family's expectation;
* a broken variant (a scaled last layer, a detached layer) is flagged with the right code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import findings
from lightning_diag.base import DiagnosticCallback
from lightning_diag.callbacks import (
    ActivationHistogram,
    CheckpointEnsemble,
    DataInspection,
    EMAWeights,
    FirstLayerVisualization,
    GradientCheck,
    InitialLossCheck,
    LearningCurves,
    LRPlateauAdvisor,
    OverfitSmallBatch,
    TrainingInvariants,
    UpdateRatioMonitor,
)
from lightning_diag.findings import Finding, Severity
from tests.families import FAMILIES, Family

pytestmark = pytest.mark.slow


def _target_kw(family: Family) -> dict[str, Any]:
    return {} if family.batch_to_target is None else {"batch_to_target": family.batch_to_target}


def every_callback(family: Family) -> list[DiagnosticCallback]:
    return [
        DataInspection(max_images=2),
        InitialLossCheck(num_batches=2, **_target_kw(family)),
        GradientCheck(num_samples=2, coords_per_tensor=4),
        OverfitSmallBatch(num_batches=1, max_steps=400, progress_bar=False, **_target_kw(family)),
        LearningCurves(),
        ActivationHistogram(every_n_steps=4, figure_every_n_logs=0),
        FirstLayerVisualization(every_n_epochs=2),
        UpdateRatioMonitor(every_n_steps=4),
        TrainingInvariants(),
        LRPlateauAdvisor(save_batch=False),
        EMAWeights(decay=0.9, evaluate="both"),
        CheckpointEnsemble(k=2),
        # Second instances of stateful callbacks, with other arguments.
        EMAWeights(decay=0.99, evaluate="raw"),
        UpdateRatioMonitor(every_n_steps=3),
        ActivationHistogram(every_n_steps=5, figure_every_n_logs=0),
    ]


def fit(family: Family, callbacks: list[pl.Callback], tmp_path: Path, epochs: int = 3,
        ) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
        logger=TensorBoardLogger(str(tmp_path), name=family.name, version=0),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_train_batches=6, limit_val_batches=3, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path), **family.trainer_kwargs)
    trainer.fit(family.module, family.train, family.val)
    return trainer


def _serious(found: list[Finding]) -> list[str]:
    return [f.format() for f in found if f.severity >= Severity.WARN]


_HEALTHY: dict[str, list[Finding]] = {}


def _healthy(name: str, tmp_path_factory: pytest.TempPathFactory) -> list[Finding]:
    """One fit per family with every callback (cached: several tests read it)."""
    if name not in _HEALTHY:
        import torch

        torch.manual_seed(0)
        family = FAMILIES[name]()
        trainer = fit(family, every_callback(family), tmp_path_factory.mktemp(name))
        _HEALTHY[name] = findings(trainer)
    return _HEALTHY[name]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_healthy_family_completes_quietly(name: str,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    found = _healthy(name, tmp_path_factory)
    assert not [f for f in found if f.code.endswith(".error")]
    assert _serious(found) == []


@pytest.mark.parametrize("name", list(FAMILIES))
def test_initial_loss_carries_the_family_expectation(
        name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    found = _healthy(name, tmp_path_factory)
    (initial,) = [f for f in found if f.code in ("initial_loss.ok", "initial_loss.mismatch")]
    assert initial.code == "initial_loss.ok"
    expected = FAMILIES[name]().expected_initial_loss
    low, high = initial.expected  # type: ignore[misc]
    assert low <= expected <= high
    assert low <= initial.value <= high  # type: ignore[operator]


BROKEN: dict[str, tuple[str, Callable[[Family], list[DiagnosticCallback]]]] = {
    "scaled_last_layer": ("initial_loss.mismatch",
                          lambda f: [InitialLossCheck(num_batches=2, **_target_kw(f))]),
    "detached_layer": ("gradient_check.mismatch",
                       lambda f: [GradientCheck(num_samples=2, coords_per_tensor=4)]),
}


@pytest.mark.parametrize("bug", list(BROKEN))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_broken_family_is_flagged(name: str, bug: str, tmp_path: Path) -> None:
    code, callbacks = BROKEN[bug]
    family = FAMILIES[name](bug)
    trainer = fit(family, callbacks(family), tmp_path, epochs=1)
    assert code in {f.code for f in findings(trainer) if f.severity is Severity.FAIL}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_curves_and_advisor_find_the_metrics_the_family_logs(
        name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    found = _healthy(name, tmp_path_factory)
    train_loss, val_loss, val_acc = FAMILIES[name]().metric_names
    for code in ("curves.keys", "advisor.keys"):
        (keys,) = [f for f in found if f.code == code]
        assert keys.details["keys"]["train_loss"] == train_loss
        assert keys.details["keys"]["val_loss"] == val_loss
        assert keys.details["keys"].get("val_acc") == val_acc

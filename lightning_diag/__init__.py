"""lightning_diag: the "babysit your network" training recipe as PyTorch Lightning callbacks.

The names below are imported when first used (PEP 562), so that ``import lightning_diag`` and
the command line (``lightning-diag check`` reads JSON lines) do not wait for torch and
Lightning to load.

Example:
    >>> import lightning_diag as ld
    >>> callbacks = [ld.InitialLossCheck(), ld.GradientCheck(), ld.OverfitSmallBatch()]
    >>> [c.check_name for c in callbacks]
    ['InitialLossCheck', 'GradientCheck', 'OverfitSmallBatch']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_diag.base import DiagnosticCallback, findings
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
    from lightning_diag.checks.data.inspect import inspect_dataset
    from lightning_diag.checks.diagnosis import diagnose
    from lightning_diag.checks.gradients import check_gradients
    from lightning_diag.checks.initial_loss import check_initial_loss
    from lightning_diag.checks.overfit import OverfitResult, overfit_small_batch
    from lightning_diag.findings import (
        DiagnosticError,
        DiagnosticWarning,
        Finding,
        Severity,
        load_findings,
    )
    from lightning_diag.inference import (
        CheckpointLoadError,
        EnsembleModel,
        load_ema_weights,
        train_ensemble,
        train_top_configs,
    )

import lightning_diag.findings  # noqa: F401  (light; loaded now for the name below)

# `lightning_diag.findings` names the function `lightning_diag.base.findings` (trainer ->
# findings), as it always has; loading the submodule of that name set the attribute to the
# module, so it is dropped here and found, like every other name, by `__getattr__`.
del globals()["findings"]

__version__ = "0.1.0"

#: Where each public name lives.
_SOURCES = {
    "lightning_diag.base": ("DiagnosticCallback", "findings"),
    "lightning_diag.callbacks": (
        "ActivationHistogram", "CheckpointEnsemble", "DataInspection", "EMAWeights",
        "FirstLayerVisualization", "GradientCheck", "InitialLossCheck", "LearningCurves",
        "LRPlateauAdvisor", "OverfitSmallBatch", "TrainingInvariants", "UpdateRatioMonitor"),
    "lightning_diag.checks.data.inspect": ("inspect_dataset",),
    "lightning_diag.checks.diagnosis": ("diagnose",),
    "lightning_diag.checks.gradients": ("check_gradients",),
    "lightning_diag.checks.initial_loss": ("check_initial_loss",),
    "lightning_diag.checks.overfit": ("OverfitResult", "overfit_small_batch"),
    "lightning_diag.findings": ("DiagnosticError", "DiagnosticWarning", "Finding", "Severity",
                                "load_findings"),
    "lightning_diag.inference": ("CheckpointLoadError", "EnsembleModel", "load_ema_weights",
                                 "train_ensemble", "train_top_configs"),
}
_LAZY = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "ActivationHistogram",
    "CheckpointEnsemble",
    "CheckpointLoadError",
    "DataInspection",
    "DiagnosticCallback",
    "DiagnosticError",
    "DiagnosticWarning",
    "EMAWeights",
    "EnsembleModel",
    "Finding",
    "FirstLayerVisualization",
    "GradientCheck",
    "InitialLossCheck",
    "LRPlateauAdvisor",
    "LearningCurves",
    "OverfitResult",
    "OverfitSmallBatch",
    "Severity",
    "TrainingInvariants",
    "UpdateRatioMonitor",
    "check_gradients",
    "check_initial_loss",
    "diagnose",
    "findings",
    "inspect_dataset",
    "load_ema_weights",
    "load_findings",
    "overfit_small_batch",
    "train_ensemble",
    "train_top_configs",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_diag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

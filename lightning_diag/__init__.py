"""lightning_diag: the "babysit your network" training recipe as PyTorch Lightning callbacks.

Example:
    >>> import lightning_diag as ld
    >>> callbacks = [ld.InitialLossCheck(), ld.GradientCheck(), ld.OverfitSmallBatch()]
    >>> [c.check_name for c in callbacks]
    ['InitialLossCheck', 'GradientCheck', 'OverfitSmallBatch']
"""

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

__version__ = "0.1.0"

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

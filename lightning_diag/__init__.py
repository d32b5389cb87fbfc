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
    UpdateRatioMonitor,
)
from lightning_diag.callbacks.gradient_check import check_gradients
from lightning_diag.callbacks.initial_loss import check_initial_loss
from lightning_diag.callbacks.overfit import OverfitResult, overfit_small_batch
from lightning_diag.checkpoints import CheckpointLoadError
from lightning_diag.ensemble import EnsembleModel, train_ensemble, train_top_configs
from lightning_diag.findings import DiagnosticError, DiagnosticWarning, Finding, Severity
from lightning_diag.inference import load_ema_weights
from lightning_diag.inspection import inspect_dataset

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
    "UpdateRatioMonitor",
    "check_gradients",
    "check_initial_loss",
    "findings",
    "inspect_dataset",
    "load_ema_weights",
    "overfit_small_batch",
    "train_ensemble",
    "train_top_configs",
]

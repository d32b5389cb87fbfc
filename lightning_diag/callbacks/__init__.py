"""One Lightning callback per step of the recipe (see docs/workflow.md)."""

from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.callbacks.data_inspection import DataInspection
from lightning_diag.callbacks.ema import EMAWeights
from lightning_diag.callbacks.first_layer import FirstLayerVisualization
from lightning_diag.callbacks.gradient_check import GradientCheck
from lightning_diag.callbacks.initial_loss import InitialLossCheck
from lightning_diag.callbacks.invariants import TrainingInvariants
from lightning_diag.callbacks.learning_curves import LearningCurves
from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.callbacks.overfit import OverfitSmallBatch
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor

__all__ = [
    "ActivationHistogram",
    "CheckpointEnsemble",
    "DataInspection",
    "EMAWeights",
    "FirstLayerVisualization",
    "GradientCheck",
    "InitialLossCheck",
    "LRPlateauAdvisor",
    "LearningCurves",
    "OverfitSmallBatch",
    "TrainingInvariants",
    "UpdateRatioMonitor",
]

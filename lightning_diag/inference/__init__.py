"""Using what training produced, with or without a Trainer: checkpoint loading
(:mod:`.checkpoints`), ensembles (:mod:`.ensemble`) and EMA weights (:mod:`.ema`).

Example:
    >>> from lightning_diag.inference import EnsembleModel, load_ema_weights
    >>> callable(load_ema_weights)
    True
"""

from lightning_diag.inference.checkpoints import CheckpointLoadError
from lightning_diag.inference.ema import load_ema_weights
from lightning_diag.inference.ensemble import (
    EnsembleError,
    EnsembleModel,
    evaluate_members,
    train_ensemble,
    train_top_configs,
)

__all__ = [
    "CheckpointLoadError",
    "EnsembleError",
    "EnsembleModel",
    "evaluate_members",
    "load_ema_weights",
    "train_ensemble",
    "train_top_configs",
]

"""Side experiments that leave the main run bit-identical.

A side experiment (gradient check, overfit test, LR sweep) works on a deep copy of the module
(:mod:`.copies`) that sees a stand-in for the Trainer (:mod:`.trainer_view`), reads batches
through its own sequential loader over the training *dataset* (:mod:`.batches`: the user's
sampler and its generator are never advanced), optimizes the copy as the main run does
(:mod:`.optimization`) and restores every RNG stream in ``finally`` (:mod:`.rng`). Anything the
copy's ``training_step`` logs with ``self.log`` is dropped. Each module's docstring has a
runnable example.
"""

from lightning_diag.isolation.batches import first_batches, first_loader, train_dataloader_of
from lightning_diag.isolation.copies import StepState, clone_module, side_experiment
from lightning_diag.isolation.optimization import (
    OptimizationSettings,
    SideTraining,
    configured_optimizers,
    disable_regularization,
    fresh_optimizer,
    get_reg_strength,
    set_reg_strength,
)
from lightning_diag.isolation.rng import RNGState, preserved_generators, preserved_rng
from lightning_diag.isolation.trainer_view import TrainerView

__all__ = [
    "OptimizationSettings",
    "RNGState",
    "SideTraining",
    "StepState",
    "TrainerView",
    "clone_module",
    "configured_optimizers",
    "disable_regularization",
    "first_batches",
    "first_loader",
    "fresh_optimizer",
    "get_reg_strength",
    "preserved_generators",
    "preserved_rng",
    "set_reg_strength",
    "side_experiment",
    "train_dataloader_of",
]

"""One search trial: its Trainer, what ends it (Optuna's pruner, the diagnosis), DDP ranks.

Example:
    >>> fit_data(("train", "val"))
    {'train_dataloaders': 'train', 'val_dataloaders': 'val'}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag.findings import Finding
from lightning_diag.tuning.pruning import DiagnosisPruning, describe_end, trial_monitors
from lightning_diag.tuning.sweep import ModelFactory, build_model, quiet_trainer

__all__ = ["TrialSetup", "ValidationPruning", "fit_data", "fit_trial", "handed_trial",
           "objective"]


def fit_data(data: Any) -> dict[str, Any]:
    """``Trainer.fit`` keyword arguments for a datamodule or a ``(train, val)`` loader pair."""
    if isinstance(data, pl.LightningDataModule):
        return {"datamodule": data}
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return {"train_dataloaders": data[0], "val_dataloaders": data[1]}
    raise TypeError("`data` must be a LightningDataModule or a (train_loader, val_loader) pair, "
                    f"got {type(data).__name__}.")


class ValidationPruning(pl.Callback):
    """Reports ``monitor`` after each validation and stops the fit when Optuna says prune.

    Under DDP only rank 0 holds the trial (``trial`` is None on the others): its decision is
    broadcast, so that every rank stops at the same epoch.
    """

    def __init__(self, trial: Any, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.curve: list[float] = []
        self.pruned = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.curve.append(float(value))
        prune = False
        if self.trial is not None:
            self.trial.report(float(value), step=trainer.current_epoch)
            prune = bool(self.trial.should_prune())
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned = True
            trainer.should_stop = True


# Lightning's DDP launcher runs the user's script again for every other rank, and it does so at
# each fit: rank 0 names the trial it trains in this variable, which the new ranks inherit.
_HANDED_TRIAL = "LIGHTNING_DIAG_TRIAL"


def handed_trial() -> dict[str, Any] | None:
    """The trial rank 0 trains, in a process Lightning's DDP launcher started for another rank."""
    handed = os.environ.get(_HANDED_TRIAL)
    if handed is None or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return None
    return dict(json.loads(handed))


# what Lightning's launcher writes into rank 0's environment; left there, the next fit would
# take rank 0 for a process started by someone else and launch no other rank
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _handing(trial: dict[str, Any]) -> Iterator[None]:
    """Hand ``trial`` to the ranks a DDP fit launches; afterwards let the next trial launch its own
    (Lightning keeps the process group until the process exits, and marks the environment)."""
    before = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    was_distributed = _distributed()
    os.environ[_HANDED_TRIAL] = json.dumps(trial)
    try:
        yield
    finally:
        del os.environ[_HANDED_TRIAL]
        if not was_distributed and _distributed():
            torch.distributed.destroy_process_group()
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one search shares."""

    model_factory: ModelFactory
    data: Any
    run_dir: Path
    monitor: str
    max_epochs: int
    seed: int
    diagnose: bool
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def fit_trial(setup: TrialSetup, trial: Any, number: int, lr: float, weight_decay: float
              ) -> tuple[ValidationPruning, Finding | None, pl.Trainer]:
    """Train one trial; also return the finding that ended it, if the diagnosis did."""
    monitors = trial_monitors() if setup.diagnose else []
    diagnosis = [DiagnosisPruning(monitors)] if setup.diagnose else []
    pruning = ValidationPruning(trial, setup.monitor)
    logger = TensorBoardLogger(str(setup.run_dir), name="search", version=f"trial_{number}")
    trainer = quiet_trainer(max_epochs=setup.max_epochs, logger=logger,
                            callbacks=[*monitors, *diagnosis, pruning], **setup.trainer_kwargs)
    with _handing({"number": number, "lr": lr, "weight_decay": weight_decay}):
        trainer.fit(build_model(setup.model_factory, lr, weight_decay, setup.seed),
                    **fit_data(setup.data))
    return pruning, next((d.ended_by for d in diagnosis), None), trainer


def objective(optuna: Any, setup: TrialSetup, center_lr: float, lr_span: float,
              weight_decays: Sequence[float]) -> Callable[[Any], float]:
    """Optuna's objective: draw a configuration, train it, say how it ended.

    A trial the diagnosis ended, or Optuna's pruner, raises ``TrialPruned`` after recording
    what ended it (user attribute ``ended_by``); a completed one returns its last ``monitor``.
    """
    def run(trial: Any) -> float:
        lr = trial.suggest_float("lr", center_lr / lr_span, center_lr * lr_span, log=True)
        wd = trial.suggest_categorical("weight_decay", [float(w) for w in weight_decays])
        trial.set_user_attr("worker", os.getpid())
        pruning, ended, trainer = fit_trial(setup, trial, trial.number, lr, wd)
        trial.set_user_attr("curve", pruning.curve)
        trial.set_user_attr("steps", trainer.global_step)
        if ended is not None:
            why = describe_end(ended)
            trial.set_user_attr("ended_by", {
                "code": ended.code, "severity": ended.severity.name, "step": ended.step,
                "check": ended.check, "why": why})
            raise optuna.TrialPruned(why)
        if pruning.pruned:
            trial.set_user_attr("ended_by", {"code": "pruner"})
            raise optuna.TrialPruned()
        if not pruning.curve:
            raise ValueError(f"`{setup.monitor}` was never logged after validation; logged: "
                             f"{sorted(trainer.callback_metrics)}.")
        return pruning.curve[-1]

    return run

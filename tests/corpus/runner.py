"""Fit a corpus program with every callback of the library at its defaults, and read back
what they found; and its ground truth, measured without the library.

A program is its module, its data and the few Trainer arguments its recipe needs (epochs,
batch limits, precision, accumulation, clipping). Each module of the corpus also knows its own
ground truth (:class:`GroundTruth`): the loss it optimizes at its current weights and at a
know-nothing output, and a quality that training must improve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_diag import findings as trainer_findings
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

#: Findings derived from the others (the diagnosis restates them): never counted as alarms.
DERIVED = ("diagnosis.",)


def every_callback() -> list[DiagnosticCallback]:
    """Every callback of the library at its defaults (the README's quick start, all twelve);
    the overfit test's progress bar off only to keep the output quiet."""
    return [DataInspection(), GradientCheck(), InitialLossCheck(),
            OverfitSmallBatch(progress_bar=False), LearningCurves(), ActivationHistogram(),
            FirstLayerVisualization(), UpdateRatioMonitor(), LRPlateauAdvisor(), EMAWeights(),
            CheckpointEnsemble(), TrainingInvariants()]


class GroundTruth(Protocol):
    """What every corpus module knows about itself, computed in plain torch."""

    def ground_truth_loss(self, batch: Any) -> torch.Tensor:
        """The loss the program optimizes, at the current weights."""

    def know_nothing_loss(self, batch: Any) -> torch.Tensor:
        """The same loss with the model's output replaced by a know-nothing prediction."""


@dataclass
class Program:
    """One corpus program: how to build its module and its loaders, and how to train it."""

    name: str
    family: str
    #: What it is, in one line (the report's table shows it).
    about: str
    module: Callable[[], pl.LightningModule]
    data: Callable[[], tuple[DataLoader, DataLoader | None]]
    epochs: int = 6
    train_batches: int = 8
    val_batches: int = 2
    trainer: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def build(self) -> tuple[pl.LightningModule, DataLoader, DataLoader | None]:
        torch.manual_seed(self.seed)
        module = self.module()
        train, val = self.data()
        return module, train, val

    def trainer_for(self, root: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
        opts: dict[str, Any] = {
            "max_epochs": self.epochs, "accelerator": "cpu", "devices": 1,
            "callbacks": callbacks, "logger": TensorBoardLogger(str(root), name=self.name,
                                                                version=0),
            "limit_train_batches": self.train_batches, "limit_val_batches": self.val_batches,
            "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": False, "default_root_dir": str(root)}
        opts.update(self.trainer)
        return pl.Trainer(**opts)


@dataclass
class Run:
    """What a fit with every callback produced."""

    program: Program
    findings: list[Finding]
    seconds: float  #: wall-clock seconds of the fit
    cpu_seconds: float  #: CPU seconds of this process during the fit (every thread)
    #: The exception that ended the fit (the user's own code failing), if any.
    error: BaseException | None = None
    #: The callbacks, with what they kept (the overfit test's result, the monitors' series).
    callbacks: list[DiagnosticCallback] = field(default_factory=list)

    def alarms(self) -> list[Finding]:
        """Every WARN or FAIL finding (the diagnosis, which restates them, left out)."""
        return [f for f in self.findings
                if f.severity >= Severity.WARN and not f.code.startswith(DERIVED)]

    def codes(self, min_severity: Severity = Severity.WARN) -> set[str]:
        return {f.code for f in self.findings if f.severity >= min_severity}


def run(program: Program, root: Path) -> Run:
    """Fit ``program`` with :func:`every_callback` under ``root``; an exception of the user's
    code (a planted bug may crash the run) is kept, with what was found before it."""
    module, train, val = program.build()
    callbacks = every_callback()
    trainer = program.trainer_for(root, list(callbacks))
    start, cpu = time.perf_counter(), time.process_time()
    error: BaseException | None = None
    try:
        trainer.fit(module, train, val)
    except Exception as err:  # a planted bug may end the run: what was found still counts
        error = err
    return Run(program, trainer_findings(trainer), time.perf_counter() - start,
               time.process_time() - cpu, error, callbacks)


def describe(found: Iterable[Finding]) -> str:
    """One headline per finding, for an assertion message."""
    return "\n".join(f"  {f.headline()} [{f.check}]" for f in found) or "  (none)"


# --- ground truth --------------------------------------------------------------------------
@dataclass
class Truth:
    """A program's ground truth, measured without the library."""

    initial: float  #: the loss at initialization, mean over the first batches
    know_nothing: float  #: the loss at a know-nothing output, same batches
    quality_before: float  #: the program's quality measure (lower is better) before training
    quality_after: float  #: ... and after the program's own training run (a plain Trainer)

    @property
    def initial_matches(self) -> bool:
        """The initial loss is the know-nothing loss within the recipe's tolerance (10%,
        and 0.05 absolute for losses near 0): what recipe 3.1 asks of a healthy program."""
        return abs(self.initial - self.know_nothing) <= max(0.1 * abs(self.know_nothing), 0.05)

    @property
    def learns(self) -> bool:
        """Training lowered the quality measure by at least 10%."""
        return self.quality_after <= self.quality_before - 0.1 * abs(self.quality_before)


def _first_batches(loader: DataLoader, n: int) -> list[Any]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _mean(values: Iterable[torch.Tensor]) -> float:
    vals = [float(v) for v in values]
    return math.fsum(vals) / len(vals)


def quality(module: Any, batches: list[Any]) -> float:
    """The program's quality measure (its own ``quality`` or its loss), eval mode, no grad."""
    fn = getattr(module, "quality", module.ground_truth_loss)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return _mean(fn(b) for b in batches)
    finally:
        module.train(was)


def ground_truth(program: Program, root: Path, batches: int = 3) -> Truth:
    """Measure ``program``'s ground truth: its initial loss against its know-nothing loss on the
    first ``batches`` training batches, and its quality before and after a fit with a plain
    Trainer (no callback of the library)."""
    module, train, val = program.build()
    first = _first_batches(train, batches)
    with torch.no_grad():
        initial = _mean(module.ground_truth_loss(b) for b in first)  # type: ignore[operator]
        nothing = _mean(module.know_nothing_loss(b) for b in first)  # type: ignore[operator]
    before = quality(module, first)
    program.trainer_for(root, []).fit(module, train, val)
    return Truth(initial, nothing, before, quality(module, first))

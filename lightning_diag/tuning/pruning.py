"""Diagnosis-guided pruning: a search trial ends as soon as its monitor sees it is hopeless.

A trial of :func:`~lightning_diag.tuning.random_search` trains with a light monitor
(:func:`trial_monitors`). Whenever it publishes a finding that :func:`ends_trial` (any FAIL,
or a WARN whose code is in :data:`PRUNING_CODES`), :class:`DiagnosisPruning` stops the fit after
that step, before its first validation if need be, and keeps the finding: the search records it
on the Optuna trial (user attribute ``ended_by``), prints it in its table and writes it to the
trial's TensorBoard run.

Only irreversible evidence ends a trial: an update as large as the weights (or a non-finite
one, after a non-finite loss) and weights that stop moving altogether (a dead network). Each
rule was measured on a corpus of 660 trials (optimizers SGD, SGD with momentum, Adam, AdamW;
schedules none, warm-up, one-cycle, cosine; a tanh and a ReLU MLP, a CNN, a GRU;
``benchmarks/bench_pruning_rules.py``): neither ends a trial that, trained to its end, finishes
within 1 point of its search's best. Rules that did, or that a schedule can undo, are left to
Optuna's pruner: a loss that does not move in its first 30 steps (``advisor.stalled``, 33 such
trials: SGD with momentum at a small rate, a one-cycle or warm-up start), dead units, a finite
loss jump, and updates far below the weights (``update_ratio.too_low``: none ended, but the
start of a long warm-up or the end of a cosine schedule is that). Vanishing gradients ended no
would-be winner either, but watching activations costs every trial that runs to its end.

Example:
    >>> from lightning_diag.findings import Finding, Severity
    >>> ends_trial(Finding("UpdateRatioMonitor", "update_ratio.too_high", Severity.WARN, "..."))
    True
    >>> ends_trial(Finding("LRPlateauAdvisor", "advisor.stalled", Severity.WARN, "..."))
    False
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_diag.base import DiagnosticCallback
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.codes import CODES
from lightning_diag.findings import Finding, Severity
from lightning_diag.record import RunRecord
from lightning_diag.tensorboard.tags import TUNING_TRIAL_ENDED
from lightning_diag.tensorboard.writer import tensorboard_writer
from lightning_diag.validation import check_int, require

__all__ = ["PRUNING_CODES", "DiagnosisPruning", "describe_end", "ends_trial", "trial_monitors"]

#: WARN findings that end a search trial, with why such a trial is hopeless, read from the code
#: registry (:attr:`lightning_diag.codes.CodeSpec.ends_trial`, the one place it is declared):
#: irreversible evidence only (any FAIL ends a trial too). Measured on 660 trials of 33
#: searches (``benchmarks/results/pruning_rules.md``): neither ended a trial that finishes
#: within 1 point of its search's best (``advisor.stalled`` ended 33 such trials); the largest
#: update ratio such a trial reached was 0.44 (Adam's first step on the digits MLP at lr 3e-2).
#: A finite jump of the step loss (``advisor.divergence`` as a WARN) is not one either: the
#: digits MLP at lr 2.8e-2, batch 16, jumps at step 419 and ends at 0.933, its search's best.
PRUNING_CODES: dict[str, str] = {s.code: s.ends_trial for s in CODES if s.ends_trial}


def ends_trial(finding: Finding, codes: Mapping[str, str] = PRUNING_CODES) -> bool:
    """Whether ``finding`` ends a search trial: any FAIL, or a WARN with a code of ``codes``."""
    return finding.severity is Severity.FAIL or (
        finding.severity is Severity.WARN and finding.code in codes)


def describe_end(finding: Finding, codes: Mapping[str, str] = PRUNING_CODES) -> str:
    """One line: which finding ended a trial, at which step, and why that is hopeless.

    Example:
        >>> print(describe_end(Finding("UpdateRatioMonitor", "update_ratio.zero_updates",
        ...                            Severity.WARN, "Still.", step=7)))
        Ended at step 7 by `update_ratio.zero_updates` (no weight moves): Still.
    """
    why = codes.get(finding.code, f"a {finding.severity.name} finding")
    return f"Ended at step {finding.step} by `{finding.code}` ({why}): {finding.message}"


def trial_monitors(every_n_steps: int = 20) -> list[DiagnosticCallback]:
    """The light monitor of a search trial, set for a short run with a fixed configuration.

    One :class:`UpdateRatioMonitor` at steps 0, 1, 2, 4, 8, 16 and every ``every_n_steps``,
    findings only (``log_charts=False``): too high only at an update as large as the weight
    (``high = extreme = 1``; Adam's first step reaches 0.44 at a learning rate that trains
    well, the most any trial within 1 point of its search's best reached in the corpus), a
    non-finite update (the step after a non-finite loss) at once, and no weight moving for 3
    logged steps. The advisor (every step: a non-finite loss, which the next logged update
    shows too) and ActivationHistogram (vanishing gradients, from step 50, mostly on trials
    the median pruner ends after their second epoch) each cost a trial that runs to its end
    about 11% on the small tasks of the benchmark.

    Example:
        >>> [type(m).__name__ for m in trial_monitors()]
        ['UpdateRatioMonitor']
    """
    check_int("every_n_steps", every_n_steps)
    return [UpdateRatioMonitor(every_n_steps=every_n_steps, high=1.0, extreme=1.0,
                               log_charts=False)]


class DiagnosisPruning(DiagnosticCallback):
    """Stops the fit after the first training step where a monitor's finding :func:`ends_trial`.

    Under DDP rank 0's monitors decide and every rank stops at the same step. The finding is
    kept in :attr:`ended_by` and written as text to the run's TensorBoard (``6_tuning/
    trial_ended_by``); the monitors have already written it to the findings table. The
    validation Lightning would run after the stop is skipped (``limit_val_batches`` set to 0
    on this trainer): a part of an epoch does not compare with other trials, and the time is
    what the pruning is for. Like every callback of the library it runs under the guard: an
    error of its own becomes ``trial_pruning.error`` and the trial trains on, unpruned.

    Args:
        monitors: The diagnostic callbacks whose findings are read (attached to the same
            Trainer, before this callback).
        codes: WARN codes that end the trial (default :data:`PRUNING_CODES`).
        strict: Raise on an error of its own instead.

    Example:
        >>> monitors = trial_monitors()
        >>> trainer = pl.Trainer(callbacks=[*monitors, DiagnosisPruning(monitors)], logger=False)
    """

    slug = "trial_pruning"

    def __init__(self, monitors: Sequence[DiagnosticCallback],
                 codes: Mapping[str, str] = PRUNING_CODES, strict: bool = False) -> None:
        super().__init__(strict=strict)
        require(isinstance(monitors, Sequence) and all(
            isinstance(m, DiagnosticCallback) for m in monitors), "monitors", monitors,
            "a sequence of lightning_diag callbacks (e.g. `trial_monitors()`)", TypeError)
        require(isinstance(codes, Mapping), "codes", codes,
                "a mapping of finding codes to why they end a trial", TypeError)
        self.monitors, self.codes = list(monitors), dict(codes)
        self.ended_by: Finding | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.ended_by = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ended_by is None:
            self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        found = RunRecord.of(trainer).first(lambda f: ends_trial(f, self.codes), self.monitors)
        if trainer.world_size > 1:
            record = trainer.strategy.broadcast(found.to_dict() if found else None, src=0)
            found = Finding.from_dict(record) if record is not None else None
        if found is None:
            return
        self.ended_by = found
        trainer.should_stop = True
        trainer.limit_val_batches = 0
        writer = tensorboard_writer(trainer)
        if writer is not None:
            step = trainer.global_step if found.step is None else found.step
            writer.add_text(TUNING_TRIAL_ENDED, describe_end(found, self.codes), step)

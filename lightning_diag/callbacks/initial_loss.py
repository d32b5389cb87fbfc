"""Recipe step 3 as a callback: the initial-loss check of :mod:`lightning_diag.checks.initial_loss`,
run once at fit start on the first training batches.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks import InitialLossCheck
    >>> trainer = pl.Trainer(callbacks=[InitialLossCheck(num_batches=2)], logger=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_diag.base import FitStartCheck
from lightning_diag.batch import BatchFn, default_batch_to_target
from lightning_diag.checks.initial_loss import check_initial_loss, validate_arguments
from lightning_diag.findings import Finding
from lightning_diag.validation import check_int

__all__ = ["InitialLossCheck"]


class InitialLossCheck(FitStartCheck):
    """Initial-loss sanity check (recipe step 3) on the first ``num_batches`` training batches.

    See :func:`check_initial_loss` for the arguments and the expectation: the module's own
    loss at a know-nothing prediction (zero logits, uniform probabilities, zero values, every
    head), explained by the recipe's closed form where it agrees (``log C`` for classifiers of
    any output shape, ``log 2`` per label, ``mean(y^2)`` for a mean squared error). Runs once
    at fit start, forward only.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[InitialLossCheck(num_batches=2)], logger=False)
    """

    slug = "initial_loss"

    def __init__(self, num_batches: int = 3, num_classes: int | None = None,
                 expected_loss: float | None = None, rel_tol: float = 0.1, abs_tol: float = 0.05,
                 reg_attr: str | None = None, reg_strengths: Sequence[float] | None = None,
                 batch_to_target: BatchFn = default_batch_to_target, strict: bool = False) -> None:
        super().__init__(strict=strict)
        check_int("num_batches", num_batches)
        self.num_batches = num_batches
        self.options: dict[str, Any] = {
            "num_classes": num_classes, "expected_loss": expected_loss, "rel_tol": rel_tol,
            "abs_tol": abs_tol, "reg_attr": reg_attr, "reg_strengths": reg_strengths,
            "batch_to_target": batch_to_target}
        validate_arguments(**self.options)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_batches=self.num_batches, **self.options)

    @override
    def run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        batches, skipped = self.fit_start_batches(trainer, pl_module, self.num_batches)
        if skipped:
            return skipped
        return check_initial_loss(pl_module, batches, **self.options)

"""Recipe step 4 as a callback: the overfit test of :mod:`lightning_diag.checks.overfit`, run
once at fit start on a copy of the module.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks import OverfitSmallBatch
    >>> trainer = pl.Trainer(callbacks=[OverfitSmallBatch(max_steps=300)], logger=False)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_diag.base import FitStartCheck
from lightning_diag.batch import BatchFn, default_batch_to_target
from lightning_diag.checks.overfit import OverfitResult, overfit_batches, validate_arguments
from lightning_diag.findings import Finding
from lightning_diag.isolation import OptimizationSettings
from lightning_diag.tensorboard.tags import (
    OVERFIT_ACCURACY,
    OVERFIT_LOSS,
    overfit_ladder,
    overfit_ladder_layout,
)
from lightning_diag.tensorboard.writer import log_scalars, merge_custom_scalars, tensorboard_writer
from lightning_diag.validation import check_flag, check_int

__all__ = ["OverfitSmallBatch"]


class OverfitSmallBatch(FitStartCheck):
    """Overfit-a-small-sample test (recipe step 4), once at fit start, on a copy.

    See :func:`overfit_small_batch` for the arguments. The copy trains as the Trainer does:
    its gradient clipping, gradient accumulation and precision are read once
    (:meth:`OptimizationSettings.from_trainer`), the learning rate is the one the module's
    ``configure_optimizers`` sets. The curve goes to the loggers as
    ``4_overfit/loss`` and ``4_overfit/accuracy`` (x axis: overfit steps); a progress bar
    shows while it runs unless the trainer's progress bar is off or ``progress_bar=False``.
    The loss's own floor is measured at memorising outputs (a squashed output is shown, label
    smoothing accounted for) and a loss that stops far below the best constant output has met
    a floor of the data (``overfit.floor``, INFO); a run that ends just short of the target with
    its loss still falling steadily is slow, not stuck (``overfit.slow``, INFO: the projected
    steps). When the configured learning rate cannot overfit the sample and neither explains
    it, the ladder of other rates (``lr_ladder``, see
    :func:`~lightning_diag.checks.overfit.ladder_rates`) writes one loss curve per rate, drawn
    on one chart with the configured rate's.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[OverfitSmallBatch(max_steps=300)], logger=False)
    """

    slug = "overfit"

    def __init__(self, num_batches: int = 5, max_steps: int = 1000, loss_fraction: float = 0.05,
                 reg_attr: str | None = None, batch_to_target: BatchFn = default_batch_to_target,
                 progress_bar: bool = True, lr_ladder: bool = True,
                 strict: bool = False) -> None:
        super().__init__(strict=strict)
        check_int("num_batches", num_batches)
        self.options: dict[str, Any] = {
            "max_steps": max_steps, "loss_fraction": loss_fraction,
            "reg_attr": reg_attr, "batch_to_target": batch_to_target, "lr_ladder": lr_ladder}
        validate_arguments(**self.options)
        check_flag("progress_bar", progress_bar)
        self.progress_bar = progress_bar
        self.num_batches = num_batches
        self.result: OverfitResult | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_batches=self.num_batches, **self.options)

    @override
    def run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        batches, skipped = self.fit_start_batches(trainer, pl_module, self.num_batches)
        if skipped:
            return skipped
        try:
            settings = OptimizationSettings.from_trainer(trainer)
        except ValueError as err:  # a precision plugin the copy cannot reproduce
            return [self.skipped(trainer, f"the run's optimization cannot be reproduced: {err}")]
        show = (self.progress_bar and trainer.progress_bar_callback is not None
                and trainer.is_global_zero)
        self.result = overfit_batches(
            pl_module, batches, settings=settings, progress_bar=show,
            on_pass=lambda step, loss, acc: self._log_point(trainer, step, loss, acc),
            on_ladder_pass=lambda lr, step, loss, _: log_scalars(
                trainer, {overfit_ladder(lr): loss}, step),
            **self.options)
        writer = tensorboard_writer(trainer)
        if self.result.ladder and writer is not None:
            merge_custom_scalars(writer, *overfit_ladder_layout(
                [overfit_ladder(r.lr) for r in self.result.ladder if r.lr is not None]))
        return self.result.findings()

    @staticmethod
    def _log_point(trainer: pl.Trainer, step: int, loss: float, acc: float | None) -> None:
        point = {OVERFIT_LOSS: loss}
        if acc is not None:
            point[OVERFIT_ACCURACY] = acc
        log_scalars(trainer, point, step)

"""Recipe step 2 as a callback: the gradient check of :mod:`lightning_diag.checks.gradients`,
run once at fit start on the first training batch.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks import GradientCheck
    >>> trainer = pl.Trainer(callbacks=[GradientCheck(coords_per_tensor=5)], logger=False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_diag.base import FitStartCheck
from lightning_diag.checks.gradients import check_gradients, error_table, validate_arguments
from lightning_diag.findings import Finding
from lightning_diag.tensorboard.tags import GRADIENT_CHECK_ERRORS
from lightning_diag.tensorboard.writer import tensorboard_writer

__all__ = ["GradientCheck"]


class GradientCheck(FitStartCheck):
    """Gradient check (recipe step 2) on a float64 copy, once at fit start.

    See :func:`check_gradients` for the arguments, the counts behind an "ok" and the
    ``gradient_check.inconclusive`` cases (a loss that is not reproducible, too few
    comparisons). The per-tensor table goes to TensorBoard as
    text under ``2_gradient_check/errors``; the worst error is the finding's value.

    Example:
        >>> import lightning.pytorch as pl
        >>> cb = GradientCheck(coords_per_tensor=5)
        >>> trainer = pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False)
    """

    slug = "gradient_check"

    def __init__(self, num_samples: int = 4, coords_per_tensor: int | None = None,
                 direction: bool = True, h: float | None = None,
                 tolerance: float | None = None, kinks: bool | None = None, seed: int = 0,
                 reset: Callable[[pl.LightningModule], Any] | None = None,
                 strict: bool = False) -> None:
        super().__init__(strict=strict)
        self.options: dict[str, Any] = {
            "num_samples": num_samples, "coords_per_tensor": coords_per_tensor,
            "direction": direction, "h": h, "tolerance": tolerance, "kinks": kinks, "seed": seed,
            "reset": reset}
        validate_arguments(**self.options)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.options)

    @override
    def run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        batches, skipped = self.fit_start_batches(trainer, pl_module, 1)
        if skipped:
            return skipped
        found = check_gradients(pl_module, batches[0], **self.options)
        self._log_table(trainer, found)
        return found

    def _log_table(self, trainer: pl.Trainer, found: list[Finding]) -> None:
        table = found[0].details.get("table")
        if not table:
            return
        if self.require_tensorboard(trainer, "the gradient-check table"):
            writer = tensorboard_writer(trainer)
            assert writer is not None  # require_tensorboard said so
            writer.add_text(GRADIENT_CHECK_ERRORS, error_table(table), trainer.global_step)

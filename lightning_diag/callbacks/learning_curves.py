"""Loss and accuracy against epochs, train and val on one chart (steps 5.1 and 5.2 of the recipe).

The logged train/val loss and accuracy are found by the names people use (``val_loss``,
``val/loss``, ``valid_loss_epoch``, ``val/acc``...; see :mod:`.._metric_keys`); a name given
explicitly wins.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.learning_curves import LearningCurves
    >>> trainer = pl.Trainer(callbacks=[LearningCurves(train_acc="acc")], logger=False)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag.base import DiagnosticCallback
from lightning_diag.callbacks._metric_keys import DESCRIPTIONS, MetricKeys
from lightning_diag.findings import Severity
from lightning_diag.tensorboard.figures import curves_figure
from lightning_diag.tensorboard.tags import CURVES_FIGURE, curve, curves_layout
from lightning_diag.tensorboard.writer import (
    log_figure,
    log_scalars,
    merge_custom_scalars,
    tensorboard_writer,
)
from lightning_diag.validation import check_int, check_str

__all__ = ["LearningCurves"]

#: The role (see ``_metric_keys.ROLES``) each curve draws.
SERIES = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_acc",
          "accuracy/val": "val_acc"}


class LearningCurves(DiagnosticCallback):
    """Re-log the user's epoch metrics with the epoch as x-axis, train and val side by side.

    At each training epoch end it reads the metrics the module logged and writes
    ``diag/curves/loss/{train,val}``, ``diag/curves/accuracy/{train,val}`` and
    ``diag/curves/accuracy/gap`` (train minus val) with ``step = epoch``; a TensorBoard
    custom-scalars layout ("learning curves") draws train and val on one chart. A matplotlib
    figure of both (``diag/curves/figure`` and ``learning_curves.png``) is drawn at the end of
    training and every ``figure_every_n_epochs``. Each metric is found among the logged names
    by the usual conventions (``_`` or ``/`` separators, ``val``/``valid``/``validation``,
    ``acc``/``accuracy``, an ``_epoch`` suffix), unless its name is given. One INFO finding
    ``curves.keys`` says which names were used; the ones no convention finds give one INFO
    finding ``curves.missing_keys``. Validation values are used only in epochs where
    validation ran.

    Args:
        train_loss / val_loss / train_acc / val_acc: Names of the logged metrics; None (the
            default) finds each by convention. A given name is also read as ``<name>_epoch``.
        figure_every_n_epochs: Also draw the figure every this many epochs; 0: only at the end.
        strict: Raise on FAIL findings (this callback emits only INFO).

    Example:
        >>> cb = LearningCurves(val_loss="valid/loss", figure_every_n_epochs=5)
    """

    slug = "curves"

    def __init__(self, train_loss: str | None = None, val_loss: str | None = None,
                 train_acc: str | None = None, val_acc: str | None = None,
                 figure_every_n_epochs: int = 0, strict: bool = False) -> None:
        super().__init__(strict=strict)
        given = {"train_loss": train_loss, "val_loss": val_loss, "train_acc": train_acc,
                 "val_acc": val_acc}
        for arg, key in given.items():
            check_str(arg, key, optional=True)
        check_int("figure_every_n_epochs", figure_every_n_epochs, low=0)
        self.given = given
        self.keys = MetricKeys(given)
        self.figure_every_n_epochs = figure_every_n_epochs
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._reported_missing: set[str] = set()
        self._val_ran = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.given)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_ran = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    def _lookup(self, metrics: dict[str, Any], series: str) -> float | None:
        value = metrics.get(self.keys.used.get(SERIES[series], ""))
        return float(value) if isinstance(value, (torch.Tensor, int, float)) else None

    def _record(self, trainer: pl.Trainer) -> None:
        epoch, metrics = trainer.current_epoch, trainer.callback_metrics
        wanted = [s for s in SERIES if s.endswith("train") or self._val_ran]
        self._val_ran = False
        new = self.keys.resolve(metrics, [SERIES[s] for s in wanted])
        if new:  # on every rank (same names everywhere), so that findings agree across ranks
            self._report_keys(trainer, list(new))
        values = {s: self._lookup(metrics, s) for s in wanted}
        found = {s: v for s, v in values.items() if v is not None}
        if "accuracy/train" in found and "accuracy/val" in found:
            found["accuracy/gap"] = found["accuracy/train"] - found["accuracy/val"]
        for series, value in found.items():
            self.history.setdefault(series, []).append((epoch, value))
        log_scalars(trainer, {curve(s): v for s, v in found.items()}, epoch)
        self._report_missing(trainer, self.keys.missing_roles(SERIES[s] for s in wanted),
                             sorted(metrics))
        writer = tensorboard_writer(trainer)
        if writer is not None:
            merge_custom_scalars(writer, *curves_layout())
        n = self.figure_every_n_epochs
        if n and (epoch + 1) % n == 0:
            self._figure(trainer)

    def _report_keys(self, trainer: pl.Trainer, roles: list[str]) -> None:
        self.publish(trainer, [self.finding(
            trainer, f"{self.slug}.keys", Severity.INFO,
            f"Learning curves read {self.keys.describe(roles)}.",
            advice="Pass the name to use, e.g. `LearningCurves(val_acc='val/top1')`, if another "
                   "metric is meant.",
            details={"keys": {role: self.keys.used[role] for role in roles},
                     "given": [role for role in roles if self.given[role]]})])

    def _report_missing(self, trainer: pl.Trainer, roles: list[str],
                        available: list[str]) -> None:
        new = [r for r in roles if r not in self._reported_missing]
        if not new:  # on every rank (same keys everywhere), so that findings agree across ranks
            return
        self._reported_missing.update(new)
        what = [f"`{self.given[r]}` (given)" if self.given[r] else
                f"the {DESCRIPTIONS[r]} (under any common name, e.g. `{r}`)" for r in new]
        self.publish(trainer, [self.finding(
            trainer, f"{self.slug}.missing_keys", Severity.INFO,
            f"Not logged: {', '.join(what)} (logged: {available}); their curves are skipped.",
            advice="Log them with `self.log(name, value, on_epoch=True)` or pass the names "
                   "you use, e.g. `LearningCurves(val_acc='val/top5')`.",
            details={"missing": [self.given[r] or r for r in new], "available": available})])

    def _figure(self, trainer: pl.Trainer) -> None:
        if self.history and self.require_tensorboard(trainer, "learning-curve figure"):
            log_figure(trainer, CURVES_FIGURE, curves_figure(self.history),
                       trainer.current_epoch, png_name="learning_curves.png")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._figure(trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.history, self._reported_missing, self._val_ran = {}, set(), False
            self.keys = MetricKeys(self.given)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [(int(e), float(v)) for e, v in pts]
                        for k, pts in state_dict.get("history", {}).items()}

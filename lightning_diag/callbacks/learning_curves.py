"""Loss and accuracy against epochs, train and val on one chart (steps 5.1 and 5.2 of the recipe).

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


class LearningCurves(DiagnosticCallback):
    """Re-log the user's epoch metrics with the epoch as x-axis, train and val side by side.

    At each training epoch end it reads the metrics the module logged and writes
    ``diag/curves/loss/{train,val}``, ``diag/curves/accuracy/{train,val}`` and
    ``diag/curves/accuracy/gap`` (train minus val) with ``step = epoch``; a TensorBoard
    custom-scalars layout ("learning curves") draws train and val on one chart. A matplotlib
    figure of both (``diag/curves/figure`` and ``learning_curves.png``) is drawn at the end of
    training and every ``figure_every_n_epochs``. A key logged with ``on_step=True`` and
    ``on_epoch=True`` is found under ``<key>_epoch``. Validation values are used only in epochs
    where validation ran. Keys that are not found give one INFO finding ``curves.missing_keys``.

    Args:
        train_loss / val_loss / train_acc / val_acc: Names of the logged metrics.
        figure_every_n_epochs: Also draw the figure every this many epochs; 0: only at the end.
        strict: Raise on FAIL findings (this callback emits only INFO).

    Example:
        >>> cb = LearningCurves(val_loss="valid/loss", figure_every_n_epochs=5)
    """

    slug = "curves"

    def __init__(self, train_loss: str = "train_loss", val_loss: str = "val_loss",
                 train_acc: str = "train_acc", val_acc: str = "val_acc",
                 figure_every_n_epochs: int = 0, strict: bool = False) -> None:
        super().__init__(strict=strict)
        keys = {"train_loss": train_loss, "val_loss": val_loss, "train_acc": train_acc,
                "val_acc": val_acc}
        for arg, key in keys.items():
            check_str(arg, key)
        check_int("figure_every_n_epochs", figure_every_n_epochs, low=0)
        self.keys = {"loss/train": train_loss, "loss/val": val_loss,
                     "accuracy/train": train_acc, "accuracy/val": val_acc}
        self.figure_every_n_epochs = figure_every_n_epochs
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._reported_missing: set[str] = set()
        self._val_ran = False

    @property
    @override
    def state_key(self) -> str:
        k = self.keys
        return self._generate_state_key(train_loss=k["loss/train"], val_loss=k["loss/val"],
                                        train_acc=k["accuracy/train"], val_acc=k["accuracy/val"])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_ran = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    def _lookup(self, metrics: dict[str, Any], key: str) -> float | None:
        for name in (key, f"{key}_epoch"):
            value = metrics.get(name)
            if isinstance(value, (torch.Tensor, int, float)):
                return float(value)
        return None

    def _record(self, trainer: pl.Trainer) -> None:
        epoch, metrics = trainer.current_epoch, trainer.callback_metrics
        wanted = [s for s in self.keys if s.endswith("train") or self._val_ran]
        self._val_ran = False
        values = {s: self._lookup(metrics, self.keys[s]) for s in wanted}
        found = {s: v for s, v in values.items() if v is not None}
        if "accuracy/train" in found and "accuracy/val" in found:
            found["accuracy/gap"] = found["accuracy/train"] - found["accuracy/val"]
        for series, value in found.items():
            self.history.setdefault(series, []).append((epoch, value))
        log_scalars(trainer, {curve(s): v for s, v in found.items()}, epoch)
        self._report_missing(trainer, [self.keys[s] for s, v in values.items() if v is None],
                             sorted(metrics))
        writer = tensorboard_writer(trainer)
        if writer is not None:
            merge_custom_scalars(writer, *curves_layout())
        n = self.figure_every_n_epochs
        if n and (epoch + 1) % n == 0:
            self._figure(trainer)

    def _report_missing(self, trainer: pl.Trainer, missing: list[str],
                        available: list[str]) -> None:
        new = [k for k in missing if k not in self._reported_missing]
        if not new:  # on every rank (same keys everywhere), so that findings agree across ranks
            return
        self._reported_missing.update(new)
        self.publish(trainer, [self.finding(
            trainer, f"{self.slug}.missing_keys", Severity.INFO,
            f"Metrics {new} were not logged (logged: {available}); their curves are skipped.",
            advice="Log them with `self.log(name, value, on_epoch=True)` or pass the names "
                   "you use, e.g. `LearningCurves(val_acc='val/accuracy')`.",
            details={"missing": new, "available": available})])

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

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [(int(e), float(v)) for e, v in pts]
                        for k, pts in state_dict.get("history", {}).items()}

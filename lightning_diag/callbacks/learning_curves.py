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

from lightning_diag.callbacks._metric_keys import DESCRIPTIONS, MetricKeys
from lightning_diag.callbacks._monitor import ConfiguredCallback
from lightning_diag.checks.curves import CurvesConfig, curves_summary
from lightning_diag.findings import Severity
from lightning_diag.tensorboard.figures import curves_figure
from lightning_diag.tensorboard.tags import (
    CURVES_FIGURE,
    CURVES_GAP,
    TRAIN_RUN,
    VALIDATION_RUN,
    curve,
    learning_rate,
)
from lightning_diag.tensorboard.writer import SiblingRuns, log_figure, log_scalars
from lightning_diag.validation import from_arguments

__all__ = ["LearningCurves"]

#: The role (see ``_metric_keys.ROLES``) each curve draws.
SERIES = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_acc",
          "accuracy/val": "val_acc"}
#: The sibling run of each split: train and val of one quantity share a chart, two colours.
_RUNS = {"train": TRAIN_RUN, "val": VALIDATION_RUN}


class LearningCurves(ConfiguredCallback):
    """Re-log the user's epoch metrics with the epoch as x-axis, train and val side by side.

    At each training epoch end it reads the metrics the module logged and writes the tags
    ``0_curves/loss`` and ``0_curves/accuracy`` with ``step = epoch``, the training value in the
    sibling run ``train`` and the validation value in ``validation`` (sub-directories of the log
    directory), so that every TensorBoard dashboard draws train and val on one chart in two
    colours; ``0_curves/train_minus_val_accuracy`` in the run itself; and the learning rate of
    each optimizer's parameter group as each epoch starts,
    ``0_curves/learning_rate/<optimizer>``. A matplotlib figure of both (``0_curves/overview``
    and ``learning_curves.png``) is drawn at the end of training and every
    ``figure_every_n_epochs``. Each metric is found among the logged names
    by the usual conventions (``_`` or ``/`` separators, ``val``/``valid``/``validation``,
    ``acc``/``accuracy``, an ``_epoch`` suffix), unless its name is given. One INFO finding
    ``curves.keys`` says which names were used; the ones no convention finds give one INFO
    finding ``curves.missing_keys``. Validation values are used only in epochs where
    validation ran. At the end of training, one INFO verdict ``curves.summary``: the last
    train/val loss and accuracy.

    Args:
        train_loss / val_loss / train_acc / val_acc: Names of the logged metrics; None (the
            default) finds each by convention. A given name is also read as ``<name>_epoch``.
        figure_every_n_epochs: Also draw the figure every this many epochs; 0: only at the end.
        strict: Raise on FAIL findings (this callback emits only INFO).

    Example:
        >>> cb = LearningCurves(val_loss="valid/loss", figure_every_n_epochs=5)
    """

    slug = "curves"
    config_type = CurvesConfig
    config: CurvesConfig

    def __init__(self, train_loss: str | None = None, val_loss: str | None = None,
                 train_acc: str | None = None, val_acc: str | None = None,
                 figure_every_n_epochs: int = 0, strict: bool = False) -> None:
        super().__init__(from_arguments(CurvesConfig, locals()), strict=strict)
        self.keys = MetricKeys(self.given)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._reported_missing: set[str] = set()
        self._val_ran = False
        self._runs = SiblingRuns()

    @property
    def given(self) -> dict[str, str | None]:
        """The metric names given, by role (None: found by convention)."""
        return self.config.given

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_ran = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_learning_rates(trainer)

    def _log_learning_rates(self, trainer: pl.Trainer) -> None:
        """The learning rate of every optimizer's parameter group as the epoch starts (step =
        epoch; an epoch's scheduler step comes before its end), beside the curves: what the
        diagnosis often blames, as the run set it."""
        rates, seen = {}, dict[str, int]()
        optimizers = trainer.optimizers
        for optimizer in optimizers:
            kind = type(optimizer).__name__
            same = sum(type(o).__name__ == kind for o in optimizers)
            name = f"{kind}_{seen.get(kind, 0)}" if same > 1 else kind
            seen[kind] = seen.get(kind, 0) + 1
            groups = optimizer.param_groups
            for j, group in enumerate(groups):
                if isinstance(group.get("lr"), (int, float, torch.Tensor)):
                    rates[learning_rate(f"{name}.group{j}" if len(groups) > 1 else name)] = (
                        float(group["lr"]))
        log_scalars(trainer, rates, trainer.current_epoch)

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
        by_run: dict[str, dict[str, float]] = {}
        for series, value in found.items():
            quantity, split = series.split("/")
            by_run.setdefault(_RUNS[split], {})[curve(quantity)] = value
        self._runs.log(trainer, by_run, epoch)
        if "accuracy/train" in found and "accuracy/val" in found:
            found["accuracy/gap"] = found["accuracy/train"] - found["accuracy/val"]
            log_scalars(trainer, {CURVES_GAP: found["accuracy/gap"]}, epoch)
        for series, value in found.items():
            self.history.setdefault(series, []).append((epoch, value))
        self._report_missing(trainer, self.keys.missing_roles(SERIES[s] for s in wanted),
                             sorted(metrics))
        n = self.config.figure_every_n_epochs
        if n and (epoch + 1) % n == 0:
            self._figure(trainer)

    def _report_keys(self, trainer: pl.Trainer, roles: list[str]) -> None:
        self.publish(trainer, [self.finding(
            trainer, f"{self.slug}.keys", Severity.INFO,
            f"Learning curves read {self.keys.describe(roles)}.",
            advice="Pass the name to use, e.g. `LearningCurves(val_acc='val/top1')`, if another "
                   "metric is meant.",
            details={"keys": {role: self.keys.used[role] for role in roles},
                     "given": [role for role in roles if self.given[role]]},
            subject=",".join(roles))])

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
            details={"missing": [self.given[r] or r for r in new], "available": available},
            subject=",".join(new))])

    def _figure(self, trainer: pl.Trainer) -> None:
        if self.history and self.require_tensorboard(trainer, "learning-curve figure"):
            log_figure(trainer, CURVES_FIGURE, curves_figure(self.history),
                       trainer.current_epoch, png_name="learning_curves.png")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish_verdicts(trainer, [curves_summary(self.history)])
        self._figure(trainer)

    @override
    def _release(self) -> None:
        super()._release()
        self._runs.close()

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

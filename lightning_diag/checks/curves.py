"""The arguments of :class:`~lightning_diag.callbacks.learning_curves.LearningCurves` (recipe 5.1
and 5.2) and its verdict on what it recorded: the last value of each curve.

Example:
    >>> history = {"loss/train": [(0, 2.3), (1, 1.1)], "loss/val": [(0, 2.2), (1, 1.3)]}
    >>> curves_summary(history).message
    'Learning curves after 2 epoch(s): train loss 1.1, val loss 1.3.'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from lightning_diag.checks.verdict import Verdict
from lightning_diag.findings import Severity
from lightning_diag.validation import argument, check_int, check_str, validate_arguments

__all__ = ["SERIES_NAMES", "CurvesConfig", "curves_summary"]

#: Each recorded series in words.
SERIES_NAMES = {"loss/train": "train loss", "loss/val": "val loss",
                "accuracy/train": "train accuracy", "accuracy/val": "val accuracy",
                "accuracy/gap": "accuracy gap (train - val)"}
_METRIC = partial(check_str, optional=True)


@dataclass(frozen=True)
class CurvesConfig:
    """The validated arguments of ``LearningCurves`` (see it for their meaning); the metric
    names make its ``state_key``."""

    train_loss: str | None = argument(None, _METRIC)
    val_loss: str | None = argument(None, _METRIC)
    train_acc: str | None = argument(None, _METRIC)
    val_acc: str | None = argument(None, _METRIC)
    figure_every_n_epochs: int = argument(0, partial(check_int, low=0), key=False)

    def __post_init__(self) -> None:
        validate_arguments(self)

    @property
    def given(self) -> dict[str, str | None]:
        """The metric names given, by role (None: found by convention)."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss,
                "train_acc": self.train_acc, "val_acc": self.val_acc}


def curves_summary(history: Mapping[str, Sequence[tuple[int, float]]]) -> Verdict:
    """The INFO verdict ``curves.summary``: the last value of each recorded curve (``series ->
    [(epoch, value), ...]``), its epoch named when it is not the last; the value is the last
    validation loss, else the last training loss."""
    last = {series: points[-1] for series, points in history.items() if points}
    if not last:
        return Verdict("curves.summary", "Learning curves: nothing recorded (none of the "
                       "train/val loss and accuracy was logged per epoch).", None, None,
                       severity=Severity.INFO)
    epochs = 1 + max(epoch for epoch, _ in last.values())
    told = ", ".join(f"{SERIES_NAMES[s]} {v:.4g}" + (f" (epoch {e})" if e != epochs - 1 else "")
                     for s, (e, v) in last.items())
    key = next(s for s in ("loss/val", "loss/train", *last) if s in last)
    return Verdict("curves.summary", f"Learning curves after {epochs} epoch(s): {told}.",
                   last[key][1], None, {"last": {s: v for s, (_, v) in last.items()},
                                        "value": key}, severity=Severity.INFO)

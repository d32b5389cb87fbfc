"""Epoch verdicts of :class:`~lightning_diag.callbacks.lr_advisor.LRPlateauAdvisor` (recipe 6.4).

Pure rules on the recorded curves: each returns a :class:`Verdict` (what the finding says) or
``None``, so they can be checked without a Trainer.

Example:
    >>> fit_gap_verdict(0.99, 0.80, reported=set(), overfit_gap=0.1, close_gap=0.02,
    ...                 low_acc=0.9).code
    'advisor.overfit'
    >>> plateau_verdict("val_loss", [2.0, 1.9, 1.9, 1.9], plateau_from=0, start_loss=2.3,
    ...                 patience=2, min_rel_delta=0.01, high_fraction=0.2).value
    1.9
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from lightning_diag.functional.curves import plateau_length

__all__ = ["Verdict", "fit_gap_verdict", "plateau_verdict", "scale_lr"]


class Verdict(NamedTuple):
    """A finding's code, message, measured value, expected range and details."""

    code: str
    message: str
    value: float
    expected: tuple[float, float]
    details: dict[str, Any] | None = None


def plateau_verdict(key: str, curve: list[float], plateau_from: int, start_loss: float | None,
                    patience: int, min_rel_delta: float, high_fraction: float) -> Verdict | None:
    """``advisor.plateau`` when ``curve[plateau_from:]`` stalled while the loss is still high.

    The start loss defaults to the first finite value of ``curve``. "Still high" is a fraction
    of the start loss, so a start loss of 0 or below gives no verdict (a loss that starts at 0
    has nowhere to go).
    """
    waited = plateau_length(curve[plateau_from:], min_rel_delta)
    finite = [v for v in curve if math.isfinite(v)]
    if waited < patience or not finite:
        return None
    start = start_loss if start_loss is not None else finite[0]
    best = min(finite)
    if start <= 0 or best < high_fraction * start:
        return None  # converged low: a plateau there is the end of training, not a problem
    msg = (f"`{key}` has not improved by {min_rel_delta:.0%} for {waited} epochs "
           f"(patience {patience}); best {best:.4g} is still {best / start:.0%} of the "
           f"starting loss {start:.4g} (>= {high_fraction:.0%}).")
    return Verdict("advisor.plateau", msg, best, (0.0, high_fraction * start),
                   {"monitor": key, "epochs_without_improvement": waited})


def fit_gap_verdict(train: float, val: float, reported: set[str], overfit_gap: float,
                    close_gap: float, low_acc: float) -> Verdict | None:
    """``advisor.overfit`` or ``advisor.underfit`` from the last accuracies, unless reported."""
    gap = train - val
    if (gap > overfit_gap and "advisor.overfit" not in reported):
        return Verdict(
            "advisor.overfit",
            f"Training accuracy {train:.3f} is {gap:.3f} above validation accuracy {val:.3f} "
            f"(gap > {overfit_gap}).", gap, (0.0, overfit_gap))
    if (abs(gap) <= close_gap and train < low_acc and "advisor.underfit" not in reported):
        return Verdict(
            "advisor.underfit",
            f"Training accuracy {train:.3f} is low (< {low_acc}) and within "
            f"{abs(gap):.3f} of validation accuracy {val:.3f} (<= {close_gap}).",
            train, (low_acc, 1.0))
    return None


def scale_lr(optimizers: list[torch.optim.Optimizer], factor: float, min_lr: float,
             epoch: int) -> tuple[list[dict[str, Any]], str]:
    """Scale every param group's learning rate by ``factor`` (floored at ``min_lr``).

    Returns one ``{"epoch", "old", "new"}`` record per param group and a sentence saying so.
    """
    changes = []
    for opt in optimizers:
        for group in opt.param_groups:
            old = float(group["lr"])
            group["lr"] = max(old * factor, min_lr)
            changes.append({"epoch": epoch, "old": old, "new": group["lr"]})
    if not changes:
        return changes, "No optimizer to act on."
    return changes, (f"Scaled the learning rate of {len(changes)} param group(s) by {factor}: "
                     f"{changes[0]['old']:.3g} -> {changes[0]['new']:.3g} (act=True).")

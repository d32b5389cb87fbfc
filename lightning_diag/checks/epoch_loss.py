"""The training invariant about a logged epoch loss: consistent with the losses its steps
returned (``invariants.epoch_loss_inconsistent``: a running total never reset). The callback
(:class:`~lightning_diag.callbacks.invariants.TrainingInvariants`) sums the step losses.

Example:
    >>> steps = EpochSteps(0, weighted=10.0, plain=3.0, samples=6, steps=2)
    >>> matching_reductions(1.5, steps)
    ['batch_mean']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lightning_diag.checks.invariants import CHECK, invariant_code
from lightning_diag.checks.metric_range import name_words
from lightning_diag.findings import Finding, Severity

__all__ = ["EpochSteps", "check_epoch_loss", "epoch_loss_names", "matching_reductions"]

@dataclass(frozen=True)
class EpochSteps:
    """The loss each training step returned, summed over one epoch.

    Attributes:
        epoch: The epoch.
        weighted: Sum of loss x batch size.
        plain: Sum of the losses.
        samples: Sum of the batch sizes.
        steps: Number of steps.
    """

    epoch: int
    weighted: float
    plain: float
    samples: float
    steps: int

    def reductions(self) -> dict[str, float]:
        """The epoch loss under each reduction a user or Lightning may apply.

        Example:
            >>> EpochSteps(0, weighted=10.0, plain=3.0, samples=6, steps=2).reductions()
            {'mean': 1.6666666666666667, 'batch_mean': 1.5, 'sum': 3.0}
        """
        return {"mean": self.weighted / self.samples, "batch_mean": self.plain / self.steps,
                "sum": self.plain}


_RTOL = 1e-3
#: Words of a logged name that make a loss something other than the training loss.
_NOT_TRAIN = {"val", "valid", "validation", "test", "eval", "dev", "step"}


def epoch_loss_names(names: Iterable[str]) -> list[str]:
    """The logged names that may hold a training loss per epoch.

    Example:
        >>> epoch_loss_names(["train_loss", "train_loss_step", "val_loss", "epoch_loss", "acc"])
        ['train_loss', 'epoch_loss']
    """
    out = []
    for name in names:
        words = name_words(name)
        if "loss" in words and not any(w in _NOT_TRAIN for w in words):
            out.append(name)
    return out


def matching_reductions(logged: float, steps: EpochSteps) -> list[str]:
    """The reductions of ``steps`` that ``logged`` equals (relative tolerance 1e-3).

    Example:
        >>> matching_reductions(1.5, EpochSteps(0, 10.0, 3.0, 6, 2))
        ['batch_mean']
    """
    return [k for k, v in steps.reductions().items()
            if math.isclose(logged, v, rel_tol=_RTOL, abs_tol=1e-7)]


def _signature(logged: float, history: Sequence[EpochSteps], reduction: str) -> str | None:
    """The known bug whose value ``logged`` equals: a running total that was never reset."""
    s = history[-1]
    every = EpochSteps(s.epoch, sum(h.weighted for h in history), sum(h.plain for h in history),
                       sum(h.samples for h in history), sum(h.steps for h in history))
    candidates = {
        "sum_not_reset": {"mean": every.weighted / s.samples, "batch_mean": every.plain / s.steps,
                          "sum": every.plain}[reduction],
        "count_not_reset": {"mean": s.weighted / every.samples,
                            "batch_mean": s.plain / every.steps, "sum": s.plain}[reduction],
        "neither_reset": every.reductions()[reduction],
    }
    current = s.reductions()[reduction]
    for name, value in candidates.items():
        if not math.isclose(value, current, rel_tol=10 * _RTOL) and math.isclose(
                logged, value, rel_tol=_RTOL, abs_tol=1e-7):
            return name
    return None


_SIGNATURES = {
    "sum_not_reset": "the sum of the step losses of every epoch so far over this epoch's "
                     "count: a running sum never reset at the start of an epoch",
    "count_not_reset": "this epoch's sum over the count of every epoch so far: a step count "
                       "never reset at the start of an epoch",
    "neither_reset": "the mean over every epoch so far: a running sum and count never reset",
}


def check_epoch_loss(name: str, logged: Sequence[float], history: Sequence[EpochSteps],
                     reductions: Sequence[str], drift: float = 0.25) -> Finding | None:
    """``invariants.epoch_loss_inconsistent`` (WARN): a logged epoch loss that no longer agrees
    with the losses its steps returned.

    ``logged[i]`` is the value logged for the epoch of ``history[i]``; ``reductions`` are those
    the first epoch's value matched (:func:`matching_reductions`: the mean weighted by batch
    size as Lightning reduces, the plain mean over batches, or the sum for
    ``reduce_fx="sum"``), so the name is known to hold this loss. The latest epoch is flagged
    when its value equals a running total never reset (:data:`_SIGNATURES`), or when it is off
    by more than ``drift`` (relative) and moved against its step losses (rose while they fell,
    or fell while they rose).

    Example:
        >>> h = [EpochSteps(0, 20.0, 2.0, 20, 2), EpochSteps(1, 10.0, 1.0, 20, 2)]
        >>> check_epoch_loss("epoch_loss", [1.0, 1.5], h, ["mean", "batch_mean"]).message[:60]
        '`epoch_loss` logged 1.5 for epoch 1, but its steps returned '
    """
    if len(logged) < 2 or len(history) < 2 or not reductions:
        return None
    value, s = logged[-1], history[-1]
    refs = s.reductions()
    if any(math.isclose(value, refs[r], rel_tol=_RTOL, abs_tol=1e-7) for r in reductions):
        return None
    found = [(r, c) for r in reductions if (c := _signature(value, history, r)) is not None]
    reduction, cause = found[0] if found else (reductions[0], None)
    ref = refs[reduction]
    if cause is None:
        before_ref = history[-2].reductions()[reduction]
        against = (value - logged[-2]) * (ref - before_ref) < 0
        if not (against and abs(value - ref) > drift * abs(ref)):
            return None
        reason = (f"it {'rose' if value > logged[-2] else 'fell'} from {logged[-2]:.4g} while "
                  f"they went from {before_ref:.4g} to {ref:.4g}")
    else:
        reason = f"it equals {_SIGNATURES[cause]}"
    return Finding(
        CHECK, invariant_code("epoch_loss_inconsistent"), Severity.WARN,
        f"`{name}` logged {value:.4g} for epoch {s.epoch}, but its steps returned a {reduction} "
        f"of {ref:.4g} (expected within {_RTOL:g} of it, as at epoch {history[0].epoch}); "
        f"{reason}.",
        advice="Reset the running totals behind this epoch loss at the start of every epoch "
               "(in `on_train_epoch_start`), or log the step loss with "
               "`self.log(name, loss, on_epoch=True)` and let Lightning average it.",
        value=value, expected=(ref * (1 - _RTOL), ref * (1 + _RTOL)), subject=name,
        epoch=s.epoch, details={"metric": name, "reduction": reduction, "cause": cause or "drift",
                 "logged": list(logged), "steps": [h.reductions()[reduction] for h in history]})

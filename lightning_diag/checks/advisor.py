"""The rules of :class:`~lightning_diag.callbacks.lr_advisor.LRPlateauAdvisor` (recipe 6.4): its
arguments (:class:`AdvisorConfig`), the epoch verdicts on the recorded curves (plateau, under- and
overfitting: :mod:`lightning_diag.checks.fit_gap`, re-exported), the step-loss rules (the
divergence's reference losses, the stall) and the summary.

Pure rules: each returns a :class:`Verdict` (what the finding says) or ``None``, so they can be
checked without a Trainer.

Example:
    >>> overfit = Curves(train_loss=[1.0, 0.3, 0.1, 0.05, 0.02, 0.01],
    ...                  val_loss=[1.0, 0.40, 0.30, 0.31, 0.32, 0.33],
    ...                  train_acc=[0.7, 0.9, 0.97, 0.99, 1.0, 1.0],
    ...                  val_acc=[0.7, 0.88, 0.93, 0.94, 0.94, 0.94])
    >>> fit_gap_verdict(overfit, GapRule(), reported=set()).code
    'advisor.overfit'
    >>> plateau_verdict("val_loss", [2.0, 1.9, 1.9, 1.9], plateau_from=0, start_loss=2.3,
    ...                 patience=2, min_rel_delta=0.01, high_fraction=0.2).value
    1.9
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from lightning_diag.checks.fit_gap import (
    Curves,
    GapRule,
    fit_gap_verdict,
    halving_rate,
    loss_floor,
    plateau_verdict,
)
from lightning_diag.checks.verdict import Verdict
from lightning_diag.findings import Severity
from lightning_diag.functional.curves import plateau_length
from lightning_diag.validation import (
    argument,
    check_flag,
    check_int,
    check_number,
    check_str,
    require,
    validate_arguments,
)

__all__ = ["ADVICE", "MAX_WINDOW", "MIN_SAMPLES", "STALLED_ADVICE", "UNDERFIT_AFTER_DIVERGENCE",
           "AdvisorConfig", "Curves", "GapRule", "JumpWindow", "Verdict", "advice_for",
           "advisor_summary", "fit_gap_verdict", "halving_rate", "loss_floor", "plateau_verdict",
           "scale_lr", "stall_verdict"]

ADVICE = {
    "plateau": "Decay the learning rate (the loss plateaus while still high).",
    "underfit": "Underfitting: use a bigger model, train longer, perhaps raise the learning rate.",
    "overfit": "Overfitting: add weight decay or other regularization, or get more data.",
}
STALLED_ADVICE = ("Nothing is being learnt: raise the learning rate (try 10x; see the update "
                  "ratio, recipe 5.5), check that the loss depends on the weights (no `detach`, "
                  "an optimizer holding the model's parameters), and that the network did not "
                  "die (dead ReLUs after a divergence).")
#: The underfitting advice once the loss has diverged: a higher learning rate would contradict it.
UNDERFIT_AFTER_DIVERGENCE = ("Underfitting: use a bigger model or train longer; do not raise the "
                             "learning rate: the loss already diverged at step {step} with it.")
#: Step losses the divergence median is taken over at most: the window is kept sorted, so a
#: step costs ~0.6 us for 50 or 1000 (computed each step, 1000 cost ~43 us); the bound keeps
#: the memory and the sorted insertion's move small.
MAX_WINDOW = 1000
#: Samples a step loss is judged over at least (consecutive small batches pooled): see
#: ``docs/callbacks/lr_advisor.md`` for the measurements behind it.
MIN_SAMPLES = 32

_METRIC = partial(check_str, optional=True)
_SHARE = partial(check_number, low=0, high=1)


@dataclass(frozen=True)
class AdvisorConfig:
    """The validated arguments of ``LRPlateauAdvisor`` (see it for their meaning), each declared
    once; ``state_key`` is built from all but ``save_batch``, the metric names under their
    older keys (``train_loss`` for ``train_loss_key``, ...)."""

    monitor: str | None = argument(None, _METRIC)
    train_loss_key: str | None = argument(None, _METRIC, key="train_loss")
    val_loss_key: str | None = argument(None, _METRIC, key="val_loss")
    train_acc_key: str | None = argument(None, _METRIC, key="train_acc")
    val_acc_key: str | None = argument(None, _METRIC, key="val_acc")
    patience: int = argument(3, check_int)
    min_rel_delta: float = argument(0.01, _SHARE)
    high_fraction: float = argument(0.2, _SHARE)
    act: bool = argument(False, check_flag)
    # a factor of 0 would stop training, one of 1 or more would not decay
    factor: float = argument(0.1, partial(check_number, low=0, high=1, low_open=True,
                                          high_open=True))
    min_lr: float = argument(0.0, partial(check_number, low=0))
    min_epochs: int = argument(5, check_int)
    low_acc: float = argument(0.9, _SHARE)
    close_gap: float = argument(0.02, _SHARE)
    overfit_gap: float = argument(0.1, _SHARE)
    rel_gap: float = argument(0.5, _SHARE)
    halving_epochs: float = argument(20.0, partial(check_number, low=0, low_open=True))
    jump_factor: float = argument(5.0, partial(check_number, low=1, low_open=True))
    min_jump_fraction: float = argument(0.5, partial(check_number, low=0))
    window: int = argument(50, partial(check_int, high=MAX_WINDOW))
    min_history: int = argument(10, check_int)
    save_batch: bool = argument(True, check_flag, key=False)
    stall_steps: int | None = argument(None, partial(check_int, optional=True))
    # left out of the state key: the saved history stays valid whatever it is
    min_samples: int = argument(MIN_SAMPLES, check_int, key=False)

    def __post_init__(self) -> None:
        validate_arguments(self)
        require(self.min_history <= self.window, "min_history", self.min_history,
                f"an int <= `window` ({self.window}), the number of losses the median keeps")
        if self.stall_steps is not None:
            require(self.stall_steps >= 2 * self.min_history, "stall_steps", self.stall_steps,
                    f"None or an int >= 2 * `min_history` ({2 * self.min_history}): the first "
                    "and the last `min_history` step losses are compared")

    @property
    def given(self) -> dict[str, str | None]:
        """The metric names given, by role (``train_loss``, ...; None: found by convention)."""
        return {"train_loss": self.train_loss_key, "val_loss": self.val_loss_key,
                "train_acc": self.train_acc_key, "val_acc": self.val_acc_key}

    def gap_rule(self, start_loss: float | None, floor: float | None = None) -> GapRule:
        """The thresholds of :func:`fit_gap_verdict`, with the run's start loss and the loss's
        floor (:func:`loss_floor`)."""
        return GapRule(self.patience, self.min_rel_delta, self.overfit_gap, self.close_gap,
                       self.rel_gap, self.low_acc, self.high_fraction, self.halving_epochs,
                       start_loss, floor)


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


def advice_for(code: str, diverged_at: int | None = None) -> str:
    """The advice of an epoch verdict (``advisor.plateau``, ``.underfit``, ``.overfit``);
    ``diverged_at``: the step where the loss diverged in this fit, if it did (raising the
    learning rate is then no advice for underfitting).

    Example:
        >>> advice_for("advisor.underfit", diverged_at=12)[-45:]
        'the loss already diverged at step 12 with it.'
    """
    if code == "advisor.underfit" and diverged_at is not None:
        return UNDERFIT_AFTER_DIVERGENCE.format(step=diverged_at)
    return ADVICE[code.removeprefix("advisor.")]


class JumpWindow:
    """The step losses a new one is judged against for a divergence (recipe 6.4.4), in groups
    of at least ``min_samples`` samples.

    A batch of fewer samples is too few to judge a jump: one hard sample's loss is many times
    the median of a batch-of-one run. Consecutive finite step losses are pooled (weighted by
    their samples) until a group holds ``min_samples``; each complete group's mean is judged
    against the lower median of the last ``window`` group means (the first group's mean alone
    while fewer than ``min_history`` are known) and then joins them. A batch of
    ``min_samples`` or more is a group on its own: each step loss is judged as it comes. The
    window is kept sorted as well, so that the median is read, not computed.

    A pushed mean waits in a list until the median is read (:meth:`reference`, :attr:`values`)
    or ``window`` of them wait: on the usual step, a mean is judged against :meth:`lower`, a
    bound below the median that costs one comparison to keep (the smallest mean known since
    the window was last sorted), and the sorted window is brought up to date only for a mean
    above the threshold of that bound (the threshold grows with the median, so a mean at or
    below it is below the exact one: the same verdicts, fewer steps of work).

    Example:
        >>> w = JumpWindow(window=50, min_history=2, min_samples=4)
        >>> w.add(2.0, samples=2) is None  # half a group
        True
        >>> w.add(3.0, samples=2)  # complete: (mean, samples, batches)
        (2.5, 4, 2)
        >>> w.reference()  # fewer than `min_history` means known: the first one
        2.5
        >>> for mean in (2.5, 1.0, 9.0):
        ...     w.push(mean)
        >>> w.lower(), w.reference()  # a bound below the lower median, and the lower median
        (1.0, 2.5)
    """

    def __init__(self, window: int, min_history: int, min_samples: int) -> None:
        self._values: deque[float] = deque(maxlen=window)  # the group means, oldest first
        self._window = window
        self.min_history, self.min_samples = min_history, min_samples
        self.start: float | None = None  # the first group's mean
        self._sorted: list[float] = []
        self._total, self._samples, self._batches = 0.0, 0, 0
        self._waiting: list[float] = []  # pushed means not yet in the window, oldest first
        self._known = 0  # means pushed, up to `min_history` (then the median is read)
        self._low = math.inf  # no more than the smallest mean of the window and the waiting

    @property
    def values(self) -> deque[float]:
        """The last ``window`` group means, oldest first."""
        self._sort_in()
        return self._values

    @property
    def pending(self) -> tuple[int, int]:
        """Samples and batches of the group being filled."""
        return self._samples, self._batches

    def add(self, loss: float, samples: int) -> tuple[float, int, int] | None:
        """Pool a finite step loss of ``samples`` samples; when its group is complete, the
        group's ``(mean, samples, batches)`` (the first one is also :attr:`start`)."""
        if not self._batches and samples >= self.min_samples:  # a group on its own
            if self.start is None:
                self.start = loss
            return loss, samples, 1  # the loss itself (bit-identical to a batch judged alone)
        self._total += loss * samples
        self._samples += samples
        self._batches += 1
        if self._samples < self.min_samples:
            return None
        mean = loss if self._batches == 1 else self._total / self._samples
        done = (mean, self._samples, self._batches)
        self._total, self._samples, self._batches = 0.0, 0, 0
        if self.start is None:
            self.start = mean
        return done

    def reference(self) -> float | None:
        """The value a new group mean is compared with: the lower median of the last
        ``window`` group means, the first one's alone while fewer than ``min_history`` are
        known, None before any."""
        if self._known >= self.min_history:
            self._sort_in()
            return self._sorted[(len(self._sorted) - 1) // 2]
        return self.start

    def lower(self) -> float | None:
        """A value at or below :meth:`reference` (equal to it while fewer than ``min_history``
        means are known), read without sorting the window."""
        return self._low if self._known >= self.min_history else self.start

    def push(self, mean: float) -> None:
        """Add a judged group mean to the window (the oldest leaves a full one)."""
        waiting = self._waiting
        waiting.append(mean)
        if mean < self._low:
            self._low = mean
        if self._known < self.min_history:
            self._known += 1
        if len(waiting) >= self._window:
            self._sort_in()

    def _sort_in(self) -> None:
        """Move the waiting means into the window and its sorted copy."""
        if not self._waiting:
            return
        values, ordered = self._values, self._sorted
        for mean in self._waiting:
            if len(values) == self._window:
                del ordered[bisect.bisect_left(ordered, values[0])]
            values.append(mean)
            bisect.insort(ordered, mean)
        self._waiting.clear()
        self._low = ordered[0]

    def load(self, values: Sequence[float], start: float | None) -> None:
        """Restore the window's group means and first mean (a checkpoint's)."""
        self._values.clear()
        self._sorted, self._waiting, self._known, self._low = [], [], 0, math.inf
        self.start = start
        for v in values:
            self.push(float(v))
        self._sort_in()


def stall_verdict(first_losses: Sequence[float], step_losses: Sequence[float], finite_steps: int,
                  config: AdvisorConfig) -> Verdict | None:
    """``advisor.stalled`` when the median of the last ``min_history`` finite step losses is
    not ``min_rel_delta`` (of its size) below the median of the first ``min_history``.

    Example:
        >>> flat = [2.3] * 10
        >>> stall_verdict(flat, flat, 20, AdvisorConfig(stall_steps=20)).value
        0.0
    """
    n = config.min_history
    first = statistics.median(first_losses)
    last = statistics.median(list(step_losses)[-n:])
    drop = (first - last) / abs(first) if first else (math.inf if last < 0 else 0.0)
    if drop >= config.min_rel_delta:
        return None
    return Verdict(
        "advisor.stalled",
        f"The step loss does not move: the median of the last {n} step losses is {last:.4g} "
        f"after {finite_steps} steps, {drop:+.2%} below the median {first:.4g} of the first {n} "
        f"(expected a drop of at least {config.min_rel_delta:.0%}).",
        float(drop), (config.min_rel_delta, 1.0), advice=STALLED_ADVICE)


def advisor_summary(key: str, curve: Sequence[float], plateau_from: int, plateaus: int,
                    reported: set[str], lr_changes: int, config: AdvisorConfig) -> Verdict:
    """The INFO verdict ``advisor.summary``: the plateau counter on the watched curve ``key``
    (its epoch values), the plateaus reported, the learning-rate changes (``act``) and the
    other verdicts given."""
    code = "advisor.summary"
    finite = [v for v in curve if math.isfinite(v)]
    if not finite:
        return Verdict(code, "The advisor read no finite loss curve (see `advisor.keys`): no "
                       "plateau or under/overfitting could be judged.", None, None,
                       severity=Severity.INFO)
    waited = plateau_length(list(curve)[plateau_from:], config.min_rel_delta)
    said = sorted(reported - {"advisor.divergence"})
    return Verdict(
        code,
        f"Plateau counter on `{key}`: {waited} of {config.patience} epoch(s) without a "
        f"{config.min_rel_delta:.0%} improvement; best {min(finite):.4g} over {len(finite)} "
        f"epoch(s); {plateaus} plateau(s) reported"
        + (f", learning rate scaled {lr_changes} time(s)" if config.act else "")
        + f"; {', '.join(f'`{c}`' for c in said) if said else 'no under/overfitting'} found.",
        float(waited), (0.0, float(config.patience)),
        {"monitor": key, "best": min(finite), "plateaus": plateaus}, severity=Severity.INFO)

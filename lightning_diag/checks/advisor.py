"""The rules of :class:`~lightning_diag.callbacks.lr_advisor.LRPlateauAdvisor` (recipe 6.4): its
arguments (:class:`AdvisorConfig`), the epoch verdicts on the recorded curves (plateau, under- and
overfitting), the step-loss rules (the divergence's reference losses, the stall) and the summary.

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
from typing import Any, NamedTuple

import torch

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
           "advisor_summary", "fit_gap_verdict", "halving_rate", "plateau_verdict", "scale_lr",
           "stall_verdict"]

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

    def gap_rule(self, start_loss: float | None) -> GapRule:
        """The thresholds of :func:`fit_gap_verdict`, with the run's start loss."""
        return GapRule(self.patience, self.min_rel_delta, self.overfit_gap, self.close_gap,
                       self.rel_gap, self.low_acc, self.high_fraction, self.halving_epochs,
                       start_loss)


class Curves(NamedTuple):
    """The epoch curves the fit verdicts read; a curve not logged is empty."""

    train_loss: Sequence[float] = ()
    val_loss: Sequence[float] = ()
    train_acc: Sequence[float] = ()
    val_acc: Sequence[float] = ()


def halving_rate(epochs: float) -> float:
    """The relative fall per epoch that halves a loss in ``epochs`` epochs.

    Example:
        >>> round(halving_rate(20), 4)
        0.0341
    """
    return 1.0 - 0.5 ** (1.0 / epochs)


class GapRule(NamedTuple):
    """The thresholds of :func:`fit_gap_verdict` (the advisor's arguments of the same names).

    Attributes:
        patience: Epochs the validation curve must go without improving (overfitting), or over
            which the training loss's rate of fall is measured (underfitting).
        min_rel_delta: Relative improvement that counts as progress.
        overfit_gap: An accuracy gap above this is overfitting on its own (far apart).
        close_gap: A gap at or below this is "close" (and above it, a gap that matters): in
            accuracy points, or, between losses, as a fraction of the start loss.
        rel_gap: Overfitting needs the gap to be at least this share of the validation error
            (accuracy) or of the validation loss (loss curves only).
        low_acc: A training accuracy below this is low (underfitting with a close gap).
        high_fraction: A training loss at or above this fraction of the start loss is high.
        halving_epochs: A loss falling slower than :func:`halving_rate` of this is slow.
        start_loss: The loss at initialization (the first step loss), when known.
    """

    patience: int = 3
    min_rel_delta: float = 0.01
    overfit_gap: float = 0.1
    close_gap: float = 0.02
    rel_gap: float = 0.5
    low_acc: float = 0.9
    high_fraction: float = 0.2
    halving_epochs: float = 20.0
    start_loss: float | None = None


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


def fit_gap_verdict(curves: Curves, rule: GapRule, reported: set[str]) -> Verdict | None:
    """``advisor.overfit`` or ``advisor.underfit`` from the curves so far, unless reported.

    Overfitting (recipe 6.4.3, training and validation far apart): an accuracy gap above
    ``overfit_gap``; or the validation curve (its loss, else its accuracy) has not improved
    for ``patience`` epochs while the training loss kept falling, and the gap is most of what
    is left: an accuracy gap above ``close_gap`` and at least ``rel_gap`` of the validation
    error, or (no accuracies) a loss gap above ``close_gap`` of the start loss and at least
    ``rel_gap`` of the validation loss. Underfitting (6.4.2, both high and close): a training
    accuracy below ``low_acc`` within ``close_gap`` of validation; or a training loss still at
    least ``high_fraction`` of its start, within ``close_gap`` of the start loss from the
    validation loss, still falling but too slowly to halve in ``halving_epochs`` epochs.
    """
    if "advisor.overfit" not in reported:
        verdict = _overfit(curves, rule)
        if verdict is not None:
            return verdict
    if "advisor.underfit" not in reported:
        return _underfit(curves, rule)
    return None


def _overfit(c: Curves, rule: GapRule) -> Verdict | None:
    acc = bool(c.train_acc) and bool(c.val_acc)
    if acc:
        train, val = c.train_acc[-1], c.val_acc[-1]
        gap = train - val
        if gap > rule.overfit_gap:
            return Verdict(
                "advisor.overfit",
                f"Training accuracy {train:.3f} is {gap:.3f} above validation accuracy {val:.3f} "
                f"(gap > {rule.overfit_gap}).", gap, (0.0, rule.overfit_gap),
                {"basis": "accuracy gap"})
    stalled = _stalled(c, rule)
    if stalled is None:
        return None
    waited, curve_name = stalled
    tl = list(c.train_loss)
    falling = ""
    if len(tl) > waited:  # both curves grow at the same epoch ends: aligned from the end
        then, now = tl[-1 - waited], tl[-1]
        if not now <= (1 - rule.min_rel_delta) * then:
            return None  # training stalled too: the end of training, not a widening gap
        falling = f" while the training loss fell from {then:.4g} to {now:.4g}"
    since = f"has not improved on its best for {waited} epochs (patience {rule.patience})"
    if acc:
        error = 1.0 - val
        if not (gap > rule.close_gap and gap >= rule.rel_gap * error):
            return None
        share = gap / error if error > 0 else 1.0
        return Verdict(
            "advisor.overfit",
            f"Training accuracy {train:.3f} is {gap:.3f} above validation accuracy {val:.3f}: "
            f"{share:.0%} of the validation error {error:.3f} is the gap (>= {rule.rel_gap:.0%}), "
            f"and the {curve_name} {since}{falling}.", gap, (0.0, rule.close_gap),
            {"basis": "curves", "share_of_error": share, "epochs_without_improvement": waited})
    if not tl or not c.val_loss:
        return None
    vl = c.val_loss[-1]
    lgap = vl - tl[-1]
    start = _start(c, rule)
    if not (vl > 0 and start > 0 and lgap > rule.close_gap * start and lgap >= rule.rel_gap * vl):
        return None
    return Verdict(
        "advisor.overfit",
        f"Validation loss {vl:.4g} is {vl / max(tl[-1], 1e-12):.1f}x the training loss "
        f"{tl[-1]:.4g}: the gap is {lgap / vl:.0%} of it (>= {rule.rel_gap:.0%}) and "
        f"{lgap / start:.0%} of the start loss (> {rule.close_gap:.0%}), and the "
        f"validation loss {since}{falling}.", lgap, (0.0, rule.rel_gap * vl),
        {"basis": "curves", "share_of_val_loss": lgap / vl, "epochs_without_improvement": waited})


def _stalled(c: Curves, rule: GapRule) -> tuple[int, str] | None:
    """(epochs without improvement, which curve) of the validation loss (else the validation
    accuracy), when it has not improved for ``patience`` epochs."""
    if c.val_loss:
        curve, name = list(c.val_loss), "validation loss"
    elif c.val_acc:
        curve, name = [-a for a in c.val_acc], "validation accuracy"  # lower is better
    else:
        return None
    waited = plateau_length(curve, rule.min_rel_delta)
    if waited < rule.patience:
        return None
    return waited, name


def _underfit(c: Curves, rule: GapRule) -> Verdict | None:
    tl, vl, p = list(c.train_loss), list(c.val_loss), rule.patience
    slow = halving_rate(rule.halving_epochs)
    rate = _rate(tl, p)
    if rate is not None and rate >= slow:
        return None  # still falling fast: early training, not underfitting yet
    pace = ("" if rate is None else f"; the training loss falls {rate:.1%} per epoch over the "
            f"last {p} epochs, too slow to halve in {rule.halving_epochs:g} epochs (< {slow:.1%})")
    details: dict[str, Any] = {"rate": rate}
    if c.train_acc and c.val_acc:
        train, val = c.train_acc[-1], c.val_acc[-1]
        gap = train - val
        if abs(gap) <= rule.close_gap and train < rule.low_acc:
            return Verdict(
                "advisor.underfit",
                f"Training accuracy {train:.3f} is low (< {rule.low_acc}) and within "
                f"{abs(gap):.3f} of validation accuracy {val:.3f} (<= {rule.close_gap}){pace}.",
                train, (rule.low_acc, 1.0), {"basis": "accuracy", **details})
    if rate is None or not vl or plateau_length(tl, rule.min_rel_delta) >= p:
        return None  # not measurable, or not falling at all: a plateau, not slow progress
    start, now, val_loss = _start(c, rule), tl[-1], vl[-1]
    if not (start > 0 and now >= rule.high_fraction * start
            and abs(val_loss - now) <= rule.close_gap * start):
        return None
    return Verdict(
        "advisor.underfit",
        f"Training loss {now:.4g} is still {now / start:.0%} of its start {start:.4g} "
        f"(>= {rule.high_fraction:.0%}) and {abs(val_loss - now):.4g} from the validation loss "
        f"{val_loss:.4g} (<= {rule.close_gap:.0%} of the start){pace}.",
        now, (0.0, rule.high_fraction * start), {"basis": "loss curves", **details})


def _rate(curve: list[float], epochs: int) -> float | None:
    """Mean relative fall per epoch over the last ``epochs`` epochs; None when unmeasurable."""
    if len(curve) <= epochs:
        return None
    then, now = curve[-1 - epochs], curve[-1]
    if not (math.isfinite(then) and math.isfinite(now) and then > 0 and now > 0):
        return None
    return 1.0 - (now / then) ** (1.0 / epochs)


def _start(c: Curves, rule: GapRule) -> float:
    """The loss at initialization: the first step loss when known, else the first epoch's."""
    if rule.start_loss is not None:
        return rule.start_loss
    return c.train_loss[0] if c.train_loss else math.nan


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
    window is kept sorted as well, so that the median is read, not computed, on every step.

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
        >>> w.reference()  # the lower median of those kept
        2.5
    """

    def __init__(self, window: int, min_history: int, min_samples: int) -> None:
        self.values: deque[float] = deque(maxlen=window)  # the group means, oldest first
        self.min_history, self.min_samples = min_history, min_samples
        self.start: float | None = None  # the first group's mean
        self._sorted: list[float] = []
        self._total, self._samples, self._batches = 0.0, 0, 0

    @property
    def pending(self) -> tuple[int, int]:
        """Samples and batches of the group being filled."""
        return self._samples, self._batches

    def add(self, loss: float, samples: int) -> tuple[float, int, int] | None:
        """Pool a finite step loss of ``samples`` samples; when its group is complete, the
        group's ``(mean, samples, batches)`` (the first one is also :attr:`start`)."""
        self._total += loss * samples
        self._samples += samples
        self._batches += 1
        if self._samples < self.min_samples:
            return None
        # one batch: the loss itself (bit-identical to a batch judged alone)
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
        if len(self.values) >= self.min_history:
            return self._sorted[(len(self._sorted) - 1) // 2]
        return self.start

    def push(self, mean: float) -> None:
        """Add a judged group mean to the window (the oldest leaves a full one)."""
        if len(self.values) == self.values.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self.values[0])]
        self.values.append(mean)
        bisect.insort(self._sorted, mean)

    def load(self, values: Sequence[float], start: float | None) -> None:
        """Restore the window's group means and first mean (a checkpoint's)."""
        self.values.clear()
        self._sorted = []
        self.start = start
        for v in values:
            self.push(float(v))


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

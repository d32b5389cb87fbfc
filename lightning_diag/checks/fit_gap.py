"""The epoch verdicts of :class:`~lightning_diag.callbacks.lr_advisor.LRPlateauAdvisor` (recipe
6.4): a plateau while the loss is still high, under- and overfitting, read from the recorded
epoch curves; and the loss's floor they measure "still high" from.

"High" is measured from the loss's floor, not from 0: a loss whose own floor is far above 0 (a
contrastive loss over a batch with a temperature, label smoothing, noisy targets) cannot fall
below it, and at 68 % of its start may be most of the way down. The floor is the user's own
evidence (:func:`loss_floor`): what the overfit test (recipe 4,
:class:`~lightning_diag.callbacks.overfit.OverfitSmallBatch`) reached on the run's own batches
where it judged that a floor, or the loss at a memorising output it measured; 0 without one.

Pure rules: each returns a :class:`Verdict` (what the finding says) or ``None``.

Example:
    >>> slow = Curves(train_loss=[3.0, 2.60, 2.53, 2.46, 2.40],
    ...               val_loss=[3.0, 2.64, 2.57, 2.50, 2.44])
    >>> fit_gap_verdict(slow, GapRule(start_loss=3.48), set()).value  # falls 2.6% an epoch
    2.4
    >>> fit_gap_verdict(slow, GapRule(start_loss=3.48, floor=1.7), set()) is None  # 8% above 1.7
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from lightning_diag.checks.verdict import Verdict
from lightning_diag.findings import Finding
from lightning_diag.functional.curves import plateau_length

__all__ = ["Curves", "GapRule", "fit_gap_verdict", "halving_rate", "loss_floor",
           "plateau_verdict"]


def loss_floor(findings: Iterable[Finding]) -> float | None:
    """The floor of the run's loss the overfit test measured on the run's own batches: the
    best loss of ``overfit.floor`` (the loss fell, mostly below the best constant output, and
    stopped: a floor of the data, of the loss or of the model), else the user's loss at a
    memorising output of ``overfit.reached`` (label smoothing, distillation: not squashed);
    None without either (no overfit test, or it failed: its loss is no floor).

    Regularization was off in the overfit test and a few batches are easier to memorise than
    the whole set, so the floor is at or below what the run can reach: "still high" measured
    from it errs towards a verdict, as it did from 0.

    Example:
        >>> from lightning_diag.findings import Severity
        >>> loss_floor([Finding("OverfitSmallBatch", "overfit.floor", Severity.INFO, "...",
        ...                     value=1.705)])
        1.705
        >>> loss_floor([]) is None
        True
    """
    for f in findings:
        if f.code == "overfit.floor" and isinstance(f.value, (int, float)):
            value = float(f.value)
        elif f.code == "overfit.reached":
            floor = (f.details or {}).get("floor") or {}
            if floor.get("squashed", True) or not isinstance(floor.get("value"), (int, float)):
                continue
            value = float(floor["value"])
        else:
            continue
        if math.isfinite(value):
            return value
    return None


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
        floor: The loss's floor (:func:`loss_floor`), when known: "high" and the rate of fall
            are measured above it (0 without one, or one at or above the start loss).
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
    floor: float | None = None


def _base(floor: float | None, start: float) -> float:
    """What "high" is measured from: ``floor`` below ``start``, else 0."""
    return floor if floor is not None and math.isfinite(floor) and floor < start else 0.0


def _high(loss: float, start: float, base: float) -> str:
    """How high ``loss`` still is, in words: a share of ``start`` above ``base``."""
    if not base:
        return f"{loss / start:.0%} of the starting loss {start:.4g}"
    return (f"{(loss - base) / (start - base):.0%} as far above the loss's floor {base:.4g} "
            f"(measured by the overfit test) as the starting loss {start:.4g}")


def plateau_verdict(key: str, curve: list[float], plateau_from: int, start_loss: float | None,
                    patience: int, min_rel_delta: float, high_fraction: float,
                    floor: float | None = None) -> Verdict | None:
    """``advisor.plateau`` when ``curve[plateau_from:]`` stalled while the loss is still high.

    The start loss defaults to the first finite value of ``curve``. "Still high" is a fraction
    of the way from the loss's ``floor`` (:func:`loss_floor`; 0 without one) to the start
    loss, so a start loss at or below the floor gives no verdict (nowhere to go).
    """
    waited = plateau_length(curve[plateau_from:], min_rel_delta)
    finite = [v for v in curve if math.isfinite(v)]
    if waited < patience or not finite:
        return None
    start = start_loss if start_loss is not None else finite[0]
    best = min(finite)
    base = _base(floor, start)
    if start - base <= 0 or best - base < high_fraction * (start - base):
        return None  # converged low: a plateau there is the end of training, not a problem
    msg = (f"`{key}` has not improved by {min_rel_delta:.0%} for {waited} epochs "
           f"(patience {patience}); best {best:.4g} is still "
           f"{_high(best, start, base)} (>= {high_fraction:.0%}).")
    return Verdict("advisor.plateau", msg, best,
                   (min(base, 0.0), base + high_fraction * (start - base)),
                   {"monitor": key, "epochs_without_improvement": waited, "floor": base})


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
    start = _start(c, rule)
    base = _base(rule.floor, start) if math.isfinite(start) else 0.0
    rate = _rate([v - base for v in tl], p)
    if rate is not None and rate >= slow:
        return None  # still falling fast: early training, not underfitting yet
    above = " above its floor" if base else ""
    pace = ("" if rate is None else f"; the training loss{above} falls {rate:.1%} per epoch over "
            f"the last {p} epochs, too slow to halve in {rule.halving_epochs:g} epochs "
            f"(< {slow:.1%})")
    details: dict[str, Any] = {"rate": rate, "floor": base}
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
    now, val_loss, span = tl[-1], vl[-1], start - base
    if not (start > 0 and span > 0 and now - base >= rule.high_fraction * span
            and abs(val_loss - now) <= rule.close_gap * start):
        return None
    return Verdict(
        "advisor.underfit",
        f"Training loss {now:.4g} is still {_high(now, start, base)} "
        f"(>= {rule.high_fraction:.0%}) and "
        f"{abs(val_loss - now):.4g} from the validation loss {val_loss:.4g} (<= "
        f"{rule.close_gap:.0%} of the start){pace}.",
        now, (min(base, 0.0), base + rule.high_fraction * span),
        {"basis": "loss curves", **details})


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



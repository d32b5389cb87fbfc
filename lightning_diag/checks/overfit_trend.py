"""Slow or stuck: where the loss of an overfit run that missed its target was heading (recipe
step 4; the run itself is :mod:`lightning_diag.checks.overfit`).

A run that spends its budget just short of the target while its loss still falls steadily is
slow, not broken: more steps or a higher learning rate memorize the sample. The evidence is the
run's own curve: ``log(loss - floor)`` fitted by a line over its last :data:`TREND_WINDOW` of
steps, projected to the target.

Example:
    >>> curve = [(s, 0.7 * 0.5 ** (s / 300), None) for s in range(5, 1001, 5)]
    >>> trend = loss_trend(curve, floor=0.0, target=0.035)
    >>> round(trend.halving_steps), round(trend.extra_steps)
    (300, 297)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MIN_POINTS", "PROJECTION_BUDGETS", "SLOW_ACCURACY", "TREND_WINDOW", "LossTrend",
           "loss_trend"]

#: The share of the run's steps, at its end, the trend is fitted on.
TREND_WINDOW = 0.25
#: Passes the fit needs in its window.
MIN_POINTS = 4
#: A run that missed its target is slow, not stuck, when its trend reaches the target within
#: this many budgets (``max_steps``) of extra steps. Measured (docs/callbacks/overfit.md): the
#: multi-label family's healthy runs that missed it needed 0-0.33x (30 seeds); the same model
#: at a 10x lower rate 3.3-3.7x, stuck fixtures (noise labels, a frozen network, targets
#: shuffled apart from their inputs, a 1e-5 rate) 64x to never.
PROJECTION_BUDGETS = 1.0
#: ... and, where the recipe's criterion is the accuracy, at least this share of the
#: predictions is right: the healthy runs above had 99.2-99.8 %, the 10x lower rate 88-90 %.
SLOW_ACCURACY = 0.97


@dataclass(frozen=True)
class LossTrend:
    """The recent trend of ``log(loss - floor)``: its ``slope`` per step (negative: falling)
    and the ``extra_steps`` it needs from the run's last step to the target (0 when the fitted
    line is already there, ``inf`` when the loss is not falling)."""

    slope: float
    extra_steps: float
    window_steps: int

    @property
    def halving_steps(self) -> float:
        """Steps for the distance to the floor to halve (``inf`` when not falling)."""
        return math.log(2) / -self.slope if self.slope < 0 else math.inf


def loss_trend(curve: Sequence[tuple[int, float, float | None]], floor: float, target: float,
               window: float = TREND_WINDOW) -> LossTrend | None:
    """Fit ``log(loss - floor)`` against the step over the last ``window`` of the steps of
    ``curve`` (``(step, loss, accuracy)`` per pass) and project it to ``target``; None when
    there are fewer than :data:`MIN_POINTS` passes above the floor there, or no target above
    the floor.

    The slope is the shallower of the whole window's and of its second half's, so that a loss
    that is flattening out is not credited with its earlier pace.

    Example:
        >>> flat = [(s, 2.3, 0.1) for s in range(10, 301, 10)]
        >>> loss_trend(flat, floor=0.0, target=0.11).extra_steps
        inf
    """
    if not curve or not target > floor or not all(math.isfinite(p[1]) for p in curve):
        return None
    last = curve[-1][0]
    points = [(float(s), math.log(loss - floor)) for s, loss, _ in curve
              if s >= last * (1 - window) and loss > floor]
    if len(points) < MIN_POINTS:
        return None
    fits = [statistics.linear_regression(*zip(*part, strict=True))
            for part in (points, points[len(points) // 2:]) if len(part) >= 2]
    fit = max(fits, key=lambda f: f.slope)
    if fit.slope >= 0:
        return LossTrend(fit.slope, math.inf, int(last - points[0][0]))
    now = fit.intercept + fit.slope * last
    extra = max(0.0, (math.log(target - floor) - now) / fit.slope)
    return LossTrend(fit.slope, extra, int(last - points[0][0]))

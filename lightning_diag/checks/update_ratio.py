"""The rules of :class:`~lightning_diag.callbacks.update_ratio.UpdateRatioMonitor` (recipe 5.5):
what the update ratios ``||dw|| / ||w||`` of one logging step are (the weight tensors' median),
the streaks that make ``update_ratio.too_low``, ``too_high`` and ``zero_updates``, and the
run's summary, as pure functions.

Example:
    >>> reading = read_ratios(["net.1.weight", "net.1.bias"], [2, 1], [1e-7, 0.0], [0.5, 0.1])
    >>> reading.median, reading.still
    (1e-07, 0)
    >>> streak, found = ratio_verdicts(new_streak(), reading, UpdateRatioConfig(patience=1))
    >>> [v.code for v in found], streak["too_low"]
    (['update_ratio.too_low'], 1)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from lightning_diag.checks.verdict import Verdict
from lightning_diag.findings import Severity
from lightning_diag.validation import (
    argument,
    check_flag,
    check_int,
    check_number,
    require,
    validate_arguments,
)

__all__ = ["CODES", "GUIDE", "MIN_SAMPLES", "RatioReading", "UpdateRatioConfig", "new_streak",
           "ratio_summary", "ratio_verdicts", "read_ratios"]

#: The recipe's healthy update ratio.
GUIDE = 1e-3
#: Samples over which a weight must not have moved at all to count as still: a logging step
#: on fewer samples goes on over the next optimizer steps (see
#: ``docs/callbacks/update_ratio.md`` for the measurements behind it).
MIN_SAMPLES = 32
#: The codes judged over a streak of logging steps (``update_ratio.<code>``).
CODES = ("too_low", "too_high", "zero_updates")
_POSITIVE = partial(check_number, low=0, low_open=True)


@dataclass(frozen=True)
class UpdateRatioConfig:
    """The validated arguments of ``UpdateRatioMonitor`` (see it for their meaning), each
    declared once; ``state_key`` is built from those with ``key`` (what is judged)."""

    every_n_steps: int = argument(100, check_int)
    low: float = argument(1e-5, _POSITIVE, convert=float)
    high: float = argument(0.2, _POSITIVE, convert=float)
    extreme: float = argument(1.0, _POSITIVE, convert=float)
    patience: int = argument(3, check_int)
    log_charts: bool = argument(True, check_flag, key=False)
    early_steps: bool = argument(True, check_flag, key=False)
    # left out of the state key: the saved streaks stay valid whatever it is
    min_samples: int = argument(MIN_SAMPLES, check_int, key=False)

    def __post_init__(self) -> None:
        validate_arguments(self)
        require(self.high > self.low, "high", self.high, f"a number > `low` ({self.low!r})")
        require(self.extreme >= self.high, "extreme", self.extreme,
                f"a number >= `high` ({self.high!r})")


class RatioReading(NamedTuple):
    """One logging step's update ratios.

    Attributes:
        last: Each weight tensor's ratio (tensors of 2 or more dimensions; every tensor when
            there is none), by parameter name.
        median: Their median over the finite ones; NaN when any is NaN or none is finite.
        still: How many of them did not move at all (ratio exactly 0).
        grad_norm: The norm of those still tensors' gradients (0: the network is dead; else
            the optimizer did not step them).
    """

    last: dict[str, float]
    median: float
    still: int
    grad_norm: float


def read_ratios(labels: Sequence[str], dims: Sequence[int], ratios: Sequence[float],
                grad_norms: Sequence[float]) -> RatioReading:
    """The :class:`RatioReading` of parameters ``labels`` (their ``dims``, update ``ratios`` and
    gradient norms). Biases and norm scales are left out of the median: a zero-initialized
    bias has an undefined ratio."""
    weights = [i for i, d in enumerate(dims) if d >= 2] or list(range(len(labels)))
    still = [i for i in weights if ratios[i] == 0.0]
    last = {labels[i]: ratios[i] for i in weights}
    finite = [v for v in last.values() if math.isfinite(v)]
    median = statistics.median(finite) if finite else math.nan
    if any(math.isnan(v) for v in last.values()):
        median = math.nan
    return RatioReading(last, median, len(still),
                        math.sqrt(sum(grad_norms[i] ** 2 for i in still)))


def new_streak() -> dict[str, int]:
    """No logging step outside the band yet, for each of :data:`CODES`."""
    return dict.fromkeys(CODES, 0)


def ratio_verdicts(streak: dict[str, int], reading: RatioReading, config: UpdateRatioConfig,
                   window: RatioReading | None = None, samples: tuple[int, int] | None = None
                   ) -> tuple[dict[str, int], list[Verdict]]:
    """The streaks after one logging step, and the WARN verdicts they reach.

    ``zero_updates``: the median ratio is exactly 0 (most weight tensors did not move) for
    ``patience`` logging steps; ``too_low``: below ``low`` for ``patience`` steps; ``too_high``:
    above ``high`` for ``patience`` steps, or at once at ``extreme`` or non-finite. A verdict is
    given when its streak reaches its length (once per streak).

    Args:
        streak: Each code's run of logging steps so far (:func:`new_streak`).
        reading: The logging step's ratios.
        config: The thresholds.
        window: Where the logging step held fewer than ``min_samples`` samples and some weight
            did not move, the ratios from its first step to the end of the window of steps
            that gathered them: whether the weights did not move is read from it.
        samples: The samples and batches the logging step (its window) held, for the message.
    """
    median, p = reading.median, config.patience
    still = reading if window is None else window
    zero = still.median == 0.0
    state = {"zero_updates": zero, "too_low": median != 0.0 and median < config.low,
             "too_high": math.isnan(median) or median > config.high}
    streak = {code: streak.get(code, 0) + 1 if state[code] else 0 for code in CODES}
    extreme = math.isnan(median) or median >= config.extreme
    found = []
    if streak["zero_updates"] == p:
        cause = ("their gradients are zero: the network is dead (e.g. its ReLUs died after a "
                 "divergence) or the loss does not depend on those weights"
                 if still.grad_norm == 0 else
                 f"their gradients are non-zero (norm {still.grad_norm:.3g}) but the optimizer "
                 "did not move them: learning rate 0 or skipped steps")
        over = "" if samples is None else _over(samples)
        found.append(_verdict(
            "zero_updates", 0.0, still, config,
            f"{still.still} of {len(still.last)} weight tensors did not change at all in {p} "
            f"logged optimizer steps{over}: {cause}. This is not a learning rate that is "
            "merely too low.", "If the loss diverged earlier, restart with a lower learning "
            "rate; check that the loss is connected to the parameters and the learning-rate "
            "schedule.", samples))
    if streak["too_low"] == p:
        found.append(_verdict(
            "too_low", median, reading, config,
            f"Median update ratio ||dw||/||w|| is {median:.3g} for {p} logged steps, below "
            f"{config.low:g} (healthy: around {GUIDE:g}).",
            "The learning rate is probably too low: raise it (try 10x).", samples))
    if (extreme and streak["too_high"] == 1) or streak["too_high"] == p:
        what = "a single update as large as the weights" if extreme else f"for {p} logged steps"
        found.append(_verdict(
            "too_high", median, reading, config,
            f"Median update ratio ||dw||/||w|| is {median:.3g} ({what}), above {config.high:g} "
            f"(healthy: around {GUIDE:g}).",
            "The learning rate is probably too high: lower it (try 10x), or clip gradients.",
            samples))
    return streak, found


def _over(samples: tuple[int, int]) -> str:
    """Where a logging step's weights were judged still: over how many samples and steps.

    Example:
        >>> _over((64, 1)), _over((32, 8))
        (' (each on a batch of 64 samples)', ' (each over 8 batches, 32 samples)')
    """
    n, batches = samples
    return (f" (each on a batch of {n} samples)" if batches <= 1 else
            f" (each over {batches} batches, {n} samples)")


def _verdict(code: str, value: float, reading: RatioReading, config: UpdateRatioConfig,
             message: str, advice: str, samples: tuple[int, int] | None) -> Verdict:
    details: dict[str, object] = {"ratios": dict(reading.last)}
    if samples is not None:
        details["samples"], details["batches"] = samples
    return Verdict(f"update_ratio.{code}", message, value, (config.low, config.high), details,
                   advice)


def ratio_summary(medians: Sequence[tuple[int, float]], config: UpdateRatioConfig) -> Verdict:
    """The INFO verdict ``update_ratio.summary``: the median ratio over the run's logging steps
    (``(step, median)`` pairs) against the recipe's guide of 1e-3.

    Example:
        >>> ratio_summary([(0, 1e-3), (10, 2e-3), (20, math.nan)], UpdateRatioConfig()).value
        0.0015
    """
    finite = [(m, s) for s, m in medians if math.isfinite(m)]
    code = "update_ratio.summary"
    if not finite:
        what = (f"all {len(medians)} measured steps gave a non-finite ratio" if medians
                else "no logging step ran in this fit")
        return Verdict(code, f"Update ratios: {what}.", None, None, severity=Severity.INFO)
    run = statistics.median(m for m, _ in finite)
    (low, low_at), (high, high_at) = min(finite), max(finite)
    skipped = len(medians) - len(finite)
    return Verdict(
        code,
        f"Median update ratio ||dw||/||w|| over {len(finite)} logged step(s): {run:.3g}, "
        f"{run / GUIDE:.3g}x the recipe's guide of about {GUIDE:g} (flagged outside "
        f"[{config.low:g}, {config.high:g}]); per step from {low:.3g} (step {low_at}) to "
        f"{high:.3g} (step {high_at})"
        + (f"; {skipped} non-finite step(s) left out" if skipped else "") + ".",
        run, (config.low, config.high),
        {"medians": [[s, m] for s, m in medians], "guide": GUIDE}, severity=Severity.INFO)

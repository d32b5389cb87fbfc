"""The overfit test's outcome and its verdict: what the run reached, the loss's own floor,
and the findings (recipe step 4; the run itself is :mod:`lightning_diag.checks.overfit`).

Example:
    >>> result = OverfitResult(True, 40, 2.30, 0.01, 1.0, 0.05, 2, accuracy_step=40)
    >>> [f.code for f in result.findings()]
    ['overfit.reached']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_diag.checks.overfit_trend import (
    PROJECTION_BUDGETS,
    SLOW_ACCURACY,
    LossTrend,
    loss_trend,
)
from lightning_diag.findings import Finding, Severity
from lightning_diag.isolation import OptimizationSettings

__all__ = ["ADVICE", "BEYOND_CONSTANT", "CHECK", "FLOOR_FRACTION", "LossFloor", "MARGINS",
           "MIN_FALL", "NO_LADDER_ADVICE", "OverfitResult", "RANGE_ADVICE", "SQUASH_ADVICE"]

CHECK = "OverfitSmallBatch"
ADVICE = (
    "With regularization off the network must memorize 5-10 batches (recipe step 4) and no "
    "learning rate of the ladder made it: look at the loss (no softmax before cross-entropy), "
    "the labels and the data pipeline, then try other architectures and weight "
    "initializations (step 4.2)."
)
NO_LADDER_ADVICE = (
    "With regularization off the network must memorize 5-10 batches (recipe step 4): check the "
    "loss (no softmax before cross-entropy), the labels and the data pipeline, then try other "
    "learning rates, architectures and weight initializations (step 4.2)."
)
SQUASH_ADVICE = (
    "Even a confident, correct output cannot bring this loss down: something squashes the "
    "output before the loss (no softmax or sigmoid before a loss that expects logits, e.g. "
    "`cross_entropy` or `binary_cross_entropy_with_logits`; give `nll_loss` log-probabilities)."
)
RANGE_ADVICE = (
    "The last activation cannot reach the targets: remove it (a regression usually outputs "
    "plain values), or scale the targets into its range."
)
#: Logit margins of the memorising output (the target class ``margin`` above the others),
#: along which the user's loss is evaluated (:class:`LossFloor`).
MARGINS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
#: A loss still falling at the largest margin yet at or above this fraction of its initial
#: value is squashed: even a confident, correct output leaves it there (a softmax before
#: cross-entropy: log(1 + (C - 1)/e), 63 % of log C for C = 10, 45 % for C = 2). See
#: docs/callbacks/overfit.md for the measurements it sits between.
FLOOR_FRACTION = 0.25
#: Where the loss rule decides (regression, per-position classes, inputs the step changed), a
#: run that fell by at least MIN_FALL of its initial loss, BEYOND_CONSTANT of that fall below
#: the loss of the best constant output, learned from its inputs: what is left is a floor of
#: the loss, of the data or of the model's capacity. Measured (tests/loss_programs.py, 3
#: seeds): healthy programs that stop at a floor fell by 28-93 % with 30-100 % of the fall
#: below the constant (a VAE lowest, 30-33 %); a network that cannot see its inputs or
#: memorize its targets 0.2-10 % (docs/callbacks/overfit.md has every margin).
MIN_FALL = 0.1
BEYOND_CONSTANT = 0.2


@dataclass(frozen=True)
class LossFloor:
    """The user's own loss at memorising outputs: the target class :data:`MARGINS` above the
    others (labels: ``+margin``/``-margin``), in the form the model outputs (logits,
    log-probabilities, probabilities), on the fixed batches.

    A plain cross-entropy falls to about 0 along them; one that regularizes confidence (label
    smoothing, a distillation term, mixed targets) has its minimum at a finite margin, its
    ``value`` a floor no network goes below; one whose output is squashed before it (a softmax
    before cross-entropy) still falls at the largest margin while staying high (see
    :meth:`squashed`).

    Example:
        >>> floor = LossFloor((0.0, 8.0, 32.0), [2.30, 1.46, 1.46])
        >>> floor.value, floor.margin, floor.squashed(initial_loss=2.30)
        (1.46, 32.0, True)
    """

    margins: tuple[float, ...]
    losses: list[float]

    @property
    def value(self) -> float:
        return min(self.losses)

    @property
    def margin(self) -> float:
        """The margin where the loss is lowest (the last one on a tie: still falling)."""
        low = self.value
        return max(m for m, v in zip(self.margins, self.losses, strict=True) if v == low)

    def squashed(self, initial_loss: float) -> bool:
        """Lowest at the largest margin, yet at or above :data:`FLOOR_FRACTION` of the
        (positive) initial loss."""
        return (initial_loss > 0 and self.margin == self.margins[-1]
                and self.value >= FLOOR_FRACTION * initial_loss)


@dataclass
class OverfitResult:
    """The outcome of :func:`lightning_diag.checks.overfit.overfit_small_batch`.

    For a per-sample classification (``(N, C)`` classes or ``(N, L)`` labels) whose model sees
    the batch's own inputs, the recipe's criterion decides: ``reached`` is True when, in one
    pass over the batches, every prediction was right, unless the output is ``squashed``.
    Other tasks use the loss rule: the pass's mean loss at most :attr:`target`, the measured
    ``floor`` plus ``loss_fraction`` (default 5 %) of the way from it to the initial loss (the
    floor is 0 where it is unknown or squashed). Training stops at the first pass meeting both
    (100 % and the loss target), so a loss above its target at 100 % accuracy is reported as
    information (``loss_above_target``), not as a failure: a trainable head on a frozen
    backbone reached 100 % with its loss at 0.073 against a 0.071 target after 1000 steps.

    ``floor`` is the user's loss at a memorising output (:class:`LossFloor`): about 0 for a
    plain cross-entropy, the entropy of the smoothed target under label smoothing. A loss that
    still falls at the largest margin yet stays at or above :data:`FLOOR_FRACTION` of its
    initial value is ``squashed``: a softmax applied before cross-entropy reaches 100 %
    accuracy but floors near ``log(1 + 9/e) = 1.46``, 63 % of ``log 10``; accuracy alone
    would call it a success. Where the loss rule decides and the run fell short,
    ``constant_loss`` (the loss of the best output shared by every sample) tells a
    ``natural_floor`` (the run learned from its inputs, see :data:`BEYOND_CONSTANT`) from a
    failure. A run that missed its target otherwise is ``slow`` (not stuck) when the loss's
    recent ``trend`` (:func:`~lightning_diag.checks.overfit_trend.loss_trend`) reaches the
    target within :data:`PROJECTION_BUDGETS` budgets of extra steps with at least
    :data:`SLOW_ACCURACY` of the predictions right (:meth:`judge_trend`): the multi-label
    family, at 99.2-99.8 % of its labels after 1000 steps, needed 0-332 more. ``steps`` counts
    optimizer steps; ``accuracy_step`` is the first step of a pass at
    100 %. ``ladder`` holds the learning rates tried when the configured one failed and no
    floor explains it (:func:`lightning_diag.checks.overfit.ladder_rates`), one result each.

    Per-position classification (pixels, tokens) has its accuracy measured and reported but
    not required: positions whose input does not determine the target cap it below 100 % for
    any model. So has a classification whose step feeds the model something other than the
    batch's input (mixup, augmentation inside the step): the batch's target is not the target
    of what the model saw. Measured on the tests' language models: the first token of a
    sequence, or the token after a random change of stride, left healthy LSTM/GRU models at
    93.6-99.5 % of the tokens after 600-1500 steps while their loss went below 5 % of
    ``log V``. A softmax before the loss is still seen squashed (segmentation: 50 % of the
    initial loss at a confident, correct output).
    """

    reached: bool
    steps: int
    initial_loss: float
    best_loss: float
    best_accuracy: float | None
    loss_fraction: float
    num_batches: int
    turned_off: list[str] = field(default_factory=list)
    curve: list[tuple[int, float, float | None]] = field(default_factory=list)
    task: str = "unknown"
    accuracy_required: bool = True
    lr: float | None = None
    settings: str = OptimizationSettings().describe()
    accuracy_step: int | None = None
    final_loss: float = math.nan
    ladder: list[OverfitResult] = field(default_factory=list)
    floor: LossFloor | None = None
    squashed: bool = False
    constant_loss: float | None = None
    natural_floor: bool = False
    loss_turned_off: list[str] = field(default_factory=list)
    probabilities: bool = False
    squash_reason: str = ""
    trend: LossTrend | None = None
    slow: bool = False

    @property
    def floor_value(self) -> float | None:
        """The floor the target starts from: the measured one, where it lies below the initial
        loss and is not squashed; None elsewhere (the target then starts from 0)."""
        floor = self.floor.value if self.floor is not None and not self.squashed else None
        return floor if floor is not None and floor < self.initial_loss else None

    @property
    def target(self) -> float:
        """The loss the rule asks for: ``loss_fraction`` of the way from the measured floor
        (0 when unknown or squashed) to the initial loss; -inf for a non-positive initial loss
        with no floor (no fraction of it is a target)."""
        floor = self.floor_value
        if floor is not None:
            return floor + self.loss_fraction * (self.initial_loss - floor)
        return self.loss_fraction * self.initial_loss if self.initial_loss > 0 else -math.inf

    def judge_trend(self) -> None:
        """Fit the loss's recent trend (:func:`~lightning_diag.checks.overfit_trend.loss_trend`)
        of a run that spent its budget short of the target, and call it ``slow`` (not stuck)
        when the trend reaches the target within :data:`PROJECTION_BUDGETS` budgets of extra
        steps and, where the accuracy is the criterion, the last pass had at least
        :data:`SLOW_ACCURACY` of the predictions right."""
        if self.reached or self.non_finite or not self.curve:
            return
        self.trend = loss_trend(self.curve, self.floor_value or 0.0, self.target)
        accuracy = self.curve[-1][2]
        self.slow = (self.trend is not None
                     and self.trend.extra_steps <= PROJECTION_BUDGETS * self.steps
                     and (accuracy is None or not self.accuracy_required
                          or accuracy >= SLOW_ACCURACY))

    @property
    def classification(self) -> bool:
        return self.best_accuracy is not None

    @property
    def loss_above_target(self) -> bool:
        """Reached on the accuracy while the loss is still above its target."""
        return self.reached and self.best_loss > self.target

    def beyond_constant(self) -> float | None:
        """The share of the loss's fall that lies below the best constant output's loss (1:
        all of it; 0: the run learned no more than a constant), or None when not measured or
        when the loss did not fall by :data:`MIN_FALL` of its initial value."""
        if self.constant_loss is None or not math.isfinite(self.best_loss):
            return None
        fall = self.initial_loss - self.best_loss
        if fall <= 0 or fall < MIN_FALL * abs(self.initial_loss):
            return None
        below = self.constant_loss - self.best_loss
        return below / max(fall, below)

    @property
    def non_finite(self) -> bool:
        return not math.isfinite(self.initial_loss) or not math.isfinite(self.best_loss)

    def rung(self) -> OverfitResult | None:
        """The first rate of the ladder that overfits, if any."""
        return next((r for r in self.ladder if r.reached), None)

    def ladder_details(self) -> dict[str, Any]:
        """The ladder for ``details["ladder"]``: the verdict, the rate that overfits, each rate."""
        found = self.rung()
        verdict = ("not_run" if not self.ladder else "no_rate" if found is None
                   else "lr_too_low" if (found.lr or 0) > (self.lr or 0) else "lr_too_high")
        return {"verdict": verdict, "configured_lr": self.lr,
                "overfits_at": None if found is None else found.lr,
                "steps": None if found is None else found.steps,
                "tried": [{"lr": r.lr, "reached": r.reached, "steps": r.steps,
                           "best_loss": r.best_loss, "best_accuracy": r.best_accuracy,
                           "non_finite": r.non_finite} for r in self.ladder]}

    def ladder_text(self) -> str:
        """The ladder's verdict in one sentence (empty when it did not run)."""
        if not self.ladder:
            return ""
        found = self.rung()
        if found is not None:
            way = "low" if (found.lr or 0) > (self.lr or 0) else "high"
            return (f"The learning-rate ladder overfits at lr {found.lr:.0e} in {found.steps} "
                    f"steps: the configured {self.lr:.3g} is too {way}.")
        rates = [r.lr for r in self.ladder if r.lr is not None] + [self.lr or math.nan]
        tried = ", ".join(f"{r.lr:.0e}" for r in self.ladder)
        return (f"No learning rate from {min(rates):.0e} to {max(rates):.0e} overfits (tried "
                f"{tried}, up to {max(r.steps for r in self.ladder)} steps each): look at the "
                "loss, the labels and the data pipeline.")

    def findings(self) -> list[Finding]:
        """``overfit.reached``, ``overfit.floor`` or ``overfit.slow`` (INFO),
        ``overfit.not_reached`` or ``overfit.non_finite`` (FAIL, or WARN when a rate of the
        ladder overfits)."""
        target = self.target
        off = ", ".join(self.turned_off + self.loss_turned_off) or "nothing to turn off"
        acc = ("" if self.best_accuracy is None
               else f"best accuracy {self.best_accuracy:.1%}, " if self.accuracy_required
               else f"best accuracy {self.best_accuracy:.1%} per position (not required), ")
        found = self.rung()
        ladder = {"ladder": self.ladder_details()} if self.ladder else {}
        severity = Severity.FAIL if found is None else Severity.WARN
        said = f" {self.ladder_text()}" if self.ladder else ""
        if self.non_finite:
            return [self._non_finite_finding(severity, said, ladder)]
        lr = f"lr {self.lr:.3g}, " if self.lr is not None else ""
        floor = ("" if self.floor is None or self.squashed or self.floor.value <= 1e-3 * abs(
            self.initial_loss) else f"; the loss's own floor {self.floor.value:.4g}, at a "
            f"memorising output of margin {self.floor.margin:g}")
        text = (f"{acc}best loss {self.best_loss:.4g} (initial {self.initial_loss:.4g}, target "
                f"<= {target:.4g}{floor}) on {self.num_batches} batches after {self.steps} "
                f"steps ({self.task}; {lr}{self.settings}); regularization off: {off}.")
        details: dict[str, Any] = {**ladder, **self._floor_details()}
        if self.reached:
            if self.loss_above_target:
                text = (f"100% accuracy at step {self.accuracy_step} (the recipe's criterion); "
                        f"the loss, still above its target, is information: {text}")
            return [Finding(CHECK, "overfit.reached", Severity.INFO, f"Overfit reached: {text}",
                            value=self.best_loss, expected=target,
                            details={"accuracy_step": self.accuracy_step,
                                     "loss_above_target": self.loss_above_target,
                                     **self._floor_details()})]
        if self.natural_floor:
            return [self._floor_finding(text, details)]
        if self.squashed:
            return [self._squashed_finding(text, details)]
        if self.slow and self.trend is not None:
            return [self._slow_finding(self.trend, text, details)]
        if self.initial_loss <= 0:
            text = (f"the initial loss {self.initial_loss:.4g} is not positive, so no fraction of "
                    f"it can be a target: a loss that falls below 0 is no likelihood (e.g. "
                    f"`nll_loss` given probabilities instead of log-probabilities). {text}")
        elif self.constant_loss is not None:
            below = self.beyond_constant()
            text = (f"{text} The loss of the best output shared by every sample is "
                    f"{self.constant_loss:.4g}: " + (
                        f"the run fell by less than {MIN_FALL:.0%} of its initial loss."
                        if below is None else f"only {below:.0%} of the run's fall lies below "
                        f"it (< {BEYOND_CONSTANT:.0%}): the network learns little from its "
                        "inputs."))
        if found is not None:
            advice = (f"Train at about lr {found.lr:.0e}: the network memorizes the sample "
                      "there (recipe 4.2); confirm with the learning-rate sweep (recipe 6.1).")
        else:
            advice = ADVICE if self.ladder else NO_LADDER_ADVICE
        return [Finding(CHECK, "overfit.not_reached", severity,
                        f"Could not overfit: {text}{said}", advice=advice, value=self.best_loss,
                        expected=target, details=details)]

    def _non_finite_finding(self, severity: Severity, said: str,
                            ladder: dict[str, Any]) -> Finding:
        found = self.rung()
        advice = (f"Train at about lr {found.lr:.0e} (recipe 4.2), then find the rate with "
                  "the sweep (recipe 6.1)." if found is not None else
                  "Lower the learning rate; look for log(0) or division by zero in the loss.")
        return Finding(CHECK, "overfit.non_finite", severity,
                       f"The loss became NaN/Inf within {self.steps} steps on "
                       f"{self.num_batches} batches (initial {self.initial_loss:.4g}).{said}",
                       advice=advice, value=self.best_loss, details=ladder)

    def _floor_finding(self, text: str, details: dict[str, Any]) -> Finding:
        share = self.beyond_constant() or 0.0
        return Finding(CHECK, "overfit.floor", Severity.INFO,
                       f"Overfit stopped at a floor: the loss fell from "
                       f"{self.initial_loss:.4g} to {self.best_loss:.4g}, {share:.0%} of "
                       f"that fall below {self.constant_loss:.4g}, the loss of the best "
                       f"output shared by every sample (>= {BEYOND_CONSTANT:.0%}): the "
                       f"network learns from its inputs, and what is left is a floor of "
                       f"the data (noise, targets the inputs do not determine) or of its "
                       f"capacity, not a bug in the learning process. {text}",
                       value=self.best_loss, expected=self.target, details=details,
                       advice="Nothing to fix for the recipe's step 4. To be sure the rest "
                       "is the data's, a larger model should go lower on the same sample.")

    def _slow_finding(self, trend: LossTrend, text: str, details: dict[str, Any]) -> Finding:
        accuracy = self.curve[-1][2]
        right = ("" if accuracy is None else f" {accuracy:.1%} of the predictions were right in "
                 "the last pass" + (f" (>= {SLOW_ACCURACY:.0%})." if self.accuracy_required
                                    else " (not required)."))
        pace = (f"over the last {trend.window_steps} steps its distance to the floor halved "
                f"every {trend.halving_steps:.0f} steps")
        where = (f"The loss {self.final_loss:.4g} is at its target (<= {self.target:.4g}) and "
                 f"still falls: {pace}; the accuracy is short." if trend.extra_steps == 0 else
                 f"The loss {self.final_loss:.4g} (target <= {self.target:.4g}) still falls "
                 f"steadily: {pace}, which reaches the target in about "
                 f"{trend.extra_steps:.0f} more steps (<= {PROJECTION_BUDGETS:g}x the budget; a "
                 "stuck run needs many times more, or never).")
        return Finding(CHECK, "overfit.slow", Severity.INFO,
                       f"Overfit not reached within the {self.steps} steps, but getting there. "
                       f"{where}{right} {text}",
                       advice="Nothing to fix in the program: a higher learning rate (recipe "
                       "6.1's sweep finds it) or more steps (`max_steps`) memorize the sample "
                       "faster. The learning-rate ladder was not run.",
                       value=self.best_loss, expected=self.target,
                       details={**details, "trend": {
                           "slope": trend.slope, "halving_steps": trend.halving_steps,
                           "extra_steps": trend.extra_steps, "window_steps": trend.window_steps,
                           "last_accuracy": accuracy}})

    def _squashed_finding(self, text: str, details: dict[str, Any]) -> Finding:
        at = (f"100% accuracy at step {self.accuracy_step}, but " if self.accuracy_step
              is not None and self.accuracy_required else "")
        probs = (" The model's output itself is probabilities (it sums to 1 or comes "
                 "out of a sigmoid), and the loss squashes it again." if self.probabilities
                 else "")
        floor = self.floor.value if self.floor else math.nan
        why = self.squash_reason or (
            f"even a confident, correct output (margin {MARGINS[-1]:g} on the target) "
            f"leaves the loss at {floor:.4g}, {floor / self.initial_loss:.0%} of "
            f"its initial value (>= {FLOOR_FRACTION:.0%}): something squashes the output "
            f"before the loss, e.g. a softmax before cross-entropy.{probs}")
        return Finding(CHECK, "overfit.not_reached", Severity.FAIL,
                       f"Could not overfit: {at}{why} {text}",
                       advice=RANGE_ADVICE if self.squash_reason else SQUASH_ADVICE,
                       value=self.best_loss, expected=self.target, details=details)

    def _floor_details(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.floor is not None:
            out["floor"] = {"margins": list(self.floor.margins), "losses": self.floor.losses,
                            "value": self.floor.value, "squashed": self.squashed}
        if self.constant_loss is not None:
            out["constant_loss"] = self.constant_loss
            out["beyond_constant"] = self.beyond_constant()
        return out

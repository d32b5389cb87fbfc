"""Recipe step 4: overfit a few fixed batches with regularization off, on a copy.

Example:
    >>> from lightning_diag.examples.digits import DigitsClassifier, load_digits_tensors
    >>> from lightning_diag.checks.overfit import overfit_small_batch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> x, y = load_digits_tensors()
    >>> loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    >>> result = overfit_small_batch(DigitsClassifier(arch="mlp", lr=1e-2), loader, num_batches=2)
    >>> result.reached, result.best_accuracy
    (True, 1.0)

Accuracy is measured for every classification shape the task inference knows (per sample,
per pixel, per token, per label: :func:`lightning_diag.functional.task.correct_counts`); other
tasks use the loss rule alone. The loss's own floor is measured, not assumed: the user's loss
at a memorising output (:class:`LossFloor`) tells a floor of the loss itself (label smoothing,
distillation) from a squashed output (a softmax before cross-entropy), and where the loss rule
is the criterion, a loss that stopped far below the best constant output has met a floor of the
data or of the model (noise, random tokens), not a bug. Training reproduces the main run's
optimization when given its :class:`~lightning_diag.isolation.OptimizationSettings` (clipping,
accumulation, precision) and uses the learning rate the module's ``configure_optimizers`` sets
(schedulers included). When the sample cannot be overfit at that rate and no floor explains it,
a short ladder of other rates (recipe 4.2: :func:`ladder_rates`) tells a learning rate that is
off from a bug no rate fixes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_diag.batch import (
    BatchFn,
    NoLossError,
    OutputCapture,
    UserCodeError,
    call_user,
    default_batch_to_input,
    default_batch_to_target,
    step_loss,
)
from lightning_diag.checks.reference_outputs import (
    Prediction,
    PredictionTap,
    Replay,
    ReplayMiss,
    Substitution,
    main_prediction,
    record_predictions,
)
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.task import (
    Task,
    correct_counts,
    infer_task,
    memorising_output,
    select_output,
)
from lightning_diag.isolation import (
    OptimizationSettings,
    RNGState,
    SideTraining,
    StepState,
    disable_regularization,
    first_batches,
    fresh_optimizer,
    preserved_rng,
    side_experiment,
)
from lightning_diag.validation import (
    check_callable,
    check_flag,
    check_int,
    check_number,
    check_str,
)

__all__ = ["BEYOND_CONSTANT", "FLOOR_FRACTION", "LossFloor", "MARGINS", "MIN_FALL",
           "OverfitResult", "ladder_rates", "overfit_batches", "overfit_small_batch",
           "validate_arguments"]

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
#: The recipe's default learning rates (step 6.1), tried after x10 and x0.1 the configured one.
RECIPE_RATES = (1e-1, 1e-2, 1e-3, 1e-4)
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
#: L-BFGS iterations fitting the best constant output (:meth:`_Run.constant_loss`).
CONSTANT_ITERATIONS = 30
#: Called after each pass over the batches with ``(step, mean loss, accuracy or None)``.
PassHook = Callable[[int, float, "float | None"], None]
#: Called after each pass of a ladder rate with ``(lr, step, mean loss, accuracy or None)``.
LadderHook = Callable[[float, int, float, "float | None"], None]


def ladder_rates(configured: float) -> list[float]:
    """The learning rates tried when ``configured`` cannot overfit, in order: x10 and x0.1,
    then the recipe's 1e-1, 1e-2, 1e-3, 1e-4, each skipped within a factor of 3 of a rate
    already in the list (or of ``configured``).

    Example:
        >>> ladder_rates(1e-5)
        [0.0001, 1e-06, 0.1, 0.01, 0.001]
        >>> ladder_rates(1e-3)
        [0.01, 0.0001, 0.1]
    """
    out: list[float] = []
    for lr in (float(f"{configured * 10:.3g}"), float(f"{configured / 10:.3g}"), *RECIPE_RATES):
        if all(max(lr, o) / min(lr, o) >= 3 for o in (configured, *out)):
            out.append(lr)
    return out


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
    """The outcome of :func:`overfit_small_batch`.

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
    failure. ``steps`` counts optimizer steps; ``accuracy_step`` is the first step of a pass at
    100 %. ``ladder`` holds the learning rates tried when the configured one failed and no
    floor explains it (:func:`ladder_rates`), one result each.

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

    @property
    def target(self) -> float:
        """The loss the rule asks for: ``loss_fraction`` of the way from the measured floor
        (0 when unknown or squashed) to the initial loss; -inf for a non-positive initial loss
        with no floor (no fraction of it is a target)."""
        floor = self.floor.value if self.floor is not None and not self.squashed else None
        if floor is not None and floor < self.initial_loss:
            return floor + self.loss_fraction * (self.initial_loss - floor)
        return self.loss_fraction * self.initial_loss if self.initial_loss > 0 else -math.inf

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
        """``overfit.reached`` or ``overfit.floor`` (INFO), ``overfit.not_reached`` or
        ``overfit.non_finite`` (FAIL, or WARN when a rate of the ladder overfits)."""
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
            advice = (f"Train at about lr {found.lr:.0e} (recipe 4.2), then find the rate with "
                      "the sweep (recipe 6.1)." if found is not None else
                      "Lower the learning rate; look for log(0) or division by zero in the loss.")
            return [Finding(CHECK, "overfit.non_finite", severity,
                            f"The loss became NaN/Inf within {self.steps} steps on "
                            f"{self.num_batches} batches (initial {self.initial_loss:.4g}).{said}",
                            advice=advice, value=self.best_loss, details=ladder)]
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
            share = self.beyond_constant() or 0.0
            return [Finding(CHECK, "overfit.floor", Severity.INFO,
                            f"Overfit stopped at a floor: the loss fell from "
                            f"{self.initial_loss:.4g} to {self.best_loss:.4g}, {share:.0%} of "
                            f"that fall below {self.constant_loss:.4g}, the loss of the best "
                            f"output shared by every sample (>= {BEYOND_CONSTANT:.0%}): the "
                            f"network learns from its inputs, and what is left is a floor of "
                            f"the data (noise, targets the inputs do not determine) or of its "
                            f"capacity, not a bug in the learning process. {text}",
                            value=self.best_loss, expected=target, details=details,
                            advice="Nothing to fix for the recipe's step 4. To be sure the rest "
                            "is the data's, a larger model should go lower on the same sample.")]
        if self.squashed:
            at = (f"100% accuracy at step {self.accuracy_step}, but " if self.accuracy_step
                  is not None and self.accuracy_required else "")
            probs = (" The model's output itself is probabilities (it sums to 1 or comes "
                     "out of a sigmoid), and the loss squashes it again." if self.probabilities
                     else "")
            why = self.squash_reason or (
                f"even a confident, correct output (margin {MARGINS[-1]:g} on the target) "
                f"leaves the loss at {self.floor.value if self.floor else math.nan:.4g}, "
                f"{(self.floor.value if self.floor else math.nan) / self.initial_loss:.0%} of "
                f"its initial value (>= {FLOOR_FRACTION:.0%}): something squashes the output "
                f"before the loss, e.g. a softmax before cross-entropy.{probs}")
            text = f"{at}{why} {text}"
            return [Finding(CHECK, "overfit.not_reached", Severity.FAIL,
                            f"Could not overfit: {text}",
                            advice=RANGE_ADVICE if self.squash_reason else SQUASH_ADVICE,
                            value=self.best_loss, expected=target, details=details)]
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

    def _floor_details(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.floor is not None:
            out["floor"] = {"margins": list(self.floor.margins), "losses": self.floor.losses,
                            "value": self.floor.value, "squashed": self.squashed}
        if self.constant_loss is not None:
            out["constant_loss"] = self.constant_loss
            out["beyond_constant"] = self.beyond_constant()
        return out


def validate_arguments(*, max_steps: Any, loss_fraction: Any, reg_attr: Any,
                       batch_to_target: Any, lr_ladder: Any = True) -> None:
    """Check the arguments of :func:`overfit_batches` (see :mod:`lightning_diag.validation`).

    Example:
        >>> validate_arguments(max_steps=100, loss_fraction=1.0, reg_attr=None,
        ...                    batch_to_target=print)
        Traceback (most recent call last):
        ...
        ValueError: `loss_fraction` must be a number in (0, 1), got 1.0.
    """
    check_flag("lr_ladder", lr_ladder)
    check_int("max_steps", max_steps)
    check_number("loss_fraction", loss_fraction, low=0, high=1, low_open=True, high_open=True)
    check_str("reg_attr", reg_attr, optional=True)
    check_callable("batch_to_target", batch_to_target)


def overfit_small_batch(
    module: pl.LightningModule, dataloader: DataLoader, *, num_batches: int = 5, **kwargs: Any
) -> OverfitResult:
    """Overfit a copy of ``module`` on the first ``num_batches`` batches of ``dataloader``.

    The batches are read in dataset order without touching the dataloader's sampler; the other
    keyword arguments are those of :func:`overfit_batches`.

    Raises:
        ValueError: an empty dataloader or no optimizer.
        UserCodeError: the dataset, ``configure_optimizers``, ``training_step`` or
            ``batch_to_target`` raised.
    """
    check_int("num_batches", num_batches)
    with preserved_rng():
        batches = first_batches(dataloader, num_batches, module.device)
    return overfit_batches(module, batches, **kwargs)


def overfit_batches(
    module: pl.LightningModule,
    batches: list[Any],
    *,
    max_steps: int = 1000,
    loss_fraction: float = 0.05,
    reg_attr: str | None = None,
    batch_to_target: BatchFn = default_batch_to_target,
    settings: OptimizationSettings | None = None,
    progress_bar: bool = False,
    on_pass: PassHook | None = None,
    lr_ladder: bool = True,
    on_ladder_pass: LadderHook | None = None,
) -> OverfitResult:
    """Train a copy of ``module`` on the fixed ``batches`` until it has overfit them.

    Regularization is off (dropout in eval mode, optimizer weight decay 0, ``reg_attr`` 0;
    BatchNorm stays in train mode) and the optimizer is a fresh one from the copy's
    ``configure_optimizers`` (at the learning rate it sets, a scheduler's initial factor
    included; the scheduler is not stepped). Training cycles over the batches for up to
    ``max_steps`` optimizer steps, as ``settings`` says the main run steps, and stops at the
    first pass that meets the rule of :class:`OverfitResult`. The loss and accuracy of a pass
    are those of each batch just before its update, the output being recorded inside the
    module's own ``training_step``. A state the step carries between calls (``self.hidden``)
    starts every pass from the live module's value, as the first pass did, and carries on from
    batch to batch within it. ``module`` and every RNG stream are left untouched.

    Regularization inside the loss is turned off where a loss module says it
    (``label_smoothing`` of a ``CrossEntropyLoss``) and accounted for everywhere else: the
    user's loss at memorising outputs (:class:`LossFloor`) gives the floor the loss target
    starts from, and shows a squashed output. Where the loss rule decides and the run falls
    short, the loss of the best output shared by every sample (fitted through the user's step)
    tells a floor of the data from a failure (:data:`BEYOND_CONSTANT`).

    When the configured learning rate does not overfit (the loss target missed, or a NaN) and
    no floor explains it, ``lr_ladder`` tries the rates of :func:`ladder_rates` in order, each
    on a fresh copy with the same ``max_steps`` budget, and stops at the first that overfits;
    not when the initial loss itself is not finite or not positive, nor when the output is
    squashed (no rate changes those). The cost: at most ``len(ladder_rates(lr))`` (5 or fewer)
    more runs of up to ``max_steps`` steps, paid only when the test fails.

    Args:
        module: The LightningModule, as initialized.
        batches: The fixed batches (recipe: 5-10).
        max_steps: Optimizer steps before giving up.
        loss_fraction: Success needs the pass loss at most this fraction of the initial loss.
        reg_attr: Attribute or hparam scaling a regularization term in the loss; set to 0.
        batch_to_target: Extracts the target, for the accuracy and the task inference.
        settings: The main run's clipping, accumulation and precision
            (``OptimizationSettings.from_trainer(trainer)``); default: a plain float32 step.
        progress_bar: Show a tqdm bar.
        on_pass: Called after each pass with ``(step, loss, accuracy or None)``.
        lr_ladder: Try other learning rates when the configured one fails.
        on_ladder_pass: Called after each pass of a ladder rate with ``(lr, step, loss,
            accuracy or None)``.

    Raises:
        ValueError: no batches, or no optimizer.
        UserCodeError: ``configure_optimizers``, ``training_step`` or ``batch_to_target``
            raised.
    """
    validate_arguments(max_steps=max_steps, loss_fraction=loss_fraction, reg_attr=reg_attr,
                       batch_to_target=batch_to_target, lr_ladder=lr_ladder)
    if not batches:
        raise ValueError("`batches` is empty: give at least one training batch.")
    attempt = _Attempt(batches, max_steps, loss_fraction, reg_attr, batch_to_target,
                       settings if settings is not None else OptimizationSettings())
    result = attempt.run(module, None, progress_bar, on_pass, judge_floor=True)
    if (lr_ladder and not result.reached and not result.natural_floor and not result.squashed
            and result.lr and math.isfinite(result.initial_loss) and result.initial_loss > 0):
        for lr in ladder_rates(result.lr):
            hook = None if on_ladder_pass is None else _bound(on_ladder_pass, lr)
            rung = attempt.run(module, lr, False, hook, judge_floor=False)
            result.ladder.append(rung)
            if rung.reached:
                break
    return result


def _bound(hook: LadderHook, lr: float) -> PassHook:
    return lambda step, loss, acc: hook(lr, step, loss, acc)


@dataclass
class _Attempt:
    """Everything one overfitting run needs but its learning rate."""

    batches: list[Any]
    max_steps: int
    loss_fraction: float
    reg_attr: str | None
    batch_to_target: BatchFn
    settings: OptimizationSettings

    def run(self, module: pl.LightningModule, lr: float | None, progress_bar: bool,
            on_pass: PassHook | None, judge_floor: bool) -> OverfitResult:
        """One run on a fresh copy of ``module``; at ``lr`` when given (every param group
        scaled alike, so that their ratios stay the user's), else at the configured rate. With
        ``judge_floor``, a loss-rule run that falls short has its best constant output fitted
        (:attr:`OverfitResult.natural_floor`)."""
        settings = self.settings
        with side_experiment(module) as clone:
            clone.train()
            settings.prepare(clone)
            state = StepState(clone, settings.dtype if not settings.mixed else None)
            state.restore()  # in the run's dtype
            optimizer = fresh_optimizer(clone)
            if lr is not None:
                factor = lr / float(optimizer.param_groups[0]["lr"])
                for group in optimizer.param_groups:
                    group["lr"] = float(group["lr"]) * factor
            turned_off = disable_regularization(clone, optimizer, self.reg_attr)
            # the step's own `clip_gradients` calls, recorded by the copy's view
            clips = getattr(clone.trainer, "clips", None)
            run = _Run(clone, [settings.cast(b) for b in self.batches], self.batch_to_target,
                       settings, SideTraining(optimizer, settings, clone.device, clips), state)
            result = OverfitResult(False, 0, math.nan, math.inf, None, self.loss_fraction,
                                   len(self.batches), turned_off,
                                   lr=float(optimizer.param_groups[0]["lr"]),
                                   settings=settings.describe(),
                                   loss_turned_off=_loss_regularization_off(clone))
            with OutputCapture(clone) as capture, run.record(capture):
                with torch.no_grad():
                    result.initial_loss = run.one_pass(capture, len(self.batches),
                                                       train=False)[0]
                result.task = run.task.describe() if run.task is not None else "unknown task"
                classification = run.task is not None and run.task.is_classification
                result.accuracy_required = not run.per_position and (
                    run.saw_batch_input or not classification)
                result.probabilities = run.probabilities
                result.floor = run.loss_floor()
                result.squashed = (result.floor is not None
                                   and result.floor.squashed(result.initial_loss))
                _train(run, capture, result, self.max_steps, progress_bar, on_pass)
                if not result.reached and not result.squashed:
                    result.squash_reason = run.range_squash()
                    result.squashed = bool(result.squash_reason)
                if (judge_floor and not result.reached and not result.squashed
                        and not (classification and result.accuracy_required)
                        and math.isfinite(result.best_loss)):
                    result.constant_loss = run.constant_loss()
                    share = result.beyond_constant()
                    result.natural_floor = share is not None and share >= BEYOND_CONSTANT
        return result


def _loss_regularization_off(module: torch.nn.Module) -> list[str]:
    """Turn off label smoothing on the copy's loss modules (``label_smoothing`` of
    ``torch.nn.CrossEntropyLoss``, or any module attribute of that name); what was turned off.
    Smoothing given as an argument of a functional call cannot be reached: the measured floor
    accounts for it."""
    changed = []
    for name, m in module.named_modules():
        value = getattr(m, "label_smoothing", None)
        if isinstance(value, float) and value > 0:
            m.label_smoothing = 0.0
            changed.append(f"label smoothing {value:g} (`{name or type(m).__name__}`)")
    return changed


class _Run:
    """The copy, its fixed batches and how it steps: one pass at a time."""

    def __init__(self, clone: pl.LightningModule, batches: list[Any], to_target: BatchFn,
                 settings: OptimizationSettings, training: SideTraining,
                 state: StepState) -> None:
        self.clone, self.batches = clone, batches
        self.settings, self.training, self.state = settings, training, state
        self.targets = [call_user("`batch_to_target`", to_target, b) for b in batches]
        self.task: Task | None = None
        self.predictions: list[Prediction] = []
        self.main: int | None = None
        self.saw_batch_input = True
        self.tap: PredictionTap | None = None
        self.replay: Replay | None = None
        self._replay_tried = False
        self.last_outputs: list[torch.Tensor] = []

    @property
    def probabilities(self) -> bool:
        """The model's prediction itself is probabilities (a softmax or a sigmoid in it)."""
        return (self.main is not None
                and self.predictions[self.main].form.activation in ("softmax", "sigmoid"))

    @contextmanager
    def record(self, capture: OutputCapture) -> Iterator[None]:
        """Record the predictions of the step (on the first batch, RNG streams and carried
        state put back), whether the model saw the batch's own input, and, inside, tap the
        main prediction of every step (the output the task is read from)."""
        batch = self.batches[0]
        with preserved_rng():
            capture.clear()
            with self.settings.forward_context(self.clone.device):
                _, self.predictions, tensors = record_predictions(self.clone, batch, 0)
            output = select_output(capture.output)
        self.state.restore()
        self.main = main_prediction(self.predictions, tensors, output)
        if self.main is None:
            yield
            return
        try:
            given = default_batch_to_input(batch)
        except ValueError:  # a batch the default cannot read: nothing to compare
            given = None
        if isinstance(given, torch.Tensor):
            self.saw_batch_input = any(_same_values(t, given)
                                       for t in self.predictions[self.main].inputs)
        with PredictionTap(self.predictions[self.main]) as tap:
            self.tap = tap
            try:
                yield
            finally:
                self.tap = None

    def _mean_loss(self, replace: Callable[[int, torch.Tensor], torch.Tensor | None],
                   batch_replace: Callable[[int], None] | None = None) -> torch.Tensor:
        """The mean step loss over the batches with the predictions replaced, from the carried
        state and the same RNG state for each batch; the network's outputs replayed where that
        gives the real losses (:meth:`_prepare_replay`)."""
        self._prepare_replay()
        try:
            return self._pass(replace, batch_replace, self.replay)
        except UserCodeError as err:
            if self.replay is None or not isinstance(err.error, ReplayMiss):
                raise
            self.replay = None  # the replaced output changed what the step calls
            return self._pass(replace, batch_replace, None)

    def _pass(self, replace: Callable[[int, torch.Tensor], torch.Tensor | None],
              batch_replace: Callable[[int], None] | None,
              replay: Replay | None) -> torch.Tensor:
        rng = RNGState.capture()
        self.state.restore()
        losses = []
        try:
            with Substitution(self.predictions, replace) as sub, (
                    replay.replaying() if replay is not None else nullcontext()):
                for i, batch in enumerate(self.batches):
                    if batch_replace is not None:
                        batch_replace(i)
                    if replay is not None:
                        replay.step(i)
                    rng.restore()
                    with self.settings.forward_context(self.clone.device):
                        losses.append(sub.step(self.clone, batch, i).float())
        finally:
            rng.restore()
            self.state.restore()
        return torch.stack(losses).mean()

    def _prepare_replay(self) -> None:
        """Record the prediction modules' outputs on every batch once, and keep them for the
        reference passes when replaying them (nothing replaced) gives the real losses: the
        loss then depends on the network through them alone, and the many evaluations of the
        floor and of the constant output cost no forward pass of the network."""
        if self._replay_tried or not self.predictions:
            return
        self._replay_tried = True
        replay = Replay(self.predictions)
        rng = RNGState.capture()
        self.state.restore()
        try:
            with preserved_rng(), torch.no_grad():
                with replay.recording():
                    for i, batch in enumerate(self.batches):
                        replay.step(i)
                        rng.restore()
                        with self.settings.forward_context(self.clone.device):
                            replay.losses[i] = float(step_loss(self.clone, batch, i))
                replayed = {}
                with replay.replaying():
                    self.state.restore()
                    for i, batch in enumerate(self.batches):
                        replay.step(i)
                        rng.restore()
                        with self.settings.forward_context(self.clone.device):
                            replayed[i] = float(step_loss(self.clone, batch, i))
            self.replay = replay if replay.matches(replayed) else None
        except (UserCodeError, NoLossError):  # not replayable: the network runs each time
            self.replay = None
        finally:
            rng.restore()
            self.state.restore()

    def loss_floor(self) -> LossFloor | None:
        """The user's loss at memorising outputs (:class:`LossFloor`) where the prediction is
        one tensor of a classification task; None elsewhere, when the step fails on it, or
        when the loss does not judge the output against the target the way the task says (a
        confidently wrong output must be worse than a know-nothing one). Where two class
        layouts fit the output (``(N, T, V)`` with ``T = V``), the one the loss confirms is
        kept, and becomes the task."""
        task = self.task
        if (task is None or not task.is_classification or len(self.predictions) != 1
                or self.main != 0 or not all(isinstance(t, torch.Tensor) for t in self.targets)):
            return None
        found = []
        for layout in _layouts(task, self.predictions[0].shape, self.targets[0]):
            try:
                path = [self._memorised(layout, m) for m in MARGINS]
                best = MARGINS[min(range(len(path)), key=path.__getitem__)]
                wrong = self._memorised(layout, best, wrong=True)
            except (UserCodeError, NoLossError, RuntimeError):  # a step refusing the output
                continue
            if all(map(math.isfinite, path)) and wrong > path[0]:
                found.append((min(path), layout, LossFloor(MARGINS, path)))
        if not found:
            return None
        _, self.task, floor = min(found, key=lambda f: f[0])
        return floor

    def _memorised(self, task: Task, margin: float, wrong: bool = False) -> float:
        """The mean loss at the memorising output of ``margin`` (on the next class when
        ``wrong``)."""
        current = [0]

        def set_batch(i: int) -> None:
            current[0] = i

        def replace(_: int, out: torch.Tensor) -> torch.Tensor | None:
            target = self.targets[current[0]]
            if wrong:
                classes = int(task.num_classes or 2)
                target = (1 - target if task.kind == "multilabel"
                          else torch.where(target >= 0, (target + 1) % classes, target))
            return memorising_output(task, out, target, margin)

        with preserved_rng(), torch.no_grad():
            return float(self._mean_loss(replace, set_batch))

    def constant_loss(self) -> float | None:
        """The loss of the best output shared by every sample (one value per position, fitted
        by L-BFGS through the user's step); None where it cannot be fitted."""
        if not self.predictions:
            return None
        device = self.clone.device
        params = [torch.zeros(p.shape[1:], device=device, requires_grad=True)
                  for p in self.predictions]

        def replace(j: int, actual: torch.Tensor) -> torch.Tensor:
            if tuple(actual.shape[1:]) != tuple(params[j].shape):
                raise _ShapeChanged
            z = params[j].to(actual.dtype).expand_as(actual)
            return self.predictions[j].form.activate(z)

        optimizer = torch.optim.LBFGS(params, max_iter=CONSTANT_ITERATIONS,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = self._mean_loss(replace)
            loss.backward()
            return loss

        try:
            with preserved_rng(), torch.enable_grad():
                optimizer.step(closure)
                with torch.no_grad():
                    value = float(self._mean_loss(replace))
        except (_ShapeChanged, UserCodeError, NoLossError, RuntimeError):
            return None
        return value if math.isfinite(value) else None

    @property
    def per_position(self) -> bool:
        """Classes scored per pixel or token: targets beyond ``(N,)``."""
        target = self.targets[0]
        return (self.task is not None and self.task.kind == "multiclass"
                and isinstance(target, torch.Tensor) and target.dim() > 1)

    def one_pass(self, capture: OutputCapture, count: int,
                 train: bool) -> tuple[float, float | None, int]:
        """Mean loss, pooled accuracy (None unless classification) and optimizer steps taken
        over the first ``count`` batches."""
        losses, correct, counted, steps = [], 0, 0, 0
        outputs = []
        # Every pass starts from the live module's carried state (self.hidden), as the first
        # did: the batches keep the context they were read in.
        self.state.restore()
        for i, batch in enumerate(self.batches[:count]):
            capture.clear()
            if self.tap is not None:
                self.tap.reset()
            with self.settings.forward_context(self.clone.device):
                loss = step_loss(self.clone, batch, i)
            if train and self.training.backward(loss, last=i == count - 1):
                steps += 1
            losses.append(float(loss.detach()))
            tapped = self.tap.value if self.tap is not None else None
            output = tapped if tapped is not None else select_output(capture.output)
            if self.task is None:
                self.task = infer_task(output, self.targets[i])
            counts = (correct_counts(self.task, output, self.targets[i])
                      if self.task.is_classification and isinstance(output, torch.Tensor)
                      else None)
            if counts is not None:
                correct, counted = correct + counts[0], counted + counts[1]
            if isinstance(output, torch.Tensor):
                outputs.append(output.detach())
        self.last_outputs = outputs
        return sum(losses) / len(losses), (correct / counted if counted else None), steps

    def range_squash(self) -> str:
        """Why the last pass's output is squashed, when it is shown (else ``""``): a bounded
        activation (a sigmoid, an exponential) whose range leaves out at least
        :data:`FLOOR_FRACTION` of the targets, with at least that share of the outputs pinned
        at its bound."""
        task = self.task
        if (task is None or task.kind != "regression" or self.main is None
                or len(self.last_outputs) != len(self.targets)):
            return ""
        form = self.predictions[self.main].form
        try:
            outputs = torch.cat([o.reshape(-1) for o in self.last_outputs])
            targets = torch.cat([t.reshape(-1) for t in self.targets]).to(outputs.device)
        except (RuntimeError, AttributeError):  # targets of another structure
            return ""
        if outputs.numel() != targets.numel():
            return ""
        outside, pinned = form.out_of_range(outputs, targets)
        if outside < FLOOR_FRACTION or pinned < FLOOR_FRACTION:
            return ""
        low, high = form.range or (0.0, 0.0)
        return (f"the output comes out of a {form.activation}, in ({low:g}, {high:g}), yet "
                f"{outside:.0%} of the targets lie outside it (from {float(targets.min()):.3g} "
                f"to {float(targets.max()):.3g}) and {pinned:.0%} of the outputs are pinned at "
                f"its bound (>= {FLOOR_FRACTION:.0%} each): something squashes the output.")


def _layouts(task: Task, shape: tuple[int, ...], target: torch.Tensor) -> list[Task]:
    """``task``, and the other class layout where the output's shape fits both (a class
    dimension 1 or last: ``(N, T, V)`` with ``T = V``)."""
    if task.kind != "multiclass" or task.flattened or len(shape) < 3:
        return [task]
    other = -1 if task.class_dim == 1 else 1
    fits = (tuple(shape[:-1]) == tuple(target.shape) if other == -1
            else tuple(shape[2:]) == tuple(target.shape[1:]))
    return [task, dataclasses.replace(task, class_dim=other)] if fits else [task]


class _ShapeChanged(Exception):
    """The prediction's shape changes between batches: no single constant output fits."""


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, whatever the shape (a flattening view of the batch's input)."""
    return (a.numel() == b.numel() and a.dtype.is_floating_point == b.dtype.is_floating_point
            and torch.equal(a.reshape(-1), b.detach().reshape(-1).to(a.device, a.dtype)))


def _train(run: _Run, capture: OutputCapture, result: OverfitResult, max_steps: int,
           progress_bar: bool, on_pass: PassHook | None) -> None:
    from tqdm.auto import tqdm

    classification = run.task is not None and run.task.is_classification
    if not math.isfinite(result.initial_loss) or (result.initial_loss <= 0 and classification):
        result.best_loss = result.initial_loss
        return
    target = result.target
    window = run.settings.accumulate_grad_batches
    with tqdm(total=max_steps, desc=CHECK, disable=not progress_bar, leave=False) as bar:
        while result.steps < max_steps:
            count = min(len(run.batches), (max_steps - result.steps) * window)
            loss, acc, steps = run.one_pass(capture, count, train=True)
            result.steps += steps
            bar.update(steps)
            bar.set_postfix(loss=f"{loss:.4g}", acc="-" if acc is None else f"{acc:.1%}")
            result.curve.append((result.steps, loss, acc))
            if on_pass is not None:
                on_pass(result.steps, loss, acc)
            result.final_loss = loss
            if not math.isfinite(loss):
                result.best_loss = loss
                return
            result.best_loss = min(result.best_loss, loss)
            if acc is not None:
                result.best_accuracy = max(result.best_accuracy or 0.0, acc)
                if acc >= 1.0 and result.accuracy_step is None:
                    result.accuracy_step = result.steps
            if loss <= target and (acc is None or acc >= 1.0 or not result.accuracy_required):
                result.reached = True
                return
    # The budget is spent: the recipe's criterion, 100 % accuracy, decides a per-sample
    # classification, unless a confident, correct output cannot bring its loss down.
    result.reached = (result.accuracy_required and result.accuracy_step is not None
                      and not result.squashed)

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
tasks use the loss rule alone. Training reproduces the main run's optimization when given its
:class:`~lightning_diag.isolation.OptimizationSettings` (clipping, accumulation, precision)
and uses the learning rate the module's ``configure_optimizers`` sets (schedulers included).
When the sample cannot be overfit at that rate, a short ladder of other rates (recipe 4.2:
:func:`ladder_rates`) tells a learning rate that is off from a bug no rate fixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_diag.batch import (
    BatchFn,
    OutputCapture,
    call_user,
    default_batch_to_target,
    step_loss,
)
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.task import Task, correct_counts, infer_task, select_output
from lightning_diag.isolation import (
    OptimizationSettings,
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

__all__ = ["FLOOR_FRACTION", "OverfitResult", "ladder_rates", "overfit_batches",
           "overfit_small_batch", "validate_arguments"]

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
#: At 100 % accuracy, a loss still at or above this fraction of its initial value has a floor
#: no training removes (a squashing before the loss). See docs/callbacks/overfit.md for the
#: measurements it sits between.
FLOOR_FRACTION = 0.25
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


@dataclass
class OverfitResult:
    """The outcome of :func:`overfit_small_batch`.

    For a per-sample classification (``(N, C)`` classes or ``(N, L)`` labels) the recipe's
    criterion decides: ``reached`` is True when, in one pass over the batches, every prediction
    was right, unless the loss at the end stays at or above :data:`FLOOR_FRACTION` of its
    initial value (a floor no training removes). Other tasks use the loss rule: the pass's mean
    loss at most ``loss_fraction`` (default 5 %) times the (positive) initial loss. Training
    stops at the first pass meeting both (100 % and the loss target), so a loss above its
    target at 100 % accuracy is reported as information (``loss_above_target``), not as a
    failure: a trainable head on a frozen backbone reached 100 % with its loss at 0.073 against
    a 0.071 target after 1000 steps. Measured on digits: healthy MLPs and CNNs reach 100 %
    accuracy and 5 % of the initial loss in the same pass, while a softmax applied before
    cross-entropy reaches 100 % accuracy but floors near ``log(1 + 9/e) = 1.46``, 63 % of
    ``log 10``: accuracy alone would call it a success. ``steps`` counts optimizer steps;
    ``accuracy_step`` is the first step of a pass at 100 %. ``ladder`` holds the learning
    rates tried when the configured one failed (:func:`ladder_rates`), one result each.

    Per-position classification (pixels, tokens) has its accuracy measured and reported but
    not required: positions whose input does not determine the target cap it below 100 % for
    any model. Measured on the tests' language models: the first token of a sequence, or the
    token after a random change of stride, left healthy LSTM/GRU models at 93.6-99.5 % of the
    tokens after 600-1500 steps while their loss went below 5 % of ``log V``. A softmax before
    the loss still fails on the loss (segmentation: 51 % of the initial loss at 100 % pixel
    accuracy).
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

    @property
    def classification(self) -> bool:
        return self.best_accuracy is not None

    @property
    def loss_above_target(self) -> bool:
        """Reached on the accuracy while the loss is still above its target."""
        return self.reached and self.best_loss > self.loss_fraction * self.initial_loss

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
        """``overfit.reached`` (INFO), ``overfit.not_reached`` or ``overfit.non_finite`` (FAIL)."""
        target = self.loss_fraction * self.initial_loss
        off = ", ".join(self.turned_off) or "nothing to turn off"
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
        text = (f"{acc}best loss {self.best_loss:.4g} (initial {self.initial_loss:.4g}, target "
                f"<= {target:.4g}) on {self.num_batches} batches after {self.steps} steps "
                f"({self.task}; {lr}{self.settings}); regularization off: {off}.")
        if self.reached:
            if self.loss_above_target:
                text = (f"100% accuracy at step {self.accuracy_step} (the recipe's criterion); "
                        f"the loss, still above its target, is information: {text}")
            return [Finding(CHECK, "overfit.reached", Severity.INFO, f"Overfit reached: {text}",
                            value=self.best_loss, expected=target,
                            details={"accuracy_step": self.accuracy_step,
                                     "loss_above_target": self.loss_above_target})]
        if self.initial_loss <= 0:
            text = (f"the initial loss {self.initial_loss:.4g} is not positive, so no fraction of "
                    f"it can be a target: a loss that falls below 0 is no likelihood (e.g. "
                    f"`nll_loss` given probabilities instead of log-probabilities). {text}")
        elif self.accuracy_step is not None and self.accuracy_required:
            text = (f"100% accuracy at step {self.accuracy_step}, but the loss floors at "
                    f"{self.final_loss / self.initial_loss:.0%} of its initial value (>= "
                    f"{FLOOR_FRACTION:.0%}: something squashes the output before the loss, e.g. "
                    f"a softmax before cross-entropy). {text}")
        if found is not None:
            advice = (f"Train at about lr {found.lr:.0e}: the network memorizes the sample "
                      "there (recipe 4.2); confirm with the learning-rate sweep (recipe 6.1).")
        else:
            advice = ADVICE if self.ladder else NO_LADDER_ADVICE
        return [Finding(CHECK, "overfit.not_reached", severity,
                        f"Could not overfit: {text}{said}", advice=advice, value=self.best_loss,
                        expected=target, details=ladder)]


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

    When the configured learning rate does not overfit (the loss target missed, a floor, or a
    NaN), ``lr_ladder`` tries the rates of :func:`ladder_rates` in order, each on a fresh copy
    with the same ``max_steps`` budget, and stops at the first that overfits; not when the
    initial loss itself is not finite or not positive (no rate changes that). The cost: at most
    ``len(ladder_rates(lr))`` (5 or fewer) more runs of up to ``max_steps`` steps, paid only
    when the test fails.

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
    result = attempt.run(module, None, progress_bar, on_pass)
    if (lr_ladder and not result.reached and result.lr and math.isfinite(result.initial_loss)
            and result.initial_loss > 0):
        for lr in ladder_rates(result.lr):
            hook = None if on_ladder_pass is None else _bound(on_ladder_pass, lr)
            rung = attempt.run(module, lr, False, hook)
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
            on_pass: PassHook | None) -> OverfitResult:
        """One run on a fresh copy of ``module``; at ``lr`` when given (every param group
        scaled alike, so that their ratios stay the user's), else at the configured rate."""
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
            run = _Run(clone, [settings.cast(b) for b in self.batches], self.batch_to_target,
                       settings, SideTraining(optimizer, settings, clone.device), state)
            result = OverfitResult(False, 0, math.nan, math.inf, None, self.loss_fraction,
                                   len(self.batches), turned_off,
                                   lr=float(optimizer.param_groups[0]["lr"]),
                                   settings=settings.describe())
            with OutputCapture(clone) as capture:
                with torch.no_grad():
                    result.initial_loss = run.one_pass(capture, len(self.batches),
                                                       train=False)[0]
                result.task = run.task.describe() if run.task is not None else "unknown task"
                result.accuracy_required = not run.per_position
                _train(run, capture, result, self.max_steps, progress_bar, on_pass)
        return result


class _Run:
    """The copy, its fixed batches and how it steps: one pass at a time."""

    def __init__(self, clone: pl.LightningModule, batches: list[Any], to_target: BatchFn,
                 settings: OptimizationSettings, training: SideTraining,
                 state: StepState) -> None:
        self.clone, self.batches = clone, batches
        self.settings, self.training, self.state = settings, training, state
        self.targets = [call_user("`batch_to_target`", to_target, b) for b in batches]
        self.task: Task | None = None

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
        # Every pass starts from the live module's carried state (self.hidden), as the first
        # did: the batches keep the context they were read in.
        self.state.restore()
        for i, batch in enumerate(self.batches[:count]):
            capture.clear()
            with self.settings.forward_context(self.clone.device):
                loss = step_loss(self.clone, batch, i)
            if train and self.training.backward(loss, last=i == count - 1):
                steps += 1
            losses.append(float(loss.detach()))
            output = select_output(capture.output)
            if self.task is None:
                self.task = infer_task(output, self.targets[i])
            counts = (correct_counts(self.task, output, self.targets[i])
                      if self.task.is_classification and isinstance(output, torch.Tensor)
                      else None)
            if counts is not None:
                correct, counted = correct + counts[0], counted + counts[1]
        return sum(losses) / len(losses), (correct / counted if counted else None), steps


def _train(run: _Run, capture: OutputCapture, result: OverfitResult, max_steps: int,
           progress_bar: bool, on_pass: PassHook | None) -> None:
    from tqdm.auto import tqdm

    if not math.isfinite(result.initial_loss) or result.initial_loss <= 0:
        result.best_loss = result.initial_loss
        return
    target = result.loss_fraction * result.initial_loss
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
    # classification, unless its loss has a floor (it never falls far below its start).
    result.reached = (result.accuracy_required and result.accuracy_step is not None
                      and result.final_loss < FLOOR_FRACTION * result.initial_loss)

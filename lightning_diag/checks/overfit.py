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
(schedulers included). A run that spends its budget just short of the target while its loss
still falls steadily is slow, not stuck (:mod:`lightning_diag.checks.overfit_trend`:
``overfit.slow``). When the sample cannot be overfit at that rate and neither a floor nor a
slow fall explains it, a short ladder of other rates (recipe 4.2: :func:`ladder_rates`) tells
a learning rate that is off from a bug no rate fixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_diag.batch import BatchFn, OutputCapture, default_batch_to_target
from lightning_diag.checks.overfit_result import (
    BEYOND_CONSTANT,
    CHECK,
    FLOOR_FRACTION,
    MARGINS,
    MIN_FALL,
    LossFloor,
    OverfitResult,
)
from lightning_diag.checks.overfit_run import OverfitRun
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

__all__ = ["BEYOND_CONSTANT", "FLOOR_FRACTION", "LossFloor", "MARGINS", "MIN_FALL",
           "OverfitResult", "ladder_rates", "overfit_batches", "overfit_small_batch",
           "validate_arguments"]

#: The recipe's default learning rates (step 6.1), tried after x10 and x0.1 the configured one.
RECIPE_RATES = (1e-1, 1e-2, 1e-3, 1e-4)
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

    A run that missed the target with no floor to explain it, but whose loss still falls
    steadily towards it, is ``slow`` (:meth:`OverfitResult.judge_trend`, ``overfit.slow``).
    Otherwise, when the configured learning rate does not overfit (the target missed, or a
    NaN), ``lr_ladder`` tries :func:`ladder_rates` in order, each on a fresh copy with the same
    budget, up to the first that overfits (at most 5 more runs, paid only on a failure); not
    when the initial loss is not finite or not positive, nor for a squashed output.

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
            and not result.slow and result.lr and math.isfinite(result.initial_loss)
            and result.initial_loss > 0):
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
            run = OverfitRun(clone, [settings.cast(b) for b in self.batches], self.batch_to_target,
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
                if judge_floor and not result.squashed and not result.natural_floor:
                    result.judge_trend()
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

def _train(run: OverfitRun, capture: OutputCapture, result: OverfitResult, max_steps: int,
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

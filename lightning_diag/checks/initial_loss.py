"""Recipe step 3: the initial loss must match expectation, forward pass only.

The expectation is the user's own loss at the know-nothing prediction: ``training_step`` run
again with the model's prediction replaced (through forward hooks, see
:mod:`lightning_diag.checks.reference_outputs`) by what a network with small weights outputs:
zero logits, uniform probabilities or log-probabilities, zeros for values, every head of a
multi-output model included. Auxiliary terms, distillation, label smoothing, class weights and
contrastive or likelihood losses then count as written, with no rule for each. Where the
recipe's closed form holds (``log C`` for a C-class classifier in any shape, ``log 2`` per label,
``mean(y^2)`` for a mean squared error) the message names it.

Each head is judged by what its output is: scores (logits of a classification target,
probabilities, log-probabilities) must move the loss by at most the tolerance band
(:func:`loss_tolerance`); values (a regression, embeddings, distribution parameters) by at most
:data:`REGRESSION_FACTOR` - 1 times the know-nothing loss. A loss that doubles with the batch
(summed over the samples, ``reduction="sum"``, as PyTorch's VAE example does) is said
(``initial_loss.summed``, INFO) and judged per sample: the loss and its expectation divided by
the batch size. A classification loss below 0 at a uniform prediction (``nll_loss`` given
probabilities) is flagged.

Example:
    >>> from lightning_diag.examples.digits import DigitsClassifier, load_digits_tensors
    >>> from lightning_diag.checks.initial_loss import check_initial_loss
    >>> x, y = load_digits_tensors()
    >>> found = check_initial_loss(DigitsClassifier(arch="mlp"), [(x[:64], y[:64])])
    >>> sorted(f.code for f in found)
    ['initial_loss.ok', 'initial_loss.regularization']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import (
    BatchFn,
    OutputCapture,
    RefusedOnACopy,
    UserCodeError,
    call_user,
    default_batch_to_target,
    step_loss,
)
from lightning_diag.checks.know_nothing import (
    CHECK,
    MISMATCH_ADVICE,
    REGRESSION_FACTOR,
    SUM_RATIO_TOL,
    KnowNothingRuns,
    Summed,
    loss_tolerance,
    own_loss_findings,
)
from lightning_diag.checks.label_use import StepProbe, step_task
from lightning_diag.checks.reference_outputs import (
    Prediction,
    PredictionTap,
    main_prediction,
    record_predictions,
)
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.checks import expected_initial_loss
from lightning_diag.functional.task import Task, select_output
from lightning_diag.isolation import (
    RNGState,
    StepState,
    fresh_optimizer,
    get_reg_strength,
    set_reg_strength,
    side_experiment,
)
from lightning_diag.validation import (
    check_callable,
    check_int,
    check_number,
    check_sequence,
    check_str,
    require,
)

__all__ = ["REGRESSION_FACTOR", "SUM_RATIO_TOL", "check_initial_loss", "loss_tolerance",
           "validate_arguments"]


def check_initial_loss(
    module: pl.LightningModule,
    batches: Sequence[Any],
    *,
    num_classes: int | None = None,
    expected_loss: float | None = None,
    rel_tol: float = 0.1,
    abs_tol: float = 0.05,
    reg_attr: str | None = None,
    reg_strengths: Sequence[float] | None = None,
    batch_to_target: BatchFn = default_batch_to_target,
) -> list[Finding]:
    """Check the initial data loss of ``module`` on ``batches`` (forward only, on a copy).

    The data loss is the mean ``training_step`` loss with ``reg_attr`` (if given) set to 0. The
    expectation is ``expected_loss``, else ``log C`` with C from ``num_classes``, else the
    user's own loss at the know-nothing prediction (see the module docstring and
    :mod:`lightning_diag.checks.know_nothing`). The model's output is recorded inside that step
    (forward hooks, never a call on a guessed input) and, with the batch's target, gives the
    task (:func:`lightning_diag.checks.label_use.step_task`): the closed form named in the
    message, and the collapse check of multi-class outputs (over every position: pixel,
    token). The same RNG state is replayed before each evaluation, and a state the step
    carries between calls starts each pass from the live value; ``module`` (BatchNorm buffers
    included) and every RNG stream are left untouched.

    Args:
        module: The LightningModule, as initialized.
        batches: A few training batches.
        num_classes: C, when the output cannot tell.
        expected_loss: Overrides every inferred expectation (e.g. for a loss summed on purpose).
        rel_tol: Relative part of the tolerance, see :func:`loss_tolerance`.
        abs_tol: Absolute part of the tolerance, in loss units.
        reg_attr: Attribute or hparam that scales a regularization term inside the loss.
        reg_strengths: Strengths to try, increasing; default ``[0, s, 10s, 100s]`` with the
            current strength ``s`` (``1e-3`` when it is 0).
        batch_to_target: Extracts the target from a batch, for the task (the expectation
            itself needs no target: the step reads it as it always does).

    Raises:
        UserCodeError: ``training_step`` or ``batch_to_target`` raised.
    """
    validate_arguments(num_classes=num_classes, expected_loss=expected_loss, rel_tol=rel_tol,
                       abs_tol=abs_tol, reg_attr=reg_attr, reg_strengths=reg_strengths,
                       batch_to_target=batch_to_target)
    if not batches:
        raise ValueError("`batches` is empty: give at least one training batch.")
    with side_experiment(module) as clone:
        clone.train()
        rng = RNGState.capture()
        state = StepState(clone)  # a state carried between steps starts from the live one
        strength = get_reg_strength(clone, reg_attr) if reg_attr else 0.0
        if reg_attr:
            set_reg_strength(clone, reg_attr, 0.0)
        runs = KnowNothingRuns(clone, list(batches), rng, state)
        first = _FirstPass.run(runs, batch_to_target)
        # the task the shapes say, unless the loss ignores the labels it reads as classes
        task = step_task(StepProbe(clone, rng, state), batches[0], first.outputs[0],
                         first.targets[0], first.tensors)
        found = _loss_findings(runs, first, task, num_classes, expected_loss, rel_tol, abs_tol)
        if reg_attr:
            found.append(_reg_finding(clone, batches[0], rng, state, reg_attr, strength,
                                      reg_strengths))
        else:
            found.append(_weight_decay_finding(clone))
    return found


def validate_arguments(*, num_classes: Any, expected_loss: Any, rel_tol: Any, abs_tol: Any,
                       reg_attr: Any, reg_strengths: Any, batch_to_target: Any) -> None:
    """Check the arguments of :func:`check_initial_loss` (see :mod:`lightning_diag.validation`).

    Example:
        >>> validate_arguments(num_classes=1, expected_loss=None, rel_tol=0.1, abs_tol=0.05,
        ...                    reg_attr=None, reg_strengths=None, batch_to_target=print)
        Traceback (most recent call last):
        ...
        ValueError: `num_classes` must be an int >= 2 or None, got 1.
    """
    check_int("num_classes", num_classes, low=2, optional=True)
    check_number("expected_loss", expected_loss, optional=True)
    check_number("rel_tol", rel_tol, low=0)
    check_number("abs_tol", abs_tol, low=0)
    check_str("reg_attr", reg_attr, optional=True)
    check_sequence("reg_strengths", reg_strengths, check_number, min_len=2, optional=True)
    if reg_strengths is not None:
        require(all(b > a for a, b in itertools.pairwise(reg_strengths)), "reg_strengths",
                reg_strengths, "a sequence of strictly increasing numbers")
    check_callable("batch_to_target", batch_to_target)


def _tapped_step(module: pl.LightningModule, batch: Any, batch_idx: int,
                 predictions: list[Prediction], main: int | None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's loss without gradients, and the main prediction (None without one)."""
    if main is None:
        with torch.no_grad():
            return step_loss(module, batch, batch_idx), None
    with torch.no_grad(), PredictionTap(predictions[main]) as tap:
        tap.reset()
        return step_loss(module, batch, batch_idx), tap.value


@dataclass
class _FirstPass:
    """The step on every batch as the model computes it: the losses, the main prediction of
    each (the output the task is read from), the targets; and the predictions, recorded on
    the first batch from the autograd history of its step."""

    losses: list[float] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    main: int | None = None

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    @classmethod
    def run(cls, runs: KnowNothingRuns, batch_to_target: BatchFn) -> _FirstPass:
        out = cls()
        clone = runs.clone
        with OutputCapture(clone) as capture:
            for i, batch in enumerate(runs.batches):
                runs.rng.restore()
                capture.clear()
                if i == 0:
                    step, out.predictions, out.tensors = record_predictions(clone, batch, i)
                    out.main = main_prediction(out.predictions, out.tensors,
                                               select_output(capture.output))
                    output = out.tensors[out.main] if out.main is not None else None
                else:
                    step, output = _tapped_step(clone, batch, i, out.predictions, out.main)
                if output is None:  # no prediction: the outermost module output
                    output = select_output(capture.output)
                out.losses.append(float(step))
                out.outputs.append(output.detach() if isinstance(output, torch.Tensor)
                                   else output)
                out.targets.append(call_user("`batch_to_target`", batch_to_target, batch))
        runs.state.restore()
        return out


def _loss_findings(runs: KnowNothingRuns, first: _FirstPass, task: Task,
                   num_classes: int | None, expected_loss: float | None, rel_tol: float,
                   abs_tol: float) -> list[Finding]:
    loss = first.loss
    if not math.isfinite(loss):
        return [Finding(CHECK, "initial_loss.non_finite", Severity.FAIL,
                        f"The initial loss is {loss} before any training step.",
                        advice="Look for log(0), division by zero, NaN/Inf inputs or an "
                        "exploding initialization.", value=loss)]
    found = [_collapse(task, first.outputs)] if task.kind == "multiclass" else []
    if expected_loss is not None:  # the user's own expectation, for the loss as it is
        found.append(_band_finding(loss, expected_loss, "given", task, rel_tol, abs_tol))
    elif num_classes is not None:  # log C per sample: a loss summed over them is divided
        expected = expected_initial_loss(num_classes)
        summed = Summed.of(runs.doubled_ratio(first.predictions) if first.predictions
                           else None, runs.mean_batch_size(), loss)
        if summed is not None:
            found.append(summed.finding(expected))
            loss *= summed.per_sample
        found.append(_band_finding(loss, expected, f"log {num_classes}, given", task, rel_tol,
                                   abs_tol, per_sample=summed is not None and summed.per_sample
                                   != 1.0))
    else:
        found += own_loss_findings(runs, loss, task, first.targets, first.predictions,
                                   first.main, rel_tol, abs_tol)
    return [f for f in found if f is not None]


def _band_finding(loss: float, expected: float, source: str, task: Task, rel_tol: float,
                  abs_tol: float, per_sample: bool = False) -> Finding:
    half = loss_tolerance(expected, rel_tol, abs_tol)
    band = (expected - half, expected + half)
    unit = " per sample" if per_sample else ""
    text = f"Initial data loss {loss:.4f}{unit} vs expected {expected:.4f} ({source}); " \
           f"accepted [{band[0]:.3f}, {band[1]:.3f}]."
    details = {"task": task.kind, "task_reason": task.reason}
    if band[0] <= loss <= band[1]:
        return Finding(CHECK, "initial_loss.ok", Severity.INFO, text, value=loss, expected=band,
                       details=details)
    return Finding(CHECK, "initial_loss.mismatch", Severity.FAIL, text, advice=MISMATCH_ADVICE,
                   value=loss, expected=band, details=details)


def _collapse(task: Task, outputs: list[torch.Tensor]) -> Finding | None:
    """Warn when every prediction (every position: sample, pixel, token) is the same class
    *and* confident (mean max-probability high).

    A default-initialized net can put every argmax on one class with near-uniform probabilities
    (measured: 256 of 256 digits at mean max-prob 0.12 for C = 10): that is healthy, so the
    warning also needs a mean max-probability of at least ``min(2/C, (1 + 1/C) / 2)``.
    """
    dim = task.class_dim if task.class_dim is not None else 1
    classes = int(task.num_classes or 0)
    probs = torch.cat([task.to_probabilities(o.detach()).movedim(dim, -1).reshape(-1, classes)
                       for o in outputs])
    if probs.shape[0] < 2 or not bool(torch.isfinite(probs).all()):
        return None
    top = probs.max(1)
    preds, confidence = top.indices, float(top.values.mean())
    threshold = min(2 / classes, (1 + 1 / classes) / 2)
    if bool((preds == preds[0]).all()) and confidence >= threshold:
        return Finding(CHECK, "initial_loss.collapsed", Severity.WARN,
                       f"All {len(preds)} initial predictions are class {int(preds[0])} with mean "
                       f"max-probability {confidence:.2f} (>= {threshold:.2f}; uniform is "
                       f"{1 / classes:.2f}).", value=confidence, expected=1 / classes,
                       advice="The initial network favours one class: shrink the last layer's "
                       "weights and bias, and check the input normalization.")
    return None


def _reg_finding(module: pl.LightningModule, batch: Any, rng: RNGState, state: StepState,
                 reg_attr: str, strength: float, strengths: Sequence[float] | None) -> Finding:
    base = strength if strength > 0 else 1e-3
    values = list(strengths) if strengths is not None else [0.0, base, 10 * base, 100 * base]
    losses = []
    try:
        with torch.no_grad():
            for s in values:
                set_reg_strength(module, reg_attr, s)
                rng.restore()
                state.restore()  # the same point each time: no state carried between them
                losses.append(float(step_loss(module, batch)))
    finally:
        set_reg_strength(module, reg_attr, strength)
    pairs = ", ".join(f"{s:g}: {v:.4g}" for s, v in zip(values, losses, strict=True))
    rising = all(b > a for a, b in itertools.pairwise(losses))
    if rising:
        return Finding(CHECK, "initial_loss.regularization", Severity.INFO,
                       f"The loss rises with `{reg_attr}` as it should ({pairs}).")
    return Finding(CHECK, "initial_loss.reg_not_increasing", Severity.FAIL,
                   f"The loss does not rise strictly with `{reg_attr}` ({pairs}).",
                   advice="Raising the regularization strength must raise the loss (recipe "
                   "step 3.2): check the sign of the term and that it is added to the loss.",
                   expected=(values[0], values[-1]))


def _weight_decay_finding(module: pl.LightningModule) -> Finding:
    try:
        optimizer = fresh_optimizer(module)
    except UserCodeError as err:  # not a measurement: the decay is unknown, not 0
        return Finding(CHECK, "initial_loss.optimizer_error", Severity.WARN,
                       f"The optimizer could not be built to read its weight decay: {err}",
                       advice="Fix `configure_optimizers`; if it needs the Trainer, run the "
                       "check through the InitialLossCheck callback.",
                       details={"where": err.where, "exception": type(err.error).__name__})
    except RefusedOnACopy as err:  # it reads what the copy's Trainer view refuses
        return Finding(CHECK, "initial_loss.regularization", Severity.INFO,
                       f"Regularization: the optimizer's weight decay was not read: {err}")
    except ValueError:  # it returned no optimizer: there is no decay to report
        return Finding(CHECK, "initial_loss.regularization", Severity.INFO,
                       "Regularization: `configure_optimizers()` returned no optimizer, so "
                       "there is no weight decay to report.")
    decays = sorted({float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups})
    where = (f"optimizer weight decay {', '.join(f'{d:g}' for d in decays)}" if any(decays)
             else "none found in the optimizer (weight decay 0)")
    return Finding(CHECK, "initial_loss.regularization", Severity.INFO,
                   f"Regularization: {where}. A term inside the loss is not checked without "
                   "`reg_attr`.", advice="Pass `reg_attr=` naming the attribute that scales a "
                   "regularization term in the loss, to check that the loss rises with it.")

"""Recipe step 3: the initial loss must match expectation, forward pass only.

The expectation comes from the task inferred from the module's own output in ``training_step``
(:func:`lightning_diag.functional.task.infer_task`): ``log C`` for a C-class classifier in any
shape (``(N, C)``, per-pixel ``(N, C, H, W)``, per-token ``(N, T, V)`` or ``(N*T, V)``),
``log 2`` per label for multi-label/binary targets, and for a mean-squared-error regression the
loss of predicting 0, ``mean(y^2)``, and of predicting the mean, ``Var(y)``.

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
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import (
    BatchFn,
    OutputCapture,
    UserCodeError,
    call_user,
    default_batch_to_target,
    step_loss,
)
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.checks import expected_initial_loss
from lightning_diag.functional.task import Task, infer_task, regression_references, select_output
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

__all__ = ["check_initial_loss", "loss_tolerance", "validate_arguments"]

CHECK = "InitialLossCheck"
MISMATCH_ADVICE = (
    "With small weights a C-class softmax classifier starts at log C (recipe step 3.1): scale "
    "down the initialization (especially the last layer), and check the loss itself (softmax "
    "applied twice, reduction='sum', wrong labels)."
)
REGRESSION_ADVICE = (
    "With small weights a regressor predicts about 0, so its mean squared error starts near "
    "mean(y^2) (recipe step 3.1); far above it the initial predictions are larger than the "
    "targets themselves: scale down the initialization (especially the last layer), or "
    "standardize the targets."
)
#: A regression's initial MSE is flagged above this many times ``max(mean(y^2), Var(y))``.
#: Measured: default-initialized MLPs (depth 1-4, ReLU/tanh, width 16/256, 4-64 standardized
#: inputs; 320 models) started at 0.96-1.73 times mean(y^2) for standardized targets, 0.72-1.32
#: for targets of mean 3; the tests' regression family at 0.91-1.16 (5 seeds); its last layer
#: scaled 30x at 4.6-17.2.
#: 3 means initial predictions whose mean square is about twice the targets' own.
REGRESSION_FACTOR = 3.0


def loss_tolerance(expected: float, rel_tol: float = 0.1, abs_tol: float = 0.05) -> float:
    """Half-width of the accepted band around the expected initial loss.

    Default-initialized digits CNNs measured 2.30-2.39 against ``log 10 = 2.303``; 10 % plus
    0.05 nats accepts them (band ``[2.02, 2.58]``) while a last layer scaled up 10x lands far out.

    Example:
        >>> round(loss_tolerance(2.302585), 3)
        0.28
    """
    return rel_tol * abs(expected) + abs_tol


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
    model's output is recorded inside that step (forward hooks, never a call on a guessed
    input) and, with the batch's target, gives the task (see the module docstring). The
    expectation is ``expected_loss``, else ``log C`` with C from ``num_classes``, else the
    task's: ``log C``, ``log 2`` per label, or for a regression whose loss is the mean squared
    error of the output, at most :data:`REGRESSION_FACTOR` times ``max(mean(y^2), Var(y))``.
    Multi-class outputs are also checked for a confident collapse onto one class (over every
    position: pixel, token). The same RNG state is replayed before each evaluation; ``module``
    (BatchNorm buffers included) and every RNG stream are left untouched.

    Args:
        module: The LightningModule, as initialized.
        batches: A few training batches.
        num_classes: C, when the output cannot tell.
        expected_loss: Overrides every inferred expectation (e.g. for custom losses).
        rel_tol: Relative part of the tolerance, see :func:`loss_tolerance`.
        abs_tol: Absolute part of the tolerance, in loss units.
        reg_attr: Attribute or hparam that scales a regularization term inside the loss.
        reg_strengths: Strengths to try, increasing; default ``[0, s, 10s, 100s]`` with the
            current strength ``s`` (``1e-3`` when it is 0).
        batch_to_target: Extracts the target from a batch (a bare-tensor batch has none that
            can be told apart: give it, or ``expected_loss``).

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
        losses, outputs, targets = [], [], []
        with torch.no_grad(), OutputCapture(clone) as capture:
            for i, batch in enumerate(batches):
                rng.restore()
                capture.clear()
                losses.append(float(step_loss(clone, batch, i)))
                outputs.append(select_output(capture.output))
                targets.append(call_user("`batch_to_target`", batch_to_target, batch))
        loss = sum(losses) / len(losses)
        found = _loss_findings(loss, outputs, targets, num_classes, expected_loss, rel_tol, abs_tol)
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


def _loss_findings(loss: float, outputs: list[Any], targets: list[Any], num_classes: int | None,
                   expected_loss: float | None, rel_tol: float, abs_tol: float) -> list[Finding]:
    if not math.isfinite(loss):
        return [Finding(CHECK, "initial_loss.non_finite", Severity.FAIL,
                        f"The initial loss is {loss} before any training step.",
                        advice="Look for log(0), division by zero, NaN/Inf inputs or an "
                        "exploding initialization.", value=loss)]
    task = infer_task(outputs[0], targets[0])
    found = [_collapse(task, outputs)] if task.kind == "multiclass" else []
    if expected_loss is not None or num_classes is not None:
        expected = (expected_loss if expected_loss is not None
                    else expected_initial_loss(int(num_classes or 0)))
        source = "given" if expected_loss is not None else f"log {num_classes}, given"
        found.append(_band_finding(loss, expected, source, task, rel_tol, abs_tol))
    elif task.kind in ("multiclass", "multilabel"):
        expected = float(task.expected_initial_loss() or 0.0)
        source = (f"log {task.num_classes}" if task.kind == "multiclass" else "log 2 per label")
        found.append(_band_finding(loss, expected, f"{source}: {task.describe()}", task, rel_tol,
                                   abs_tol))
    elif task.kind == "regression":
        found.append(_regression_finding(loss, task, outputs, targets))
    else:
        found.append(_no_expectation(loss, task.reason, targets[0] is None))
    return [f for f in found if f is not None]


def _band_finding(loss: float, expected: float, source: str, task: Task, rel_tol: float,
                  abs_tol: float) -> Finding:
    half = loss_tolerance(expected, rel_tol, abs_tol)
    band = (expected - half, expected + half)
    text = f"Initial data loss {loss:.4f} vs expected {expected:.4f} ({source}); accepted " \
           f"[{band[0]:.3f}, {band[1]:.3f}]."
    details = {"task": task.kind, "task_reason": task.reason}
    if band[0] <= loss <= band[1]:
        return Finding(CHECK, "initial_loss.ok", Severity.INFO, text, value=loss, expected=band,
                       details=details)
    return Finding(CHECK, "initial_loss.mismatch", Severity.FAIL, text, advice=MISMATCH_ADVICE,
                   value=loss, expected=band, details=details)


def _regression_finding(loss: float, task: Task, outputs: list[Any],
                        targets: list[torch.Tensor]) -> Finding:
    """Judge a regression's loss against ``mean(y^2)`` and ``Var(y)`` (see REGRESSION_FACTOR),
    once the loss is seen to be the mean squared error of the recorded output."""
    mse = sum(float(((o.detach().double().reshape(t.shape) - t.double()) ** 2).mean())
              for o, t in zip(outputs, targets, strict=True)) / len(outputs)
    if not math.isclose(mse, loss, rel_tol=1e-3, abs_tol=1e-6):
        return _no_expectation(loss, f"regression targets, but the loss is not the mean squared "
                               f"error of the output against them ({mse:.4g}), so mean(y^2) and "
                               "Var(y) are no references", False)
    zero, mean = regression_references(torch.cat([t.reshape(-1) for t in targets]))
    ceiling = REGRESSION_FACTOR * max(zero, mean)
    text = (f"Initial data loss {loss:.4f} (mean squared error) vs {zero:.4f} for predicting 0 "
            f"(mean(y^2)) and {mean:.4f} for predicting the mean (Var(y)); accepted up to "
            f"{REGRESSION_FACTOR:g}x the larger, {ceiling:.4f}.")
    details = {"task": task.kind, "task_reason": task.reason, "mean_square": zero,
               "variance": mean}
    if loss <= ceiling:
        return Finding(CHECK, "initial_loss.ok", Severity.INFO, text, value=loss,
                       expected=(0.0, ceiling), details=details)
    return Finding(CHECK, "initial_loss.mismatch", Severity.FAIL, text, advice=REGRESSION_ADVICE,
                   value=loss, expected=(0.0, ceiling), details=details)


def _no_expectation(loss: float, reason: str, no_target: bool) -> Finding:
    also = (" (or `batch_to_target=` reading the target out of a batch)" if no_target else "")
    return Finding(CHECK, "initial_loss.no_expectation", Severity.INFO,
                   f"Initial loss {loss:.4g}: no expectation can be inferred ({reason}).",
                   value=loss, details={"reason": reason},
                   advice=f"Pass `expected_loss=`{also}: the loss a model with small weights "
                   "should start at for your loss function.")


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

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import (
    BatchFn,
    NoLossError,
    OutputCapture,
    RefusedOnACopy,
    UserCodeError,
    _batch_size,
    call_user,
    default_batch_to_target,
    select_samples,
    step_loss,
)
from lightning_diag.checks.reference_outputs import (
    Prediction,
    PredictionTap,
    Substitution,
    main_prediction,
    record_predictions,
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

__all__ = ["REGRESSION_FACTOR", "SUM_RATIO_TOL", "check_initial_loss", "loss_tolerance",
           "validate_arguments"]

CHECK = "InitialLossCheck"
MISMATCH_ADVICE = (
    "With small weights a network starts at the loss of a know-nothing prediction (log C for a "
    "C-class softmax classifier, recipe step 3.1): scale down the initialization (especially "
    "the last layer), and check the loss itself (softmax applied twice, wrong labels)."
)
REGRESSION_ADVICE = (
    "With small weights a network's values start near 0, so the loss starts near its value at a "
    "zero output (for a mean squared error, mean(y^2); recipe step 3.1); far above it the "
    "initial outputs are larger than the targets themselves: scale down the initialization "
    "(especially the last layer), or standardize the targets."
)
NEGATIVE_ADVICE = (
    "A cross-entropy is never below 0: look for `nll_loss` given probabilities instead of "
    "log-probabilities (a softmax where a log-softmax belongs)."
)
#: A head with values (regression, embeddings, distribution parameters) may raise the loss by
#: up to this many times, minus one, its know-nothing value (plus ``abs_tol``): a regression's
#: initial MSE up to 3x ``mean(y^2)``. Measured: default-initialized MLPs (depth 1-4, ReLU/tanh,
#: width 16/256, 4-64 standardized inputs; 320 models) started at 0.96-1.73 times mean(y^2) for
#: standardized targets, 0.72-1.32 for targets of mean 3; the tests' regression family at
#: 0.91-1.16 (5 seeds); its last layer scaled 30x at 4.6-17.2. 3 means initial predictions
#: whose mean square is about twice the targets' own. The healthy loss programs' margins are in
#: docs/callbacks/initial_loss.md.
REGRESSION_FACTOR = 3.0
#: The loss of the batch repeated twice, over the loss of the batch, at the know-nothing
#: output: 1 for a mean over the samples, 2 for a sum. Within this of 2 is a sum.
SUM_RATIO_TOL = 0.05


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
    expectation is ``expected_loss``, else ``log C`` with C from ``num_classes``, else the
    user's own loss at the know-nothing prediction (see the module docstring). The model's
    output is recorded inside that step (forward hooks, never a call on a guessed input) and,
    with the batch's target, gives the task: the closed form named in the message, and the
    collapse check of multi-class outputs (over every position: pixel, token). The same RNG
    state is replayed before each evaluation, and a state the step carries between calls
    starts each pass from the live value; ``module`` (BatchNorm buffers included) and every RNG
    stream are left untouched.

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
        runs = _Runs(clone, list(batches), rng, state)
        losses, outputs, targets = [], [], []
        predictions: list[Prediction] = []
        main: int | None = None
        with OutputCapture(clone) as capture:
            for i, batch in enumerate(batches):
                rng.restore()
                capture.clear()
                if i == 0:  # the predictions, from the autograd history of one step
                    step, predictions, tensors = record_predictions(clone, batch, i)
                    main = main_prediction(predictions, tensors, select_output(capture.output))
                    output = tensors[main] if main is not None else None
                else:
                    step, output = _tapped_step(clone, batch, i, predictions, main)
                if output is None:  # no prediction: the outermost module output
                    output = select_output(capture.output)
                losses.append(float(step))
                outputs.append(output.detach() if isinstance(output, torch.Tensor) else output)
                targets.append(call_user("`batch_to_target`", batch_to_target, batch))
        state.restore()
        loss = sum(losses) / len(losses)
        found = _loss_findings(runs, loss, outputs, targets, predictions, main, num_classes,
                               expected_loss, rel_tol, abs_tol)
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
class _Runs:
    """The copy and its batches: the mean loss of a pass with the predictions replaced."""

    clone: pl.LightningModule
    batches: list[Any]
    rng: RNGState
    state: StepState

    def mean_loss(self, predictions: list[Prediction],
                  replace: Callable[[int, torch.Tensor], torch.Tensor | None]) -> float:
        """Every batch through ``training_step``, from the same state and RNG as the real pass.

        Raises:
            UserCodeError, NoLossError: the step failed on the replaced prediction.
        """
        self.state.restore()
        losses = []
        with torch.no_grad(), Substitution(predictions, replace) as sub:
            for i, batch in enumerate(self.batches):
                self.rng.restore()
                losses.append(float(sub.step(self.clone, batch, i)))
        self.state.restore()
        return sum(losses) / len(losses)

    def mean_batch_size(self) -> float | None:
        """The mean sample count of the batches (None when one cannot be read): a loss summed
        over the samples, averaged over the batches, divided by it is the loss per sample."""
        sizes = [_batch_size(b) for b in self.batches]
        if not sizes or any(not s for s in sizes):
            return None
        return sum(s or 0 for s in sizes) / len(sizes)

    def doubled_ratio(self, predictions: list[Prediction]) -> float | None:
        """The know-nothing loss of the first batch repeated twice over that of the batch
        itself (1 for a mean over samples, 2 for a sum); None where it cannot be measured."""
        batch = self.batches[0]
        size = _batch_size(batch)
        if not size:
            return None
        doubled = select_samples(batch, torch.arange(size).repeat(2))
        losses = []
        try:
            for b in (batch, doubled):
                self.state.restore()
                with torch.no_grad(), Substitution(predictions, _know_nothing(predictions)) as sub:
                    self.rng.restore()
                    losses.append(float(sub.step(self.clone, b, 0)))
        except (UserCodeError, NoLossError):  # a step written for one batch size
            return None
        finally:
            self.state.restore()
        return losses[1] / losses[0] if losses[0] and math.isfinite(losses[0]) else None


def _know_nothing(predictions: list[Prediction],
                  keep: int | None = None) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
    """Replace every prediction (but ``keep``) by its know-nothing output."""
    def replace(j: int, actual: torch.Tensor) -> torch.Tensor | None:
        return None if j == keep else predictions[j].form.know_nothing(actual)
    return replace


@dataclass
class _Head:
    """One prediction's share of the initial loss: how far its actual output moves the loss
    from the know-nothing one, and how far it may."""

    prediction: Prediction
    scores: bool
    delta: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return (abs(self.delta) <= self.tolerance if self.scores
                else self.delta <= self.tolerance)

    def describe(self) -> str:
        kind = "scores" if self.scores else "values"
        bound = f"±{self.tolerance:.3g}" if self.scores else f"up to +{self.tolerance:.3g}"
        return f"`{self.prediction.name}` ({kind}) {self.delta:+.4g}, {bound}"


def _loss_findings(runs: _Runs, loss: float, outputs: list[Any], targets: list[Any],
                   predictions: list[Prediction], main: int | None, num_classes: int | None,
                   expected_loss: float | None, rel_tol: float, abs_tol: float) -> list[Finding]:
    if not math.isfinite(loss):
        return [Finding(CHECK, "initial_loss.non_finite", Severity.FAIL,
                        f"The initial loss is {loss} before any training step.",
                        advice="Look for log(0), division by zero, NaN/Inf inputs or an "
                        "exploding initialization.", value=loss)]
    task = infer_task(outputs[0], targets[0])
    found = [_collapse(task, outputs)] if task.kind == "multiclass" else []
    if expected_loss is not None:  # the user's own expectation, for the loss as it is
        found.append(_band_finding(loss, expected_loss, "given", task, rel_tol, abs_tol))
    elif num_classes is not None:  # log C per sample: a loss summed over them is divided
        expected = expected_initial_loss(num_classes)
        summed = _Summed.of(runs.doubled_ratio(predictions) if predictions else None,
                            runs.mean_batch_size(), loss)
        if summed is not None:
            found.append(summed.finding(expected))
            loss *= summed.per_sample
        found.append(_band_finding(loss, expected, f"log {num_classes}, given", task, rel_tol,
                                   abs_tol, per_sample=summed is not None and summed.per_sample
                                   != 1.0))
    else:
        found += _own_loss_finding(runs, loss, task, targets, predictions, main, rel_tol,
                                   abs_tol)
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


def _closed_form(task: Task, targets: list[Any], single: bool,
                 ) -> tuple[float, str, dict[str, float]] | None:
    """The recipe's closed form of the know-nothing loss for this task, its name, and the
    regression references; None where there is none."""
    if not single:
        return None
    if task.kind == "multiclass":
        return float(task.expected_initial_loss() or 0.0), f"log {task.num_classes}", {}
    if task.kind == "multilabel":
        return math.log(2), "log 2 per label", {}
    if task.kind == "regression":
        zero, mean = regression_references(torch.cat([t.reshape(-1) for t in targets]))
        return zero, "mean(y^2)", {"mean_square": zero, "variance": mean}
    return None


def _own_loss_finding(runs: _Runs, loss: float, task: Task, targets: list[Any],
                      predictions: list[Prediction], main: int | None, rel_tol: float,
                      abs_tol: float) -> list[Finding]:
    """The data loss against the user's own loss at the know-nothing prediction; per sample
    (and said, ``initial_loss.summed``) when the loss sums over the samples."""
    if not predictions:
        why = (f" ({task.reason})" if task.kind == "unknown" else "")
        return [_no_expectation(loss, "no output of a module with trainable parameters enters "
                                f"the loss, so there is no prediction to replace{why}")]
    try:
        expected = runs.mean_loss(predictions, _know_nothing(predictions))
        deltas = ([loss - expected] if len(predictions) == 1 else
                  [runs.mean_loss(predictions, _know_nothing(predictions, keep=j)) - expected
                   for j in range(len(predictions))])
    except (UserCodeError, NoLossError) as err:
        return [_no_expectation(loss, f"the step fails when the prediction is replaced by a "
                                f"know-nothing output: {err}")]
    if not math.isfinite(expected):
        return [_no_expectation(loss, f"the loss at the know-nothing output is {expected} (a "
                                "log of 0 or a division by 0 where the output is 0 or uniform)")]
    ratio = runs.doubled_ratio(predictions)
    summed = _Summed.of(ratio, runs.mean_batch_size(), loss)
    # a loss summed over the samples is judged per sample, as the recipe's expectation is
    per = summed.per_sample if summed is not None else 1.0
    loss_s, expected_s, deltas = loss * per, expected * per, [d * per for d in deltas]
    outputs = ", ".join(f"{p.form.describe()} for `{p.name}`" for p in predictions)
    heads = [_head(p, j == main and task.is_classification, d, expected_s, rel_tol, abs_tol)
             for j, (p, d) in enumerate(zip(predictions, deltas, strict=True))]
    closed = _closed_form(task, targets, len(predictions) == 1)
    source = f"your loss at a know-nothing output: {outputs}"
    details: dict[str, Any] = {"task": task.kind, "task_reason": task.reason,
                               "know_nothing_loss": expected,
                               "heads": [{"name": h.prediction.name, "scores": h.scores,
                                          "activation": h.prediction.form.activation,
                                          "delta": h.delta, "tolerance": h.tolerance}
                                         for h in heads],
                               "doubled_batch_ratio": ratio}
    if closed is not None:
        value, name, references = closed
        details.update(references)
        details["closed_form"] = value
        if math.isclose(expected_s, value, rel_tol=1e-3, abs_tol=1e-6):
            source += f" (= {name}: {_closed_name(task, references)})"
    found = []
    unit = ""
    if summed is not None:
        found.append(summed.finding(expected_s))
        details.update(summed.details(expected_s))
        unit = " per sample" if summed.size else ""
    scores = [h for h in heads if h.scores]
    high = expected_s + sum(h.tolerance for h in heads)
    low = (expected_s - sum(h.tolerance for h in scores) if len(scores) == len(heads)
           else -math.inf)
    bound = (f"[{low:.4g}, {high:.4g}]" if math.isfinite(low) else f"up to {high:.4g}")
    per_head = (f" Per output: {'; '.join(h.describe() for h in heads)}."
                if len(heads) > 1 else "")
    text = (f"Initial data loss {loss_s:.4f}{unit} vs expected {expected_s:.4f}{unit} "
            f"({source}); accepted {bound}.{per_head}")
    if task.is_classification and expected_s < 0:
        return [*found, Finding(
            CHECK, "initial_loss.mismatch", Severity.FAIL,
            f"The loss at a uniform prediction is {expected_s:.4g}{unit}, below 0, for "
            f"{task.describe()}: no cross-entropy. {text}", advice=NEGATIVE_ADVICE,
            value=loss_s, expected=(low, high), details={**details, "reason": "negative"})]
    bad = [h for h in heads if not h.ok]
    if not bad:
        return [*found, Finding(CHECK, "initial_loss.ok", Severity.INFO, text, value=loss_s,
                                expected=(low, high), details=details)]
    advice = MISMATCH_ADVICE if any(h.scores for h in bad) else REGRESSION_ADVICE
    where = "; ".join(h.describe() for h in bad)
    return [*found, Finding(CHECK, "initial_loss.mismatch", Severity.FAIL,
                            f"{text} Off: {where}." if per_head else text, advice=advice,
                            value=loss_s, expected=(low, high), details=details)]


@dataclass(frozen=True)
class _Summed:
    """A loss summed over the samples: the batch repeated twice doubles it at the know-nothing
    output (a mean keeps it). ``size`` is the mean batch size (None when a batch's size cannot
    be read: the sum is then judged as it is)."""

    ratio: float
    size: float | None
    loss: float

    @classmethod
    def of(cls, ratio: float | None, size: float | None, loss: float) -> _Summed | None:
        """The sum ``ratio`` (:meth:`_Runs.doubled_ratio`) shows, else None."""
        if ratio is None or abs(ratio - 2.0) > SUM_RATIO_TOL:
            return None
        return cls(ratio, size, loss)

    @property
    def per_sample(self) -> float:
        """The factor from the loss to the loss per sample."""
        return 1.0 / self.size if self.size else 1.0

    def details(self, expected: float) -> dict[str, Any]:
        """``expected``: the expectation per sample."""
        return {"summed": True, "doubled_batch_ratio": self.ratio, "batch_size": self.size,
                "loss": self.loss, "per_sample_loss": self.loss * self.per_sample,
                "per_sample_expected": expected}

    def finding(self, expected: float) -> Finding:
        """The info ``initial_loss.summed``; ``expected``: the expectation per sample."""
        twice = (f"the batch repeated twice gives {self.ratio:.3f} times its loss at the "
                 "know-nothing output (a mean gives 1)")
        if not self.size:
            return Finding(CHECK, "initial_loss.summed", Severity.INFO,
                           f"The loss sums over the samples ({twice}); the batch size could "
                           "not be read, so the sum itself is judged.", value=self.ratio,
                           details=self.details(expected))
        return Finding(CHECK, "initial_loss.summed", Severity.INFO,
                       f"The loss sums over the {self.size:g} samples of a batch ({twice}): "
                       f"{self.loss:.4g} in all, {self.loss * self.per_sample:.4g} per sample "
                       f"against {expected:.4g} expected per sample, which is what is judged. "
                       "A correct choice (PyTorch's VAE example sums); the gradient, and so "
                       "the learning rate that suits it, then scales with the batch size.",
                       value=self.ratio,
                       advice="Scale the learning rate with the batch size if you change "
                              "it, or average the loss (reduction='mean') to decouple them.",
                       details=self.details(expected))


def _head(prediction: Prediction, classification: bool, delta: float, expected: float,
          rel_tol: float, abs_tol: float) -> _Head:
    """Scores (the task's classes, or probabilities) move a loss little at small weights; values
    (regression, embeddings) may raise it by a factor (see REGRESSION_FACTOR)."""
    if classification or prediction.form.bounded:
        return _Head(prediction, True, delta, loss_tolerance(expected, rel_tol, abs_tol))
    return _Head(prediction, False, delta, (REGRESSION_FACTOR - 1) * abs(expected) + abs_tol)


def _closed_name(task: Task, references: dict[str, float]) -> str:
    if task.kind == "regression":
        return (f"the mean squared error of predicting 0; predicting the mean gives Var(y) = "
                f"{references['variance']:.4g}")
    if task.kind == "multilabel":
        return f"the binary cross-entropy of a uniform guess, {task.describe()}"
    return f"the cross-entropy of a uniform prediction, {task.describe()}"


def _no_expectation(loss: float, reason: str) -> Finding:
    return Finding(CHECK, "initial_loss.no_expectation", Severity.INFO,
                   f"Initial loss {loss:.4g}: no expectation can be computed ({reason}).",
                   value=loss, details={"reason": reason},
                   advice="Pass `expected_loss=`: the loss a model with small weights should "
                   "start at for your loss function.")


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

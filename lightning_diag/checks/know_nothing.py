"""The expectation of the initial loss: the user's own loss at the know-nothing prediction.

``training_step`` runs on a copy with the model's predictions replaced (through forward hooks,
:mod:`lightning_diag.checks.reference_outputs`) by what a network with small weights outputs:
zero logits, uniform probabilities or log-probabilities, zeros for values, every head of a
multi-output model included (:class:`KnowNothingRuns`). Each prediction's share of the initial
loss is how far its output as computed moves the loss from that expectation, judged by what it
is (:class:`Head`): scores within the band of :func:`loss_tolerance`, values up to
:data:`REGRESSION_FACTOR` - 1 times the expectation above it. A loss that doubles with the batch
(summed over the samples, :class:`Summed`) is judged per sample.

**The spread of default initializations of the user's own network.** Where a prediction misses
its band, the copy is re-initialized :data:`REINITS` times (each trainable module's own
``reset_parameters``, seeded) and the same deviation measured on each (:class:`InitSpread`).
When default initializations of this network typically meet the expectation (their median
deviation inside the band), the band widens to their mean deviation plus
:data:`SPREAD_SIGMAS` standard deviations: an unlucky but default draw (a segmentation head
whose biases disfavour the commonest class) is no mismatch, while a network initialized far
outside that spread (a last layer scaled 30x) still is. A network whose default
initializations miss the band too keeps the band: the architecture or the loss is off, not the
draw.

Example:
    >>> loss_tolerance(math.log(10)) == 0.1 * math.log(10) + 0.05
    True
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import NoLossError, UserCodeError, _batch_size, select_samples
from lightning_diag.checks.reference_outputs import Prediction, Substitution
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.task import Task, regression_references
from lightning_diag.isolation import RNGState, StepState, preserved_rng

__all__ = ["CHECK", "REGRESSION_FACTOR", "REINITS", "SPREAD_SIGMAS", "SUM_RATIO_TOL", "Head",
           "InitSpread", "KnowNothingRuns", "Summed", "know_nothing", "loss_tolerance",
           "no_expectation", "own_loss_findings"]

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
#: Default initializations drawn to measure the spread of the user's network's initial loss
#: (only when a prediction misses its band).
REINITS = 10
#: The band widens to the mean deviation of those initializations plus this many standard
#: deviations of theirs (see docs/callbacks/initial_loss.md for the margins measured).
SPREAD_SIGMAS = 3.0

Replace = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def loss_tolerance(expected: float, rel_tol: float = 0.1, abs_tol: float = 0.05) -> float:
    """Half-width of the accepted band around the expected initial loss.

    Default-initialized digits CNNs measured 2.30-2.39 against ``log 10 = 2.303``; 10 % plus
    0.05 nats accepts them (band ``[2.02, 2.58]``) while a last layer scaled up 10x lands far out.

    Example:
        >>> round(loss_tolerance(2.302585), 3)
        0.28
    """
    return rel_tol * abs(expected) + abs_tol


def know_nothing(predictions: list[Prediction], keep: int | None = None) -> Replace:
    """Replace every prediction (but ``keep``) by its know-nothing output."""
    def replace(j: int, actual: torch.Tensor) -> torch.Tensor | None:
        return None if j == keep else predictions[j].form.know_nothing(actual)
    return replace


def _as_computed(j: int, actual: torch.Tensor) -> None:
    return None


@dataclass
class KnowNothingRuns:
    """The copy and its batches: the mean loss of a pass with the predictions replaced."""

    clone: pl.LightningModule
    batches: list[Any]
    rng: RNGState
    state: StepState

    def mean_loss(self, predictions: list[Prediction], replace: Replace) -> float:
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

    def deviations(self, predictions: list[Prediction]) -> tuple[float, list[float]]:
        """The know-nothing loss, and how far each prediction as computed moves the loss from
        it (the loss as computed, with one prediction: every one but that one replaced, with
        several).

        Raises:
            UserCodeError, NoLossError: the step failed on a replaced prediction.
        """
        expected = self.mean_loss(predictions, know_nothing(predictions))
        if len(predictions) == 1:
            return expected, [self.mean_loss(predictions, _as_computed) - expected]
        return expected, [self.mean_loss(predictions, know_nothing(predictions, keep=j))
                          - expected for j in range(len(predictions))]

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
                with torch.no_grad(), Substitution(predictions, know_nothing(predictions)) as sub:
                    self.rng.restore()
                    losses.append(float(sub.step(self.clone, b, 0)))
        except (UserCodeError, NoLossError):  # a step written for one batch size
            return None
        finally:
            self.state.restore()
        return losses[1] / losses[0] if losses[0] and math.isfinite(losses[0]) else None

    def init_spread(self, predictions: list[Prediction], count: int = REINITS,
                    ) -> InitSpread | None:
        """The deviations of :meth:`deviations` at ``count`` default initializations of the
        copy (seeds 0 to ``count - 1``; each module with trainable parameters of its own reset
        by its ``reset_parameters``), the weights put back after; None when no module can be
        reset, or the step fails or gives a non-finite loss at one of them."""
        resets = [getattr(m, "reset_parameters", None) for m in self.clone.modules()
                  if any(p.requires_grad for p in m.parameters(recurse=False))]
        resettable: list[Callable[[], Any]] = [r for r in resets if callable(r)]
        if not resettable:
            return None
        saved = {k: v.detach().clone() for k, v in self.clone.state_dict().items()}
        rows = []
        try:
            with preserved_rng():
                for seed in range(count):
                    torch.manual_seed(seed)
                    with torch.no_grad():
                        for reset in resettable:
                            reset()
                    rows.append(self.deviations(predictions)[1])
        except (UserCodeError, NoLossError, RuntimeError):  # a step or a reset that fails
            return None
        finally:
            self.clone.load_state_dict(saved)
            self.state.restore()
        if not all(math.isfinite(d) for row in rows for d in row):
            return None
        return InitSpread(rows)


@dataclass(frozen=True)
class InitSpread:
    """How far default initializations of the user's network move the loss from its
    expectation, per prediction (:meth:`KnowNothingRuns.init_spread`).

    Example:
        >>> spread = InitSpread([[0.1], [-0.2], [0.3], [0.0]])
        >>> round(spread.tolerance(0, base=0.2, scores=True), 3)  # 0.05 + 3 x 0.208
        0.674
        >>> spread.tolerance(0, base=0.01, scores=True)  # the median misses 0.01 itself
        0.01
    """

    #: Per initialization, per prediction: the deviation (per sample for a summed loss).
    deviations: list[list[float]]

    def of(self, j: int) -> list[float]:
        return [row[j] for row in self.deviations]

    def typical(self, j: int, scores: bool) -> float:
        """The median deviation of prediction ``j`` (its absolute value for scores)."""
        values = self.of(j)
        return statistics.median([abs(d) for d in values] if scores else values)

    def tolerance(self, j: int, base: float, scores: bool) -> float:
        """``base``, widened to the mean deviation plus :data:`SPREAD_SIGMAS` standard
        deviations (its absolute value for scores) when the median deviation lies within
        ``base``: default initializations of this network meet the expectation, with that
        spread."""
        if self.typical(j, scores) > base:
            return base
        values = self.of(j)
        mean, sd = statistics.fmean(values), statistics.stdev(values)
        return max(base, (abs(mean) if scores else mean) + SPREAD_SIGMAS * sd)


@dataclass
class Head:
    """One prediction's share of the initial loss: how far its actual output moves the loss
    from the know-nothing one, and how far it may (``base``: the recipe's band; ``tolerance``:
    that band, widened to the spread of default initializations where it applies)."""

    prediction: Prediction
    scores: bool
    delta: float
    base: float
    tolerance: float
    spread: str = ""

    @classmethod
    def of(cls, prediction: Prediction, classification: bool, delta: float, expected: float,
           rel_tol: float, abs_tol: float) -> Head:
        """Scores (the task's classes, or probabilities) move a loss little at small weights;
        values (regression, embeddings) may raise it by a factor (see REGRESSION_FACTOR)."""
        if classification or prediction.form.bounded:
            tol = loss_tolerance(expected, rel_tol, abs_tol)
            return cls(prediction, True, delta, tol, tol)
        tol = (REGRESSION_FACTOR - 1) * abs(expected) + abs_tol
        return cls(prediction, False, delta, tol, tol)

    @property
    def ok(self) -> bool:
        return (abs(self.delta) <= self.tolerance if self.scores
                else self.delta <= self.tolerance)

    def widen(self, spread: InitSpread, j: int, per: float) -> None:
        """Apply the spread of default initializations (``per``: to per-sample units)."""
        scaled = InitSpread([[d * per for d in row] for row in spread.deviations])
        self.tolerance = scaled.tolerance(j, self.base, self.scores)
        values = scaled.of(j)
        moved = (f"{len(values)} default initializations of this network move it by "
                 f"{min(values):+.3g} to {max(values):+.3g}")
        if scaled.typical(j, self.scores) > self.base:
            self.spread = (f"{moved}, missing the band themselves: the network or its loss is "
                           "off, not this draw")
        elif self.tolerance > self.base:
            self.spread = f"{moved}: accepted within {self.tolerance:.3g}"
        else:
            self.spread = moved

    def describe(self) -> str:
        kind = "scores" if self.scores else "values"
        bound = f"±{self.tolerance:.3g}" if self.scores else f"up to +{self.tolerance:.3g}"
        return f"`{self.prediction.name}` ({kind}) {self.delta:+.4g}, {bound}"

    def details(self) -> dict[str, Any]:
        return {"name": self.prediction.name, "scores": self.scores,
                "activation": self.prediction.form.activation, "delta": self.delta,
                "tolerance": self.tolerance, "recipe_tolerance": self.base,
                "init_spread": self.spread or None}


@dataclass(frozen=True)
class Summed:
    """A loss summed over the samples: the batch repeated twice doubles it at the know-nothing
    output (a mean keeps it). ``size`` is the mean batch size (None when a batch's size cannot
    be read: the sum is then judged as it is)."""

    ratio: float
    size: float | None
    loss: float

    @classmethod
    def of(cls, ratio: float | None, size: float | None, loss: float) -> Summed | None:
        """The sum ``ratio`` (:meth:`KnowNothingRuns.doubled_ratio`) shows, else None."""
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


def no_expectation(loss: float, reason: str) -> Finding:
    """The info ``initial_loss.no_expectation``, saying why."""
    return Finding(CHECK, "initial_loss.no_expectation", Severity.INFO,
                   f"Initial loss {loss:.4g}: no expectation can be computed ({reason}).",
                   value=loss, details={"reason": reason},
                   advice="Pass `expected_loss=`: the loss a model with small weights should "
                   "start at for your loss function.")


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


def _closed_name(task: Task, references: dict[str, float]) -> str:
    if task.kind == "regression":
        return (f"the mean squared error of predicting 0; predicting the mean gives Var(y) = "
                f"{references['variance']:.4g}")
    if task.kind == "multilabel":
        return f"the binary cross-entropy of a uniform guess, {task.describe()}"
    return f"the cross-entropy of a uniform prediction, {task.describe()}"


def own_loss_findings(runs: KnowNothingRuns, loss: float, task: Task, targets: list[Any],
                      predictions: list[Prediction], main: int | None, rel_tol: float,
                      abs_tol: float) -> list[Finding]:
    """The data loss against the user's own loss at the know-nothing prediction; per sample
    (and said, ``initial_loss.summed``) when the loss sums over the samples; each prediction's
    band widened to the spread of default initializations where one misses it."""
    if not predictions:
        why = (f" ({task.reason})" if task.kind == "unknown" else "")
        return [no_expectation(loss, "no output of a module with trainable parameters enters "
                               f"the loss, so there is no prediction to replace{why}")]
    try:
        expected, deltas = runs.deviations(predictions)
    except (UserCodeError, NoLossError) as err:
        return [no_expectation(loss, f"the step fails when the prediction is replaced by a "
                               f"know-nothing output: {err}")]
    if not math.isfinite(expected):
        return [no_expectation(loss, f"the loss at the know-nothing output is {expected} (a "
                               "log of 0 or a division by 0 where the output is 0 or uniform)")]
    ratio = runs.doubled_ratio(predictions)
    summed = Summed.of(ratio, runs.mean_batch_size(), loss)
    # a loss summed over the samples is judged per sample, as the recipe's expectation is
    per = summed.per_sample if summed is not None else 1.0
    verdict = _Verdict(loss * per, expected * per, task, [
        Head.of(p, j == main and task.is_classification, d * per, expected * per, rel_tol,
                abs_tol) for j, (p, d) in enumerate(zip(predictions, deltas, strict=True))])
    if not all(h.ok for h in verdict.heads):  # an unlucky draw, or an initialization off?
        spread = runs.init_spread(predictions)
        if spread is not None:
            for j, h in enumerate(verdict.heads):
                h.widen(spread, j, per)
    details: dict[str, Any] = {"task": task.kind, "task_reason": task.reason,
                               "know_nothing_loss": expected,
                               "heads": [h.details() for h in verdict.heads],
                               "doubled_batch_ratio": ratio}
    source = "your loss at a know-nothing output: " + ", ".join(
        f"{p.form.describe()} for `{p.name}`" for p in predictions)
    closed = _closed_form(task, targets, len(predictions) == 1)
    if closed is not None:
        value, name, references = closed
        details.update(references)
        details["closed_form"] = value
        if math.isclose(verdict.expected, value, rel_tol=1e-3, abs_tol=1e-6):
            source += f" (= {name}: {_closed_name(task, references)})"
    found = []
    if summed is not None:
        found.append(summed.finding(verdict.expected))
        details.update(summed.details(verdict.expected))
        verdict.unit = " per sample" if summed.size else ""
    return [*found, verdict.finding(source, details)]


@dataclass
class _Verdict:
    """The loss (per sample for a sum), its expectation and each prediction's share."""

    loss: float
    expected: float
    task: Task
    heads: list[Head]
    unit: str = ""

    def bounds(self) -> tuple[float, float]:
        high = self.expected + sum(h.tolerance for h in self.heads)
        scores = [h for h in self.heads if h.scores]
        low = (self.expected - sum(h.tolerance for h in scores)
               if len(scores) == len(self.heads) else -math.inf)
        return low, high

    def finding(self, source: str, details: dict[str, Any]) -> Finding:
        """``initial_loss.ok`` or ``initial_loss.mismatch``."""
        low, high = self.bounds()
        bound = f"[{low:.4g}, {high:.4g}]" if math.isfinite(low) else f"up to {high:.4g}"
        several = len(self.heads) > 1
        per_head = (f" Per output: {'; '.join(h.describe() for h in self.heads)}."
                    if several else "")
        notes = [f"`{h.prediction.name}`: {h.spread}" if several else h.spread
                 for h in self.heads if h.spread]
        spread = (f" The recipe's band alone is {self._recipe_bound()}; "
                  f"{'; '.join(notes)}." if notes else "")
        text = (f"Initial data loss {self.loss:.4f}{self.unit} vs expected "
                f"{self.expected:.4f}{self.unit} ({source}); accepted {bound}.{per_head}"
                f"{spread}")
        if self.task.is_classification and self.expected < 0:
            return Finding(
                CHECK, "initial_loss.mismatch", Severity.FAIL,
                f"The loss at a uniform prediction is {self.expected:.4g}{self.unit}, below 0, "
                f"for {self.task.describe()}: no cross-entropy. {text}", advice=NEGATIVE_ADVICE,
                value=self.loss, expected=(low, high), details={**details, "reason": "negative"})
        bad = [h for h in self.heads if not h.ok]
        if not bad:
            return Finding(CHECK, "initial_loss.ok", Severity.INFO, text, value=self.loss,
                           expected=(low, high), details=details)
        advice = MISMATCH_ADVICE if any(h.scores for h in bad) else REGRESSION_ADVICE
        where = "; ".join(h.describe() for h in bad)
        return Finding(CHECK, "initial_loss.mismatch", Severity.FAIL,
                       f"{text} Off: {where}." if several else text, advice=advice,
                       value=self.loss, expected=(low, high), details=details)

    def _recipe_bound(self) -> str:
        high = self.expected + sum(h.base for h in self.heads)
        if all(h.scores for h in self.heads):
            return f"[{self.expected - sum(h.base for h in self.heads):.4g}, {high:.4g}]"
        return f"up to {high:.4g}"

"""What the user's own loss does with the labels found in the batch.

:func:`~lightning_diag.functional.task.infer_task` reads the task from the shapes and values of
one output and the batch's target: integer targets that index a dimension of the output are
class labels, 0/1 targets of the output's shape binary labels. Two readings need the user's
loss to confirm or complete them, and the side experiments (initial loss, overfit test, the
data inspection's class count) ask it here, running the step again on a copy:

- **Labels the loss ignores** (:func:`labels_ignored`). A VAE trained on ``(image, digit)``
  batches returns a 64-wide reconstruction while the batch holds digit labels 0-9: read from
  the shapes, 64-class logits for those labels. Run again with the labels permuted within the
  batch, its loss does not move, though its predictions differ from sample to sample: the
  output is not scored against those labels. The task is then unknown (judged by the loss
  alone: no accuracy required, no class count from the output's width).
- **One value per sample scored as a binary classifier** (:func:`binary_scores`): a single
  logit (``binary_cross_entropy_with_logits``) for a 0/1 label column that also holds a 2 reads
  as three classes from the labels. Where the loss, on the samples labelled 0 or 1, is lower at
  an output that memorized them (logits ``+m`` / ``-m``) than at a know-nothing one, and higher
  at the opposite output, the output scores two classes, and a label 2 is out of its range.

Example:
    >>> import torch, lightning.pytorch as pl
    >>> import torch.nn.functional as F
    >>> class AutoEncoder(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(6, 6)
    ...     def training_step(self, batch, batch_idx):
    ...         x, digits = batch  # the digit labels are carried along, never used
    ...         return F.mse_loss(self.net(x), x)
    >>> model, batch = AutoEncoder(), (torch.randn(8, 6), torch.arange(8) % 3)
    >>> _, _, tensors = record_predictions(model, batch)
    >>> labels_ignored(StepProbe(model), batch, batch[1], tensors).split(":")[0]
    "the loss is the same with the batch's labels permuted"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import (
    NoLossError,
    OutputCapture,
    UserCodeError,
    select_samples,
    step_loss,
)
from lightning_diag.checks.reference_outputs import (
    Prediction,
    Substitution,
    main_prediction,
    record_predictions,
)
from lightning_diag.functional.output_form import memorising_output
from lightning_diag.functional.task import Task, infer_task, select_output
from lightning_diag.isolation import RNGState, StepState, side_experiment

__all__ = ["BINARY", "BINARY_MARGIN", "ROLLS", "SAME_LOSS_TOL", "WIDTH", "StepProbe",
           "binary_scores", "labels_ignored", "output_classes", "output_width", "replace_leaf",
           "step_task"]

#: Two losses within this (relative) of each other are the same: float rounding of the same
#: computation, far below any change a label makes in a loss that reads it.
SAME_LOSS_TOL = 1e-6
#: The label rolls tried, by 1, 2 and 3 samples, each until one moves the loss: a loss that
#: reads its labels through a squashed output (a softmax before cross-entropy) moves with them
#: by little, and on one roll by chance by less than SAME_LOSS_TOL (the dict-batches family's
#: seed 8: 2e-7 of the loss, where seed 0 moved by 1e-3).
ROLLS = (1, 2, 3)
#: The logit margin of the memorising output of :func:`binary_scores`: sigmoid(8) = 0.9997.
BINARY_MARGIN = 8.0


@dataclass
class StepProbe:
    """The user's ``training_step`` on a copy, evaluated without gradients from the same RNG
    state and the same carried state (``self.hidden``) each time, so that two evaluations
    differ only by what the caller changed (the batch, a prediction).

    Attributes:
        module: The copy.
        rng: The RNG state every evaluation starts from (default: the current one).
        state: The carried state, restored before and after each evaluation (None: none).
        context: Wraps each step (the run's autocast or default dtype).
    """

    module: pl.LightningModule
    rng: RNGState = field(default_factory=RNGState.capture)
    state: StepState | None = None
    context: Callable[[], AbstractContextManager[Any]] = nullcontext

    def loss(self, batch: Any, predictions: list[Prediction] | None = None,
             replace: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
             ) -> float:
        """The loss of ``batch``, with ``predictions`` replaced by ``replace`` when given.

        Raises:
            UserCodeError, NoLossError: the step failed.
        """
        sub = (Substitution(predictions, replace) if predictions and replace is not None
               else nullcontext())
        if self.state is not None:
            self.state.restore()
        try:
            with torch.no_grad(), self.context(), sub:
                self.rng.restore()
                return float(step_loss(self.module, batch, 0))
        finally:
            self.rng.restore()
            if self.state is not None:
                self.state.restore()


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SAME_LOSS_TOL, abs_tol=1e-12)


def _varies(t: torch.Tensor) -> bool:
    """The tensor differs from sample to sample (along dimension 0)."""
    return t.dim() > 0 and t.shape[0] > 1 and bool((t.detach() != t.detach()[:1]).any())


def _leaves(obj: Any, depth: int = 0) -> Iterator[Any]:
    yield obj
    if depth < 4 and isinstance(obj, Mapping):
        for value in obj.values():
            yield from _leaves(value, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _leaves(value, depth + 1)


def replace_leaf(batch: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``batch`` with the tensor ``old`` (found by identity, in tuples, lists and dicts)
    replaced by ``new``, its structure kept; None when ``old`` is not in it (a target reader
    that builds its target: it cannot be written back).

    Example:
        >>> y = torch.tensor([0, 1])
        >>> replace_leaf({"x": torch.zeros(2), "labels": y}, y, y.flip(0))["labels"].tolist()
        [1, 0]
        >>> replace_leaf((torch.zeros(2), y), y.clone(), y) is None
        True
    """
    if not any(leaf is old for leaf in _leaves(batch)):
        return None

    def swap(obj: Any, depth: int = 0) -> Any:
        if obj is old:
            return new
        if depth < 4 and isinstance(obj, Mapping):
            out = obj.copy() if hasattr(obj, "copy") else dict(obj)
            for key in obj:
                out[key] = swap(obj[key], depth + 1)
            return out
        if depth < 4 and isinstance(obj, (list, tuple)):
            items = [swap(v, depth + 1) for v in obj]
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):
                return type(obj)(*items)
            return type(obj)(items)
        return obj

    return swap(batch)


def labels_ignored(probe: StepProbe, batch: Any, target: Any,
                   tensors: list[torch.Tensor]) -> str | None:
    """Why the step's loss does not score its output against ``target`` (a phrase for
    :attr:`~lightning_diag.functional.task.Task.reason`), or None when it does or when that
    cannot be told.

    The step runs on ``batch`` and on ``batch`` with ``target`` permuted within it (rolled by
    each of :data:`ROLLS` samples, until one moves the loss): the same loss on every roll
    (within :data:`SAME_LOSS_TOL`) means the labels do not enter it, provided the predictions
    (``tensors``, from :func:`record_predictions`) differ from sample to sample (on identical
    outputs a permutation changes no loss). None, and so the labels taken as used, when the
    target cannot be written back into the batch, no roll changes a label, there is no
    prediction or one does not vary, or the step fails.
    """
    if (not isinstance(target, torch.Tensor) or target.dim() == 0 or len(target) < 2
            or not tensors or not all(_varies(t) for t in tensors)):
        return None
    moves = []
    for shift in ROLLS[:len(target) - 1]:
        rolled = target.roll(shift, 0)
        moved = replace_leaf(batch, target, rolled)
        if moved is None:
            return None
        if not bool((rolled == target).all()):
            moves.append(moved)
    try:
        base = probe.loss(batch)
        if not moves or not all(_same(base, probe.loss(m)) for m in moves):
            return None
    except (UserCodeError, NoLossError):  # a step that fails on the permuted labels reads them
        return None
    return ("the loss is the same with the batch's labels permuted: the step does not score "
            "its output against them")


def step_task(probe: StepProbe, batch: Any, output: Any, target: Any,
              tensors: list[torch.Tensor]) -> Task:
    """The task of the step's ``output`` for ``target``
    (:func:`~lightning_diag.functional.task.infer_task`), unless the loss ignores the labels it
    reads as classes (:func:`labels_ignored`): then unknown, its reason saying both.

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> class Classifier(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(6, 3)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        >>> model, batch = Classifier(), (torch.randn(8, 6), torch.arange(8) % 3)
        >>> _, _, tensors = record_predictions(model, batch)
        >>> step_task(StepProbe(model), batch, tensors[0], batch[1], tensors).describe()
        '3-class logits'
    """
    task = infer_task(output, target)
    if not task.is_classification:
        return task
    why = labels_ignored(probe, batch, target, tensors)
    if why is None:
        return task
    return Task("unknown", reason=f"{task.describe()} by the shapes of the output "
                f"{tuple(output.shape)} and the target {tuple(target.shape)}, but {why}")


def binary_scores(probe: StepProbe, batch: Any, target: Any, prediction: Prediction,
                  output: torch.Tensor) -> bool:
    """Whether one value per sample (``output``: ``(N,)`` or ``(N, 1)``, the tensor of
    ``prediction``) is scored as a binary classifier of the labels 0 and 1 of ``target``.

    On the samples labelled 0 or 1, the loss at an output that memorized them (logits
    ``+-BINARY_MARGIN``, or their sigmoid where the output comes out of one) must be below the
    loss at the know-nothing output, and that below the loss at the opposite output: a
    cross-entropy, a hinge or a smoothed cross-entropy is; a Poisson or squared error on counts
    is not (an output of 8 for a count of 1 costs far more than 0). False when it cannot be
    told (no such sample, the step fails on fewer samples).
    """
    if (not isinstance(target, torch.Tensor) or target.is_floating_point()
            or tuple(target.shape) != (len(output),) or output.shape not in (
                (len(target),), (len(target), 1))):
        return False
    keep = torch.nonzero((target == 0) | (target == 1)).reshape(-1)
    if len(keep) == 0:
        return False
    labels = target[keep]
    task = Task("multilabel", "probs" if prediction.form.activation == "sigmoid" else "logits",
                1)
    sub = select_samples(batch, keep) if len(keep) < len(target) else batch

    def at(margin: float | None) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
        def replace(_: int, actual: torch.Tensor) -> torch.Tensor | None:
            if margin is None:
                return prediction.form.know_nothing(actual)
            return memorising_output(task, actual, labels, margin)
        return replace

    try:
        right, nothing, wrong = (probe.loss(sub, [prediction], at(m))
                                 for m in (BINARY_MARGIN, None, -BINARY_MARGIN))
    except (UserCodeError, NoLossError, RuntimeError):  # a step for one batch size, a shape
        return False
    return all(map(math.isfinite, (right, nothing, wrong))) and right < nothing < wrong


def output_width(output: Any, target: Any) -> int | None:
    """``C`` when ``output`` scores ``(N, C)`` classes for ``(N,)`` integer targets, else None.

    Example:
        >>> output_width(torch.zeros(4, 3), torch.tensor([0, 2, 1, 1]))
        3
        >>> print(output_width(torch.zeros(4), torch.tensor([0, 2, 1, 1])))
        None
    """
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    per_sample = (output.is_floating_point() and output.dim() == 2 and target.dim() == 1
                  and not target.is_floating_point() and target.dtype != torch.bool
                  and len(output) == len(target))
    return int(output.shape[1]) if per_sample and output.shape[1] >= 2 else None


#: How :func:`output_classes` read the class count, for messages.
WIDTH = "the model's output width"
BINARY = "the model's one output per sample, which the loss scores as a binary (0/1) classifier"


def output_classes(module: pl.LightningModule, batch: Any,
                   target: Any) -> tuple[int, str] | None:
    """The class count the model's output gives the labels of ``batch`` (``target``), from
    one step of a copy of ``module`` (every RNG stream restored): the width ``C`` of an
    ``(N, C)`` output scoring ``(N,)`` integer labels, unless the loss ignores them
    (:func:`labels_ignored`); 2 for one value per sample scored as a binary classifier
    (:func:`binary_scores`); else None (the class count then comes from the labels). With the
    count, how it was read (:data:`WIDTH` or :data:`BINARY`).

    A step that fails (the loss may fail on the very label out of range) leaves the width of
    the output it computed before failing.

    Raises:
        RuntimeError: the module cannot be copied.
    """
    with side_experiment(module) as clone, OutputCapture(clone) as capture:
        state = StepState(clone)
        probe = StepProbe(clone, state=state)
        try:
            _, predictions, tensors = record_predictions(clone, batch, 0)
        except (UserCodeError, NoLossError):
            width = output_width(select_output(capture.output), target)
            return None if width is None else (width, WIDTH)
        state.restore()
        output = select_output(capture.output)
        width = output_width(output, target)
        if width is not None:
            return None if labels_ignored(probe, batch, target, tensors) else (width, WIDTH)
        main = main_prediction(predictions, tensors, output)
        if main is not None and binary_scores(probe, batch, target, predictions[main],
                                              tensors[main]):
            return 2, BINARY
    return None

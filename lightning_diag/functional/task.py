"""What a model's output means, inferred once from one output and its target.

Every check that needs to know the task (the initial-loss expectation, the overfit test's
accuracy, the ensemble's combination) reads it from :func:`infer_task`, so they agree:

- **multiclass**: integer targets and float scores over a class dimension, in any of the shapes
  people use: ``(N, C)`` for ``(N,)``; ``(N, C, d1, ...)`` for ``(N, d1, ...)`` (per-pixel
  segmentation); ``(N, T, V)`` for ``(N, T)`` and ``(N*T, V)`` for ``(N, T)`` (language models).
  The scores are logits, log-probabilities or probabilities (told apart by their values).
  Expected initial loss ``log C``.
- **multilabel** (binary included): targets of the output's shape holding only 0 and 1. Expected
  initial loss ``log 2`` per label (the mean binary cross-entropy of a uniform guess).
- **regression**: float targets of any other values. The references are the loss of predicting 0,
  ``mean(y^2)``, and of predicting the mean, ``Var(y)``.
- **unknown**: anything else (no target, a structure we cannot read); ``reason`` says why.

What an output looks like to a network that knows nothing, and to one that memorized its
targets, is read in :mod:`lightning_diag.functional.output_form`: the initial-loss and overfit
checks run the user's own loss on them.

Example:
    >>> import torch
    >>> task = infer_task(torch.randn(8, 5, 4, 4), torch.randint(0, 5, (8, 4, 4)))
    >>> task.kind, task.num_classes, task.class_dim, task.scores
    ('multiclass', 5, 1, 'logits')
    >>> round(task.expected_initial_loss(), 4)
    1.6094
    >>> infer_task(torch.randn(6, 3), torch.randint(0, 2, (6, 3)).float()).kind
    'multilabel'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["IGNORE_INDEX", "NORMALIZED_TOL", "Task", "accuracy", "correct_counts", "infer_task",
           "is_normalized", "regression_references", "select_output"]

TaskKind = Literal["multiclass", "multilabel", "regression", "unknown"]
Scores = Literal["logits", "log_probs", "probs", "values", "none"]

#: Targets equal to this are ignored by ``cross_entropy``/``nll_loss`` (their default).
IGNORE_INDEX = -100
#: Tolerance on ``sum(p) = 1`` / ``logsumexp = 0`` when telling probabilities from logits.
NORMALIZED_TOL = 1e-3


@dataclass(frozen=True)
class Task:
    """The task one output/target pair belongs to (see the module docstring).

    Attributes:
        kind: ``"multiclass"``, ``"multilabel"``, ``"regression"`` or ``"unknown"``.
        scores: What the output holds: ``"logits"``, ``"log_probs"``, ``"probs"`` (classification),
            ``"values"`` (regression) or ``"none"`` (unknown).
        num_classes: C for multiclass, the number of labels for multilabel, else None.
        class_dim: The output's class dimension for multiclass (1 or -1), else None.
        flattened: True when ``(N*T, V)`` scores go with ``(N, T)`` targets.
        reason: How it was inferred, or why it could not be.
    """

    kind: TaskKind
    scores: Scores = "none"
    num_classes: int | None = None
    class_dim: int | None = None
    flattened: bool = False
    reason: str = ""

    @property
    def is_classification(self) -> bool:
        return self.kind in ("multiclass", "multilabel")

    def expected_initial_loss(self) -> float | None:
        """``log C`` (multiclass), ``log 2`` (multilabel, mean over labels), else None.

        Example:
            >>> Task("multilabel", "logits", num_classes=4).expected_initial_loss() == math.log(2)
            True
        """
        if self.kind == "multiclass" and self.num_classes:
            return math.log(self.num_classes)
        if self.kind == "multilabel":
            return math.log(2)
        return None

    def describe(self) -> str:
        """A short phrase for messages, e.g. ``"10-class logits over (N, C, H, W)"``."""
        if self.kind == "multiclass":
            return f"{self.num_classes}-class {self.scores.replace('_', '-')}"
        if self.kind == "multilabel":
            return f"{self.num_classes} binary label(s) ({self.scores.replace('_', '-')})"
        return self.kind

    def to_probabilities(self, output: torch.Tensor) -> torch.Tensor:
        """Class (or label) probabilities from ``output``; regression values unchanged.

        Example:
            >>> t = Task("multiclass", "log_probs", num_classes=2, class_dim=1)
            >>> t.to_probabilities(torch.log(torch.tensor([[0.25, 0.75]]))).tolist()
            [[0.25, 0.75]]
        """
        if self.kind == "multiclass":
            dim = self.class_dim if self.class_dim is not None else 1
            if self.scores == "logits":
                return output.float().softmax(dim)
            if self.scores == "log_probs":
                return output.float().exp()
            return output.float()
        if self.kind == "multilabel":
            if self.scores == "probs":
                return output.float()
            return output.float().sigmoid()
        return output

    def from_probabilities(self, probs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_probabilities`, in the kind of scores ``like`` holds: what a
        combined prediction must look like to go through the user's own loss and metrics.

        Example:
            >>> t = Task("multiclass", "logits", num_classes=2, class_dim=1)
            >>> p = torch.tensor([[0.25, 0.75]])
            >>> back = t.to_probabilities(t.from_probabilities(p, like=p))
            >>> [round(v, 6) for v in back[0].tolist()]
            [0.25, 0.75]
        """
        tiny = torch.finfo(probs.dtype).tiny
        if self.kind == "multiclass" and self.scores in ("logits", "log_probs"):
            # log p is a valid set of logits too: softmax(log p) = p.
            return probs.clamp_min(tiny).log().to(like.dtype)
        if self.kind == "multilabel" and self.scores != "probs":
            return torch.logit(probs.clamp(tiny, 1 - 1e-7)).to(like.dtype)
        return probs.to(like.dtype)


def _class_layout(output: torch.Tensor, target: torch.Tensor) -> tuple[int, bool] | None:
    """``(class_dim, flattened)`` when ``output`` scores classes for integer ``target``."""
    if output.dim() == target.dim() + 1 and output.shape[0] == target.shape[0]:
        if output.shape[2:] == target.shape[1:] and output.dim() >= 2:
            return 1, False
        if output.shape[:-1] == target.shape:
            return -1, False
    if output.dim() == 2 and target.dim() >= 2 and output.shape[0] == target.numel():
        return 1, True
    return None


def _score_kind(output: torch.Tensor, dim: int) -> Scores:
    x = output.detach().float()
    if not bool(torch.isfinite(x).all()):
        return "logits"
    if bool((x <= NORMALIZED_TOL).all()) and is_normalized(x.logsumexp(dim), 0.0):
        return "log_probs"
    if bool(((x >= 0) & (x <= 1)).all()) and is_normalized(x.sum(dim), 1.0):
        return "probs"
    return "logits"


def is_normalized(totals: torch.Tensor, value: float) -> bool:
    """Every total within :data:`NORMALIZED_TOL` of ``value`` (1 for probabilities, 0 for the
    ``logsumexp`` of log-probabilities)."""
    return bool((totals - value).abs().max() <= NORMALIZED_TOL)


def _label_scores(output: torch.Tensor) -> Scores:
    # Logits of a fresh network take both signs; outputs all inside [0, 1] are read as
    # probabilities (a sigmoid in forward), the one ambiguous case being all-zero logits.
    x = output.detach().float()
    return "probs" if bool(((x >= 0) & (x <= 1)).all()) else "logits"


def infer_task(output: Any, target: Any) -> Task:
    """Infer the task from one batch's model output and target (see the module docstring).

    Args:
        output: The model's output (a tensor; use :func:`select_output` on tuples and dicts).
        target: The batch's target, or None when it could not be read.

    Example:
        >>> import torch
        >>> lm = infer_task(torch.randn(12, 16).log_softmax(1), torch.randint(0, 16, (3, 4)))
        >>> lm.kind, lm.scores, lm.num_classes, lm.flattened
        ('multiclass', 'log_probs', 16, True)
        >>> infer_task(torch.randn(6), torch.randn(6)).kind
        'regression'
        >>> infer_task(torch.randn(6, 3), None).reason
        'no target could be read from the batch'
    """
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return Task("unknown", reason=f"the output is {_what(output)}, not a float tensor")
    if not isinstance(target, torch.Tensor):
        return Task("unknown", reason="no target could be read from the batch" if target is None
                    else f"the target is {_what(target)}, not a tensor")
    if target.dtype == torch.bool:
        target = target.float()
    if not target.is_floating_point():
        layout = _class_layout(output, target)
        if layout is not None:
            dim, flat = layout
            classes = int(output.shape[dim])
            valid = target[target != IGNORE_INDEX]
            if classes >= 2 and (valid.numel() == 0 or (int(valid.min()) >= 0
                                                        and int(valid.max()) < classes)):
                return Task("multiclass", _score_kind(output, dim), classes, dim, flat,
                            f"integer targets {tuple(target.shape)} index dimension {dim} of "
                            f"the output {tuple(output.shape)}")
        if _same_samples(output, target) and _binary(target):
            return _multilabel(output, target)
        return Task("unknown", reason=f"integer targets {tuple(target.shape)} do not index a "
                    f"class dimension of the output {tuple(output.shape)}")
    if _same_samples(output, target):
        if _binary(target):
            return _multilabel(output, target)
        return Task("regression", "values",
                    reason=f"float targets {tuple(target.shape)} of the output's shape")
    return Task("unknown", reason=f"the output {tuple(output.shape)} and the target "
                f"{tuple(target.shape)} have no shape relation we know")


def _same_samples(output: torch.Tensor, target: torch.Tensor) -> bool:
    """One prediction per target value: equal shapes, or ``(N, 1)`` against ``(N,)``."""
    return output.shape == target.shape or (output.dim() == target.dim() + 1
                                            and output.shape[-1] == 1
                                            and output.shape[:-1] == target.shape)


def _binary(target: torch.Tensor) -> bool:
    return target.numel() > 0 and bool(((target == 0) | (target == 1)).all())


def _multilabel(output: torch.Tensor, target: torch.Tensor) -> Task:
    labels = int(target.shape[-1]) if target.dim() >= 2 else 1
    return Task("multilabel", _label_scores(output), labels,
                reason=f"0/1 targets of the output's shape {tuple(output.shape)}")


def _what(obj: Any) -> str:
    return "None" if obj is None else type(obj).__name__


def select_output(output: Any, target: Any = None) -> Any:
    """The prediction tensor inside a model output: the tensor itself, ``logits`` (or the first
    float tensor) of a dict or Hugging Face style output, the first float tensor of a tuple
    (``(log_probs, hidden)`` from a recurrent model). None when there is none.

    Example:
        >>> import torch
        >>> out = (torch.zeros(4, 3), (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)))
        >>> select_output(out).shape
        torch.Size([4, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # a dict, or a Hugging Face ModelOutput
        if "logits" in output:
            return select_output(output["logits"], target)
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    return None


def accuracy(task: Task, output: torch.Tensor, target: torch.Tensor) -> float | None:
    """Fraction of correct predictions for a classification task, else None.

    Multiclass: argmax over the class dimension, ignored targets (-100) left out. Multilabel:
    each label thresholded at probability 0.5, every label counted.

    Example:
        >>> import torch
        >>> t = infer_task(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> accuracy(t, torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        0.5
    """
    counts = correct_counts(task, output, target)
    return None if counts is None else counts[0] / counts[1]


def correct_counts(task: Task, output: torch.Tensor,
                   target: torch.Tensor) -> tuple[int, int] | None:
    """``(correct, counted)`` predictions of a classification task (see :func:`accuracy`), to
    pool batches; None for other tasks or when every target is ignored.

    Example:
        >>> import torch
        >>> seg = torch.zeros(2, 3, 4, 4)
        >>> seg[:, 1] = 1.0  # class 1 everywhere
        >>> target = torch.ones(2, 4, 4, dtype=torch.long)
        >>> target[0, 0, 0] = 2
        >>> correct_counts(infer_task(seg, target), seg, target)
        (31, 32)
    """
    if task.kind == "multiclass":
        dim = task.class_dim if task.class_dim is not None else 1
        pred = output.detach().argmax(dim)
        tgt = (target.reshape(-1) if task.flattened else target).to(pred.device)
        keep = tgt != IGNORE_INDEX
        total = int(keep.sum())
        return None if total == 0 else (int((pred[keep] == tgt[keep]).sum()), total)
    if task.kind == "multilabel":
        probs = task.to_probabilities(output.detach()).reshape(target.shape)
        hits = (probs > 0.5).float() == target.to(probs.device).float()
        return int(hits.sum()), hits.numel()
    return None


def regression_references(target: torch.Tensor) -> tuple[float, float]:
    """``(mean(y^2), Var(y))``: the mean squared error of predicting 0 and of predicting the
    mean (population variance). A fresh network's outputs are near 0, so its initial MSE is about
    the first; a model that learned nothing but the mean reaches the second.

    Example:
        >>> import torch
        >>> regression_references(torch.tensor([1.0, 3.0]))
        (5.0, 1.0)
    """
    y = target.detach().double().reshape(-1)
    return float((y * y).mean()), float(y.var(unbiased=False)) if y.numel() > 1 else 0.0

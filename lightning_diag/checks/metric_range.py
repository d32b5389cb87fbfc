"""The training invariant about logged bounded metrics: an accuracy, precision, recall, F1,
AUROC, IoU, Dice or mAP within [0, 1] (or [0, 100] as a percentage; an accuracy that would be
a percentage far below chance while the loss falls is none).
``invariants.metric_out_of_range``; the callback
(:class:`~lightning_diag.callbacks.invariants.TrainingInvariants`) gathers the readings.

Example:
    >>> bound = metric_bound("val/acc_epoch")
    >>> bound.kind, bound.high
    ('accuracy', 1.0)
    >>> metric_bound("val_loss") is None
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_diag.batch import default_batch_to_target
from lightning_diag.checks.invariants import CHECK, invariant_code
from lightning_diag.findings import Finding, Severity

__all__ = ["BELOW_CHANCE", "LEARNED", "MetricBound", "check_metric_ranges", "known_classes",
           "label_counts", "metric_bound", "name_words"]

_SPLIT = re.compile(r"[/_.\-\s]+")


def name_words(name: str) -> list[str]:
    """The words of a logged name, lower case, split at ``/``, ``_``, ``.``, ``-`` and spaces.

    Example:
        >>> name_words("val/F1_macro-epoch")
        ['val', 'f1', 'macro', 'epoch']
    """
    return [w for w in _SPLIT.split(name.lower()) if w]


#: A word of a logged name -> the bounded quantity it names (values in [0, 1]).
_BOUNDED = {
    "acc": "accuracy", "accuracy": "accuracy", "top1": "accuracy", "top5": "accuracy",
    "acc1": "accuracy", "acc5": "accuracy", "precision": "precision", "prec": "precision",
    "recall": "recall", "sensitivity": "recall", "specificity": "specificity", "f1": "f1",
    "fbeta": "f1", "f1score": "f1", "auroc": "auroc", "auc": "auroc", "roc": "auroc",
    "iou": "iou", "miou": "iou", "jaccard": "iou", "dice": "dice", "map": "map", "ap": "map",
}
_AP = re.compile(r"^m?ap\d+$")  # ap50, map75
#: Words that make a bounded name something else: a loss, a count, a difference, a spread.
_UNBOUNDED = {"loss", "count", "counts", "num", "total", "sum", "gap", "diff", "delta", "minus",
              "change", "std", "var", "error", "err", "rank", "time", "lr"}
_PERCENT = {"pct", "percent", "percentage", "perc", "%"}


@dataclass(frozen=True)
class MetricBound:
    """A logged name read as a bounded metric.

    Attributes:
        kind: The quantity (``accuracy``, ``f1``, ...).
        high: 1.0, or 100.0 on the percent scale (the name says so, or you declared it).
    """

    kind: str
    high: float


def metric_bound(name: str, percent: Iterable[str] = ()) -> MetricBound | None:
    """The bound of a logged metric found by its name's words, or None for another metric.

    The name is split at ``/``, ``_``, ``.``, ``-`` and spaces; a word such as ``acc``,
    ``precision``, ``f1``, ``auroc``, ``iou``, ``dice`` or ``map`` makes it bounded unless a
    word such as ``loss``, ``count``, ``gap`` or ``std`` says it is something else. Names with
    ``pct``/``percent`` and those in ``percent`` are on the 0-100 scale.

    Example:
        >>> metric_bound("train_acc_pct").high, metric_bound("val/f1_macro").kind
        (100.0, 'f1')
        >>> metric_bound("train_minus_val_accuracy") is None  # a difference may be negative
        True
        >>> metric_bound("val_acc", percent=["val_acc"]).high
        100.0
    """
    words = [w.split("@")[0] for w in name_words(name)]  # recall@10: recall
    if any(w in _UNBOUNDED for w in words):
        return None
    kinds = [_BOUNDED.get(w, "map" if _AP.match(w) else None) for w in words]
    kind = next((k for k in kinds if k is not None), None)
    if kind is None:
        return None
    on_percent = name in percent or any(w in _PERCENT for w in words) or name.endswith("%")
    return MetricBound(kind, 100.0 if on_percent else 1.0)


#: A percentage reading below this share of chance (1 / classes), while the loss fell, is
#: not a percentage.
BELOW_CHANCE = 0.5
#: The training loss fell: its epoch mean at or below this share of the first steps' loss.
LEARNED = 0.9


def check_metric_ranges(readings: Mapping[str, Sequence[float]], percent: Iterable[str] = (),
                        classes: int | None = None, loss_ratio: float | None = None,
                        ) -> tuple[list[Finding], list[str]]:
    """``invariants.metric_out_of_range`` (WARN, one per metric) for bounded metrics logged
    outside their range; also the names read on the percent scale without saying so.

    A reading is out of range when it is below 0, infinite, above 100 (no scale explains it),
    or above 1 on a metric whose name does not say percent while a metric of the same kind
    logged by the run reads within [0, 1] (e.g. ``train_acc`` 0.93 and ``val_acc`` 29.4: one
    of them is on the wrong scale, or a sum). Above 1 with no such sibling: the metric is read
    as a percentage logged on purpose, unless it is an accuracy that, read so, stays far below
    chance (below :data:`BELOW_CHANCE` of ``100 / classes`` percent, the accuracy of a uniform
    guess) while the training loss fell (``loss_ratio``, its latest epoch mean over the first
    steps' loss, at or below :data:`LEARNED`): a 4-class accuracy that reads 2.8 is not 2.8%
    but a wrong divisor. NaN (a metric undefined on this data, e.g. AUROC on one class) is not
    judged.

    Args:
        readings: Every reading of each logged name.
        percent: Names on the 0-100 scale on purpose.
        classes: The number of classes of the labels (:func:`known_classes`), if known.
        loss_ratio: The training loss of the latest epoch over that of the first steps.

    Example:
        >>> found, percent = check_metric_ranges({"train_acc": [0.5, 0.9], "val_acc": [45.0]})
        >>> [(f.code, f.subject) for f in found], percent
        ([('invariants.metric_out_of_range', 'val_acc')], [])
        >>> check_metric_ranges({"val_acc": [12.5, 87.5]})
        ([], ['val_acc'])
        >>> [f.subject for f in check_metric_ranges({"val_acc": [2.4, 2.8]}, classes=4,
        ...                                         loss_ratio=0.7)[0]]
        ['val_acc']
    """
    percent = list(percent)
    bounds = {n: b for n in readings if (b := metric_bound(n, percent)) is not None}
    fraction_kinds = {b.kind for n, b in bounds.items()
                      if any(0.0 < v < 1.0 for v in readings[n])
                      and all(v <= 1.0 for v in readings[n] if not math.isnan(v))}
    found, read_as_percent = [], []
    for name, bound in bounds.items():
        values = [v for v in readings[name] if not math.isnan(v)]
        outside = [v for v in values if v < 0.0 or v > 100.0 or math.isinf(v)]
        why, high = "no scale explains it", 100.0
        if not outside and bound.high == 1.0 and any(v > 1.0 for v in values):
            below = _below_chance(bound, values, classes, loss_ratio)
            if bound.kind in fraction_kinds:
                outside = [v for v in values if v > 1.0]
                why, high = f"another {bound.kind} of this run reads within [0, 1]", 1.0
            elif below is not None:
                outside, why, high = [v for v in values if v > 1.0], below, 1.0
            else:
                read_as_percent.append(name)
        if not outside:
            continue
        worst = max(outside, key=lambda v: max(-v, v - bound.high))
        found.append(Finding(
            CHECK, invariant_code("metric_out_of_range"), Severity.WARN,
            f"`{name}` ({bound.kind}) was logged at {worst:.4g}, outside [0, {high:g}] "
            f"({why}); {len(outside)} of {len(values)} reading(s) outside.",
            advice="A bounded metric outside its range comes from its computation: a sum where "
                   "a mean was meant (`(pred == y).sum()` instead of `.float().mean()`), a "
                   "total never reset between epochs, or a wrong divisor. Percentages logged "
                   "on purpose: put `pct` in the name or pass "
                   "`TrainingInvariants(percent_metrics=[...])`.",
            value=worst, expected=(0.0, high), subject=name,
            details={"metric": name, "kind": bound.kind, "readings": list(values),
                     "classes": classes, "loss_ratio": loss_ratio}))
    return found, sorted(read_as_percent)


def _below_chance(bound: MetricBound, values: Sequence[float], classes: int | None,
                  loss_ratio: float | None) -> str | None:
    """Why an accuracy above 1 is no percentage: read so, it stays far below chance while the
    loss fell; None when that is not shown."""
    if bound.kind != "accuracy" or classes is None or classes < 2 or loss_ratio is None:
        return None
    chance = 100.0 / classes
    best = max(values)
    if loss_ratio > LEARNED or best >= BELOW_CHANCE * chance:
        return None
    return (f"read as a percentage, at most {best:.3g}%, far below the {chance:.3g}% of a "
            f"uniform guess among the {classes} classes of the labels, while the training loss "
            f"fell to {loss_ratio:.0%} of its first steps': not a percentage")


def label_counts(batch: Any) -> torch.Tensor | None:
    """How many samples of each class a batch holds, when its target is one integer class per
    sample (``batch[1]``, or a label key of a dict); else None.

    Example:
        >>> label_counts((torch.zeros(4, 2), torch.tensor([0, 2, 2, 1]))).tolist()
        [1, 1, 2]
        >>> label_counts((torch.zeros(4, 2), torch.zeros(4))) is None  # a regression target
        True
    """
    target = default_batch_to_target(batch)
    if not (isinstance(target, torch.Tensor) and target.dim() == 1 and target.numel()
            and not target.is_floating_point() and not target.is_complex()
            and target.dtype != torch.bool):
        return None
    target = target.detach()
    if bool((target < 0).any()):
        return None
    return torch.bincount(target.cpu())


def known_classes(counts: Sequence[torch.Tensor], min_count: int = 2) -> int | None:
    """The number of classes, when the labels of the batches read (their
    :func:`label_counts`) cover every class from 0 to the largest seen, each at least
    ``min_count`` times (no class seen once or never: few classes are likely left unseen);
    else None.

    Example:
        >>> known_classes([torch.tensor([12, 11, 13]), torch.tensor([12, 12, 11, 2])])
        4
        >>> known_classes([torch.tensor([40, 0, 30])]) is None  # class 1 never seen
        True
    """
    if not counts:
        return None
    size = max(len(c) for c in counts)
    total = sum(torch.nn.functional.pad(c, (0, size - len(c))) for c in counts)
    if size < 2 or not isinstance(total, torch.Tensor) or int(total.min()) < min_count:
        return None
    return size

"""The training invariant about logged bounded metrics: an accuracy, precision, recall, F1,
AUROC, IoU, Dice or mAP within [0, 1] (or [0, 100] as a percentage).
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

from lightning_diag.checks.invariants import CHECK, invariant_code
from lightning_diag.findings import Finding, Severity

__all__ = ["MetricBound", "check_metric_ranges", "metric_bound", "name_words"]

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


def check_metric_ranges(readings: Mapping[str, Sequence[float]],
                        percent: Iterable[str] = ()) -> tuple[list[Finding], list[str]]:
    """``invariants.metric_out_of_range`` (WARN, one per metric) for bounded metrics logged
    outside their range; also the names read on the percent scale without saying so.

    A reading is out of range when it is below 0, infinite, above 100 (no scale explains it),
    or above 1 on a metric whose name does not say percent while a metric of the same kind
    logged by the run reads within [0, 1] (e.g. ``train_acc`` 0.93 and ``val_acc`` 29.4: one
    of them is on the wrong scale, or a sum). Above 1 with no such sibling: the metric is read
    as a percentage logged on purpose. NaN (a metric undefined on this data, e.g. AUROC on
    one class) is not judged.

    Example:
        >>> found, percent = check_metric_ranges({"train_acc": [0.5, 0.9], "val_acc": [45.0]})
        >>> [(f.code, f.subject) for f in found], percent
        ([('invariants.metric_out_of_range', 'val_acc')], [])
        >>> check_metric_ranges({"val_acc": [12.5, 87.5]})
        ([], ['val_acc'])
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
        why = "no scale explains it"
        if not outside and bound.high == 1.0 and any(v > 1.0 for v in values):
            if bound.kind in fraction_kinds:
                outside = [v for v in values if v > 1.0]
                why = f"another {bound.kind} of this run reads within [0, 1]"
            else:
                read_as_percent.append(name)
        if not outside:
            continue
        worst = max(outside, key=lambda v: max(-v, v - bound.high))
        # the scale the metric is read on: the fraction scale when a sibling says so
        high = 1.0 if bound.kind in fraction_kinds and bound.high == 1.0 else 100.0
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
            details={"metric": name, "kind": bound.kind, "readings": list(values)}))
    return found, sorted(read_as_percent)

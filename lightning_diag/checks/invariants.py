"""The rules of the training invariants: each turns what a run showed into Findings, or into
nothing when the run is sound. No Trainer here; the callback
(:class:`~lightning_diag.callbacks.invariants.TrainingInvariants`) gathers the readings.

Codes (``invariants.<what>``): ``grad_not_zeroed``, ``param_not_in_optimizer``,
``param_not_updated``, ``eval_mode_in_training``, ``metric_out_of_range``,
``epoch_loss_inconsistent``, ``target_leak``; ``summary`` (INFO) says what was checked and what
stepped aside, and why.

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_diag.batch import TARGET_KEYS
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.invariants import collision_rate, target_matches

__all__ = [
    "CHECK", "EpochSteps", "GradWindow", "LeakEvidence", "MetricBound", "ModeLayer",
    "check_epoch_loss", "check_grad_window", "check_metric_ranges", "check_modes",
    "check_optimizer_coverage", "check_target_leak", "check_updates", "epoch_loss_names",
    "leak_counts", "matching_reductions", "metric_bound", "mode_layers", "strongest_leak",
]

CHECK = "TrainingInvariants"
_SLUG = "invariants"


def _code(what: str) -> str:
    return f"{_SLUG}.{what}"


def _short(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` names in backticks, then how many more."""
    shown = ", ".join(f"`{x}`" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# -- every trainable parameter in some optimizer -----------------------------------------------
def check_optimizer_coverage(with_grad: Sequence[str], without_grad: Sequence[str],
                             trainable: int) -> list[Finding]:
    """``invariants.param_not_in_optimizer`` (WARN) for trainable parameters (``requires_grad``)
    that receive a gradient, yet no optimizer holds them: they never change.

    Those without a gradient (unused, or used under ``torch.no_grad()`` like a frozen teacher)
    are harmless and not flagged; the summary names them.

    Example:
        >>> check_optimizer_coverage(["head.weight"], [], 6)[0].message[:60]
        '1 of 6 trainable parameter tensors get a gradient but no opt'
        >>> check_optimizer_coverage([], ["teacher.weight"], 6)
        []
    """
    if not with_grad:
        return []
    names = list(with_grad)
    return [Finding(
        CHECK, _code("param_not_in_optimizer"), Severity.WARN,
        f"{len(names)} of {trainable} trainable parameter tensors get a gradient but no "
        f"optimizer holds them, so they never change: {_short(names)}.",
        advice="Pass them to the optimizer in `configure_optimizers` (e.g. all of "
               "`self.parameters()`; a layer added or replaced after the optimizer was built "
               "is a new tensor). If they are frozen on purpose, call `requires_grad_(False)` "
               "on them: it says so and saves their backward pass.",
        value=float(len(names)), expected=(0.0, 0.0), details={"parameters": names})]


# -- gradients zeroed between optimizer steps --------------------------------------------------
@dataclass
class GradWindow:
    """What the backward passes between two steps of one optimizer found in one watched
    parameter's ``.grad`` before adding to it.

    Attributes:
        optimizer: The optimizer, in words (``"optimizer 0 (Adam)"``).
        param: The watched parameter's name.
        step: The optimizer step (of that optimizer) that closed the window.
        backwards: Backward passes that reached the parameter in the window.
        cleared: Whether one of them found no gradient (None or all zeros).
        carried_norm: The norm of the gradient the first of them found.
        proven: Whether that gradient was the previous step's gradient, unchanged or scaled
            down by clipping (:func:`~lightning_diag.functional.invariants.carried_over`).
    """

    optimizer: str
    param: str
    step: int
    backwards: int
    cleared: bool
    carried_norm: float
    proven: bool


def check_grad_window(w: GradWindow) -> Finding | None:
    """``invariants.grad_not_zeroed`` when no backward pass between two optimizer steps found
    the gradient cleared: the step used the sum of this window's gradients and every earlier
    one. FAIL when the gradient found is the previous step's own (proof that it piled up);
    WARN when it is something else never cleared.

    Gradient accumulation is sound here: the first backward after a step finds the gradient
    cleared, and the later ones add to it by design.

    Example:
        >>> w = GradWindow("optimizer 0 (SGD)", "net.1.bias", 3, 1, False, 0.42, True)
        >>> f = check_grad_window(w)
        >>> f.code, f.severity.value
        ('invariants.grad_not_zeroed', 'fail')
        >>> check_grad_window(GradWindow("optimizer 0 (SGD)", "b", 3, 2, True, 0.0, False))
    """
    if w.backwards == 0 or w.cleared:
        return None
    proof = ("it still held the previous step's gradient (as it was, or scaled down by "
             "clipping)" if w.proven else "it held a gradient that was never cleared")
    return Finding(
        CHECK, _code("grad_not_zeroed"), Severity.FAIL if w.proven else Severity.WARN,
        f"Gradients are not zeroed between optimizer steps: before step {w.step} of "
        f"{w.optimizer}, {w.backwards} backward pass(es) added to `{w.param}`'s gradient and "
        f"none found it cleared; {proof} (norm {w.carried_norm:.3g}, expected 0). Each step "
        "then follows the sum of every gradient so far.",
        advice="Call `optimizer.zero_grad()` once per optimizer step (before the backward pass, "
               "or after `optimizer.step()`). To accumulate gradients over k batches, zero them "
               "every k batches, or use `Trainer(accumulate_grad_batches=k)`.",
        value=w.carried_norm, expected=(0.0, 0.0), subject=w.optimizer,
        details={"optimizer": w.optimizer, "parameter": w.param, "backwards": w.backwards,
                 "previous_gradient": w.proven})


# -- trainable parameters change after optimizer.step -----------------------------------------
def check_updates(streaks: Mapping[str, int], patience: int, optimizer: str,
                  judged: int) -> Finding | None:
    """``invariants.param_not_updated`` (WARN) for parameters with a non-zero gradient that
    ``optimizer.step`` did not change on ``patience`` checked steps in a row.

    ``streaks`` maps each parameter to its run of checked steps where its step could have moved
    it (a learning rate large enough for float precision: a zero rate, a warm-up from 0 or a
    group frozen by ``lr=0`` is not judged) yet it stayed bit for bit the same; ``judged``:
    how many tensors that step could judge.

    Example:
        >>> check_updates({"net.0.weight": 2, "net.0.bias": 1}, 2, "optimizer 0 (MySGD)", 4).message
        '1 of 4 parameter tensors with a non-zero gradient did not change at all after \
optimizer 0 (MySGD) stepped, on 2 checked steps in a row: `net.0.weight`.'
    """
    stuck = sorted(name for name, n in streaks.items() if n >= patience)
    if not stuck:
        return None
    return Finding(
        CHECK, _code("param_not_updated"), Severity.WARN,
        f"{len(stuck)} of {judged} parameter tensors with a non-zero gradient did not change "
        f"at all after {optimizer} stepped, on {patience} checked steps in a row: "
        f"{_short(stuck)}.",
        advice="The optimizer holds them but does not update them: check a hand-written "
               "optimizer or update (`p = p - lr * g` rebinds a name instead of changing `p`; "
               "use `p.sub_(lr * g)` under `torch.no_grad()`), a weight reassigned after each "
               "step, and the parameter groups' settings.",
        value=float(len(stuck)), expected=(0.0, 0.0), subject=optimizer,
        details={"optimizer": optimizer, "parameters": stuck})


# -- the module in train mode inside training_step ---------------------------------------------
_DROPOUT = (nn.modules.dropout._DropoutNd,)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class ModeLayer:
    """A layer whose result depends on train/eval mode.

    Attributes:
        name: Its name in the module.
        dropout: True for dropout (a dropout layer, or attention/recurrent dropout); False for
            a normalization layer with running statistics.
        trained: Whether the part of the model it belongs to (its nearest ancestor with
            parameters) has a parameter that requires a gradient and is in an optimizer.
    """

    name: str
    dropout: bool
    trained: bool


def _mode_kind(module: nn.Module) -> bool | None:
    """True for dropout that acts, False for running statistics, None when mode is moot."""
    if isinstance(module, _DROPOUT):
        return True if float(getattr(module, "p", 0.0)) > 0.0 else None
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return True if float(getattr(module, "dropout", 0.0)) > 0.0 else None
    if isinstance(module, _NORM):
        return False if getattr(module, "track_running_stats", False) else None
    return None


def mode_layers(module: nn.Module, trained: set[int]) -> list[ModeLayer]:
    """Every layer of ``module`` whose result depends on the mode, and whether it belongs to a
    trained part: whether the nearest module above it with parameters has one in ``trained``
    (ids of the parameters that require a gradient and that an optimizer holds).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
        >>> [(l.name, l.dropout, l.trained) for l in mode_layers(net, {id(net[0].weight)})]
        [('1', True, True), ('2', False, True)]
        >>> mode_layers(net, set())[0].trained  # nothing in an optimizer: a frozen model
        False
    """
    modules = dict(module.named_modules())
    out = []
    for name, m in modules.items():
        kind = _mode_kind(m)
        if kind is None:
            continue
        owner = _owner(modules, name)
        out.append(ModeLayer(name, kind, any(id(p) in trained for p in owner.parameters())))
    return out


def _owner(modules: dict[str, nn.Module], name: str) -> nn.Module:
    """The nearest module above ``name`` that has parameters (the root at the top): the part
    of the model a layer serves, whatever its own parameters (a batch norm's frozen affine
    weights do not freeze the network around it)."""
    parts = name.split(".")[:-1] if name else []
    while parts:
        candidate = modules[".".join(parts)]
        if next(candidate.parameters(), None) is not None:
            return candidate
        parts.pop()
    return modules[""]


def check_modes(module: nn.Module, layers: Sequence[ModeLayer], seen_training: set[str],
                modules: Mapping[str, nn.Module] | None = None) -> Finding | None:
    """``invariants.eval_mode_in_training`` (WARN): the trained part of the model behaves as in
    evaluation while it trains.

    Flagged: the module itself in eval mode while a layer of its trained part is too (a
    ``self.eval()`` never undone); or dropout of the trained part in eval mode after it was
    seen in train mode (``seen_training``: layers seen in train mode at earlier checks; updated
    here). Not flagged: a frozen part in eval mode (no parameter it owns is trained: a teacher,
    a frozen backbone), normalization layers kept in eval mode inside a module in train mode
    (frozen batch-norm statistics, e.g. ``norm_eval`` in detection models), and dropout kept in
    eval mode from the first step on (a deliberate choice). ``modules``: ``module``'s
    ``named_modules()`` as a dict, when the caller keeps one.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        >>> layers = mode_layers(net, {id(net[0].weight)})
        >>> check_modes(net, layers, set()) is None
        True
        >>> _ = net.eval()
        >>> check_modes(net, layers, set()).message[:48]
        'The module is in eval mode inside training_step:'
    """
    trained = [layer for layer in layers if layer.trained]
    modules = dict(module.named_modules()) if modules is None else modules
    evaluating = [layer for layer in trained if not modules[layer.name].training]
    seen_training.update(layer.name for layer in trained if modules[layer.name].training)
    if not evaluating:
        return None
    names = [layer.name for layer in evaluating]
    if not module.training:
        what = (f"The module is in eval mode inside training_step: {len(names)} dropout or "
                f"normalization layer(s) of its trained part act as in evaluation "
                f"({_short(names)})")
    else:
        switched = [layer.name for layer in evaluating
                    if layer.dropout and layer.name in seen_training]
        if not switched:
            return None
        names = switched
        what = (f"{len(names)} dropout layer(s) of the trained part switched to eval mode "
                f"during training ({_short(names)}), after they were seen in train mode")
    return Finding(
        CHECK, _code("eval_mode_in_training"), Severity.WARN,
        f"{what}: dropout is off and batch norm uses its running statistics, so the model "
        "trains differently from what you wrote (expected: train mode).",
        advice="Put the module back in train mode after evaluating inside training code "
               "(`self.train()` after `self.eval()`, e.g. in `on_train_epoch_end` or a sampling "
               "routine). To freeze a part on purpose, freeze its parameters too "
               "(`requires_grad_(False)`).",
        value=float(len(names)), expected=(0.0, 0.0), details={"layers": names,
                                                               "module_training": module.training})


# -- bounded metrics within their range --------------------------------------------------------
_SPLIT = re.compile(r"[/_.\-\s]+")
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
    words = [w.split("@")[0] for w in _SPLIT.split(name.lower()) if w]  # recall@10: recall
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
            CHECK, _code("metric_out_of_range"), Severity.WARN,
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


# -- a logged epoch loss consistent with its step losses ---------------------------------------
@dataclass(frozen=True)
class EpochSteps:
    """The loss each training step returned, summed over one epoch.

    Attributes:
        epoch: The epoch.
        weighted: Sum of loss x batch size.
        plain: Sum of the losses.
        samples: Sum of the batch sizes.
        steps: Number of steps.
    """

    epoch: int
    weighted: float
    plain: float
    samples: float
    steps: int

    def reductions(self) -> dict[str, float]:
        """The epoch loss under each reduction a user or Lightning may apply.

        Example:
            >>> EpochSteps(0, weighted=10.0, plain=3.0, samples=6, steps=2).reductions()
            {'mean': 1.6666666666666667, 'batch_mean': 1.5, 'sum': 3.0}
        """
        return {"mean": self.weighted / self.samples, "batch_mean": self.plain / self.steps,
                "sum": self.plain}


_RTOL = 1e-3
#: Words of a logged name that make a loss something other than the training loss.
_NOT_TRAIN = {"val", "valid", "validation", "test", "eval", "dev", "step"}


def epoch_loss_names(names: Iterable[str]) -> list[str]:
    """The logged names that may hold a training loss per epoch.

    Example:
        >>> epoch_loss_names(["train_loss", "train_loss_step", "val_loss", "epoch_loss", "acc"])
        ['train_loss', 'epoch_loss']
    """
    out = []
    for name in names:
        words = [w for w in _SPLIT.split(name.lower()) if w]
        if "loss" in words and not any(w in _NOT_TRAIN for w in words):
            out.append(name)
    return out


def matching_reductions(logged: float, steps: EpochSteps) -> list[str]:
    """The reductions of ``steps`` that ``logged`` equals (relative tolerance 1e-3).

    Example:
        >>> matching_reductions(1.5, EpochSteps(0, 10.0, 3.0, 6, 2))
        ['batch_mean']
    """
    return [k for k, v in steps.reductions().items()
            if math.isclose(logged, v, rel_tol=_RTOL, abs_tol=1e-7)]


def _signature(logged: float, history: Sequence[EpochSteps], reduction: str) -> str | None:
    """The known bug whose value ``logged`` equals: a running total that was never reset."""
    s = history[-1]
    every = EpochSteps(s.epoch, sum(h.weighted for h in history), sum(h.plain for h in history),
                       sum(h.samples for h in history), sum(h.steps for h in history))
    candidates = {
        "sum_not_reset": {"mean": every.weighted / s.samples, "batch_mean": every.plain / s.steps,
                          "sum": every.plain}[reduction],
        "count_not_reset": {"mean": s.weighted / every.samples,
                            "batch_mean": s.plain / every.steps, "sum": s.plain}[reduction],
        "neither_reset": every.reductions()[reduction],
    }
    current = s.reductions()[reduction]
    for name, value in candidates.items():
        if not math.isclose(value, current, rel_tol=10 * _RTOL) and math.isclose(
                logged, value, rel_tol=_RTOL, abs_tol=1e-7):
            return name
    return None


_SIGNATURES = {
    "sum_not_reset": "the sum of the step losses of every epoch so far over this epoch's "
                     "count: a running sum never reset at the start of an epoch",
    "count_not_reset": "this epoch's sum over the count of every epoch so far: a step count "
                       "never reset at the start of an epoch",
    "neither_reset": "the mean over every epoch so far: a running sum and count never reset",
}


def check_epoch_loss(name: str, logged: Sequence[float], history: Sequence[EpochSteps],
                     reductions: Sequence[str], drift: float = 0.25) -> Finding | None:
    """``invariants.epoch_loss_inconsistent`` (WARN): a logged epoch loss that no longer agrees
    with the losses its steps returned.

    ``logged[i]`` is the value logged for the epoch of ``history[i]``; ``reductions`` are those
    the first epoch's value matched (:func:`matching_reductions`: the mean weighted by batch
    size as Lightning reduces, the plain mean over batches, or the sum for
    ``reduce_fx="sum"``), so the name is known to hold this loss. The latest epoch is flagged
    when its value equals a running total never reset (:data:`_SIGNATURES`), or when it is off
    by more than ``drift`` (relative) and moved against its step losses (rose while they fell,
    or fell while they rose).

    Example:
        >>> h = [EpochSteps(0, 20.0, 2.0, 20, 2), EpochSteps(1, 10.0, 1.0, 20, 2)]
        >>> check_epoch_loss("epoch_loss", [1.0, 1.5], h, ["mean", "batch_mean"]).message[:60]
        '`epoch_loss` logged 1.5 for epoch 1, but its steps returned '
    """
    if len(logged) < 2 or len(history) < 2 or not reductions:
        return None
    value, s = logged[-1], history[-1]
    refs = s.reductions()
    if any(math.isclose(value, refs[r], rel_tol=_RTOL, abs_tol=1e-7) for r in reductions):
        return None
    found = [(r, c) for r in reductions if (c := _signature(value, history, r)) is not None]
    reduction, cause = found[0] if found else (reductions[0], None)
    ref = refs[reduction]
    if cause is None:
        before_ref = history[-2].reductions()[reduction]
        against = (value - logged[-2]) * (ref - before_ref) < 0
        if not (against and abs(value - ref) > drift * abs(ref)):
            return None
        reason = (f"it {'rose' if value > logged[-2] else 'fell'} from {logged[-2]:.4g} while "
                  f"they went from {before_ref:.4g} to {ref:.4g}")
    else:
        reason = f"it equals {_SIGNATURES[cause]}"
    return Finding(
        CHECK, _code("epoch_loss_inconsistent"), Severity.WARN,
        f"`{name}` logged {value:.4g} for epoch {s.epoch}, but its steps returned a {reduction} "
        f"of {ref:.4g} (expected within {_RTOL:g} of it, as at epoch {history[0].epoch}); "
        f"{reason}.",
        advice="Reset the running totals behind this epoch loss at the start of every epoch "
               "(in `on_train_epoch_start`), or log the step loss with "
               "`self.log(name, loss, on_epoch=True)` and let Lightning average it.",
        value=value, expected=(ref * (1 - _RTOL), ref * (1 + _RTOL)), subject=name,
        epoch=s.epoch, details={"metric": name, "reduction": reduction, "cause": cause or "drift",
                 "logged": list(logged), "steps": [h.reductions()[reduction] for h in history]})


# -- a target leak through a shifted input -----------------------------------------------------
@dataclass
class LeakEvidence:
    """Where a batch's input holds the target itself.

    Attributes:
        input: Which input (``"batch[0]"``, ``"input_ids"``).
        lag: 0: at the target's own position; 1: one position earlier.
        matches: Target positions equal to the input there.
        compared: Target positions compared.
        chance: The share an unrelated input drawn alike would match
            (:func:`~lightning_diag.functional.invariants.collision_rate`).
    """

    input: str
    lag: int
    matches: int
    compared: int
    chance: float
    batches: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.matches / self.compared if self.compared else 0.0


def check_target_leak(evidence: LeakEvidence | None, initial: float, reached: float,
                      source: str, epoch: int, fraction: float) -> Finding | None:
    """``invariants.target_leak`` (WARN): the input holds the target at the position the model
    predicts it from, and the loss collapsed in the first epochs.

    Both are required. The first alone also describes a model that reconstructs its input
    (an autoencoder, a copy task); the second alone describes an easy task (digits reach 0.97
    accuracy in one epoch) or a memorizable dataset. Together: the output predicts the target
    far better than a model that has to learn it could so early.

    Args:
        evidence: Every target position equal to the input at lag 0 or 1, where chance would
            match few; None when the inputs do not hold the target.
        initial: The loss of the first steps.
        reached: The loss at the end of epoch ``epoch`` (``source`` says which).
        fraction: ``reached / initial`` at or below which the loss collapsed.

    Example:
        >>> e = LeakEvidence("batch[0]", 0, 640, 640, 0.06)
        >>> check_target_leak(e, 2.77, 0.004, "val_loss", 0, 0.05).code
        'invariants.target_leak'
        >>> check_target_leak(e, 2.77, 1.9, "val_loss", 0, 0.05) is None  # not exploited
        True
    """
    if evidence is None or not (initial > 0 and math.isfinite(reached)):
        return None
    ratio = reached / initial
    if ratio > fraction:
        return None
    where = ("at the position of the target itself" if evidence.lag == 0
             else "one position before the target, which a causal model sees")
    return Finding(
        CHECK, _code("target_leak"), Severity.WARN,
        f"The input holds the target: {evidence.matches} of {evidence.compared} target values "
        f"equal `{evidence.input}` {where} (chance: {evidence.chance:.0%}), and the loss fell "
        f"to {ratio:.2%} of its initial value ({reached:.3g} by `{source}` at epoch {epoch}, "
        f"from {initial:.3g}; a model that learns the task is not expected below "
        f"{fraction:.0%} this early): the output predicts the target far better than the "
        "data allows.",
        advice="Feed the model what precedes the target: for next-token prediction the input "
               "is `x[:, :-1]` and the target `x[:, 1:]`; check the shift in the dataset or "
               "the collate function. If reconstructing the input is the task (an autoencoder), "
               "ignore this finding.",
        value=ratio, expected=(fraction, 1.0), epoch=epoch,
        details={"input": evidence.input, "lag": evidence.lag, "share": evidence.share,
                 "chance": evidence.chance, "initial_loss": initial, "loss": reached,
                 "source": source, "batches": evidence.batches})


#: The input holds the target when at least this share of target values equals it...
LEAK_SHARE = 0.99
#: ...where an unrelated input drawn alike would match at most this share.
LEAK_CHANCE = 0.5


def _integer(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and not value.is_floating_point()
            and not value.is_complex() and value.dtype != torch.bool)


def _candidates(batch: Any) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]],
                                     tuple[int, ...]]:
    """The target of ``batch``, its other integer tensors, and the lags at which one of them
    holding the target is a leak."""
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            return None, [], ()
        others = [(str(k), v) for k, v in batch.items() if k != key and _integer(v)]
        # Hugging Face's causal-LM convention: `labels` is a copy of `input_ids` and the model
        # shifts inside, so lag 0 is the honest pairing; one position earlier still leaks.
        hf = key == "labels" and "input_ids" in batch
        return batch[key], others, (1,) if hf else (0, 1)
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        others = [(f"batch[{i}]", v) for i, v in enumerate(batch) if i != 1 and _integer(v)]
        return batch[1], others, (0, 1)
    return None, [], ()


def leak_counts(batch: Any) -> list[LeakEvidence]:
    """For each integer input of ``batch`` shaped like its integer target, and each lag at
    which the input holding the target leaks it: how many target values it holds.

    Lag 1 only for sequences (two dimensions or more); an index or a label id among the inputs
    of a 1-D target is compared at lag 0.

    Example:
        >>> seq = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
        >>> [(e.input, e.lag, e.matches, e.compared) for e in leak_counts((seq[:, 1:], seq[:, 1:]))]
        [('batch[0]', 0, 10, 10), ('batch[0]', 1, 0, 8)]
    """
    target, others, lags = _candidates(batch)
    if not isinstance(target, torch.Tensor) or not _integer(target):
        return []
    usable = lags if target.dim() >= 2 else tuple(lag for lag in lags if lag == 0)
    out = []
    for name, tensor in others:
        if tensor is target or tensor.shape != target.shape:
            continue
        chance = collision_rate(target)
        for lag in usable:
            matches, compared = target_matches(tensor, target, lag)
            if compared:
                out.append(LeakEvidence(name, lag, matches, compared, chance))
    return out


def strongest_leak(evidence: Iterable[LeakEvidence]) -> LeakEvidence | None:
    """The input and lag holding the target in at least :data:`LEAK_SHARE` of its values where
    chance matches at most :data:`LEAK_CHANCE`, or None.

    Example:
        >>> found = [LeakEvidence("x", 0, 99, 100, 0.1), LeakEvidence("x", 1, 3, 100, 0.1)]
        >>> strongest_leak(found).lag
        0
        >>> strongest_leak([LeakEvidence("x", 0, 100, 100, 0.9)]) is None  # one class: chance
        True
    """
    strong = [e for e in evidence if e.share >= LEAK_SHARE and e.chance <= LEAK_CHANCE]
    return max(strong, key=lambda e: e.share, default=None)

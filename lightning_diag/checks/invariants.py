"""The rules of the training invariants about the optimization loop: every trainable
parameter in an optimizer, gradients zeroed between steps, parameters that a step moves, the
module in train mode. Each turns what a run showed into Findings, or into nothing when the run
is sound. No Trainer here; the callback
(:class:`~lightning_diag.callbacks.invariants.TrainingInvariants`) gathers the readings.

The other rules of the callback: :mod:`lightning_diag.checks.metric_range` (bounded metrics
within their range), :mod:`lightning_diag.checks.epoch_loss` (an epoch loss consistent with
its steps), :mod:`lightning_diag.checks.target_leak` (the input holds the target).

Codes (``invariants.<what>``): ``grad_not_zeroed``, ``param_not_in_optimizer``,
``param_not_updated``, ``eval_mode_in_training`` here; ``metric_out_of_range``,
``epoch_loss_inconsistent``, ``target_leak`` in the modules above; ``summary`` (INFO, the
callback's) says what was checked and what stepped aside, and why.

Example:
    >>> check_grad_window(GradWindow("optimizer 0 (SGD)", "b", 3, 2, True, 0.0, False)) is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_diag.findings import Finding, Severity

__all__ = [
    "CHECK", "GradWindow", "ModeLayer", "check_grad_window", "check_modes",
    "check_optimizer_coverage", "check_updates", "invariant_code", "mode_layers",
]

CHECK = "TrainingInvariants"
_SLUG = "invariants"


def invariant_code(what: str) -> str:
    """The finding code of an invariant: ``invariants.<what>``.

    Example:
        >>> invariant_code("target_leak")
        'invariants.target_leak'
    """
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
        CHECK, invariant_code("param_not_in_optimizer"), Severity.WARN,
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
        CHECK, invariant_code("grad_not_zeroed"), Severity.FAIL if w.proven else Severity.WARN,
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
        CHECK, invariant_code("param_not_updated"), Severity.WARN,
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
        CHECK, invariant_code("eval_mode_in_training"), Severity.WARN,
        f"{what}: dropout is off and batch norm uses its running statistics, so the model "
        "trains differently from what you wrote (expected: train mode).",
        advice="Put the module back in train mode after evaluating inside training code "
               "(`self.train()` after `self.eval()`, e.g. in `on_train_epoch_end` or a sampling "
               "routine). To freeze a part on purpose, freeze its parameters too "
               "(`requires_grad_(False)`).",
        value=float(len(names)), expected=(0.0, 0.0), details={"layers": names,
                                                               "module_training": module.training})

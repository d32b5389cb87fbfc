"""What :class:`~lightning_diag.callbacks.invariants.TrainingInvariants` watches at the checked
steps of each optimizer: whether the backward passes between two steps found the gradient
cleared (a missing ``zero_grad``), and whether the step moved the weights it could move.

Small device ops inside the user's step; host copies only when a window closes or a checked
step is compared. The rules themselves are :mod:`lightning_diag.checks.invariants`'.

Example:
    >>> from lightning_diag.hooks import HookRegistry
    >>> steps = OptimizerSteps(HookRegistry(), patience=2, counts={}, aside={})
    >>> steps.watches, steps.streaks
    ({}, {})
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from lightning_diag.checks.invariants import GradWindow, check_grad_window, check_updates
from lightning_diag.findings import Finding
from lightning_diag.functional.invariants import carried_over, movable, moved
from lightning_diag.hooks import HookRegistry

__all__ = ["OptimizerSteps", "Watch"]


@dataclass
class Watch:
    """One optimizer: its step count and the parameter whose gradient is watched."""

    label: str
    count: int = 0
    name: str = ""
    param: torch.Tensor | None = None
    armed: bool = False
    previous: torch.Tensor | None = None  # the watched gradient at the last armed step
    first: torch.Tensor | None = None  # what the first backward after it found
    later: list[torch.Tensor] = field(default_factory=list)  # nonzero counts found after
    backwards: int = 0
    cleared: bool = False
    step: int = 0


@dataclass
class _Pending:
    """Weights copied before a checked optimizer step, compared after it."""

    watch: Watch
    names: list[str]
    params: list[torch.Tensor]
    before: list[torch.Tensor]
    judged: int


class OptimizerSteps:
    """The gradient windows and the update checks of every optimizer of a fit.

    Args:
        hooks: The callback's hook registry (the gradient hooks go there).
        patience: Checked steps in a row a parameter must stay unchanged to be flagged.
        counts: The callback's count of what each check looked at (updated here).
        aside: The callback's reasons a check stepped aside (set here).
    """

    def __init__(self, hooks: HookRegistry, patience: int, counts: dict[str, int],
                 aside: dict[str, str]) -> None:
        self.hooks, self.patience = hooks, patience
        self.counts, self.aside = counts, aside
        self.names: dict[int, str] = {}  # id(parameter) -> its name
        self.watches: dict[int, Watch] = {}
        self.pending: list[_Pending] = []
        self.streaks: dict[str, dict[str, int]] = {}

    # -- gradients zeroed between steps ------------------------------------------------------
    def open_window(self, watch: Watch, optimizer: torch.optim.Optimizer) -> None:
        if watch.param is None:
            self._choose(watch, optimizer)
        if watch.param is None or watch.param.grad is None:
            return
        watch.previous = watch.param.grad.detach().clone()
        watch.first, watch.later, watch.backwards, watch.cleared = None, [], 0, False
        watch.step, watch.armed = watch.count + 1, True

    def _choose(self, watch: Watch, optimizer: torch.optim.Optimizer) -> None:
        """Watch the smallest parameter with a non-zero, finite, dense gradient."""
        candidates = sorted((p for g in optimizer.param_groups for p in g["params"]
                             if p.requires_grad and p.grad is not None and not p.grad.is_sparse),
                            key=lambda p: p.numel())
        for p in candidates[:8]:
            g = p.grad
            if g is not None and bool(torch.isfinite(g).all()) and bool(g.count_nonzero()):
                watch.param, watch.name = p, self.names.get(id(p), "a parameter")
                self.hooks.tensor(p, functools.partial(self._on_backward, watch))
                return
        self.aside.setdefault("grad_not_zeroed", "no parameter with a non-zero gradient to "
                              "watch yet")

    @staticmethod
    def _on_backward(watch: Watch, grad: torch.Tensor) -> None:
        """Inside the user's backward pass: what the watched parameter's gradient holds before
        this pass adds to it. Small device ops only, read at the next step."""
        if not watch.armed or watch.param is None:
            return
        watch.backwards += 1
        found = watch.param.grad
        if found is None:
            watch.cleared = True
        elif watch.first is None:
            watch.first = found.detach().clone()
        else:
            watch.later.append(torch.count_nonzero(found))

    def close_window(self, watch: Watch) -> Finding | None:
        watch.armed = False
        if watch.backwards == 0 or watch.previous is None:
            return None
        self.counts["grad_not_zeroed"] += 1
        first = watch.first
        cleared = watch.cleared or (first is not None and not bool(first.count_nonzero())) or any(
            int(n) == 0 for n in watch.later)
        norm = 0.0 if first is None else float(first.double().norm())
        proven = (not cleared and first is not None
                  and carried_over(first, watch.previous))
        found = check_grad_window(GradWindow(watch.label, watch.name, watch.step,
                                             watch.backwards, cleared, norm, proven))
        watch.first, watch.later, watch.previous = None, [], None
        return found

    # -- parameters change after optimizer.step ----------------------------------------------
    def snapshot(self, watch: Watch, optimizer: torch.optim.Optimizer) -> None:
        params, lrs = [], []
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if not isinstance(lr, (float, int, torch.Tensor)):
                continue
            for p in group["params"]:
                if p.requires_grad and p.grad is not None and not p.grad.is_sparse and p.numel():
                    params.append(p)
                    lrs.append(float(lr))
        if not params:
            return
        grads = [p.grad for p in params]
        # the 2-norm: non-finite with any non-finite element, 0 with no element above ~1e-19
        gnorm = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        able = movable([p.detach() for p in params], grads, lrs)  # type: ignore[arg-type]
        flags = torch.stack([gnorm.isfinite().all().expand(len(params)), gnorm > 0, able]).cpu()
        finite, nonzero, can_move = (row.tolist() for row in flags)
        if not all(finite):  # a step AMP's scaler skips, or a divergence: not judged
            return
        keep = [i for i in range(len(params)) if nonzero[i] and can_move[i]]
        if not keep:
            self.aside.setdefault("param_not_updated", "no parameter whose step can move it "
                                  "(learning rate 0 or below float precision)")
            return
        chosen = [params[i] for i in keep]
        before = list(torch._foreach_mul([p.detach() for p in chosen], 1.0))
        self.pending.append(_Pending(watch, [self.names.get(id(p), "?") for p in chosen],
                                     chosen, before, len(chosen)))

    def compare(self) -> list[Finding]:
        """The checked steps' weights after the step against before it."""
        pending, self.pending = self.pending, []
        found = []
        for item in pending:
            changed = moved(item.before, [p.detach() for p in item.params]).tolist()
            still = [i for i, c in enumerate(changed) if not c]
            # weights clamped after the step (WGAN clipping) stay at the bound: not judged
            still = [i for i in still if not _at_a_bound(item.params[i])]
            self.counts["param_not_updated"] += 1
            streaks = self.streaks.setdefault(item.watch.label, {})
            stuck = {item.names[i] for i in still}
            for name in item.names:
                streaks[name] = streaks.get(name, 0) + 1 if name in stuck else 0
            f = check_updates(streaks, self.patience, item.watch.label, item.judged)
            if f is not None:
                found.append(f)
        return found

    def release(self) -> None:
        """Drop what refers to the model's tensors: nothing is kept past the fit."""
        self.pending = []
        for watch in self.watches.values():
            watch.armed, watch.param, watch.previous, watch.first = False, None, None, None
            watch.later = []


def _at_a_bound(p: torch.Tensor) -> bool:
    """Whether several elements sit exactly at the tensor's largest magnitude: a clamp bound
    (weights drawn at random never tie)."""
    a = p.detach().abs()
    return bool((a == a.max()).sum() >= 2)

"""The user's own loss at reference outputs: the prediction replaced inside the user's step.

The initial-loss and overfit checks need the loss a network *would* have: one that knows
nothing (small weights: zero logits, uniform probabilities, zero values), one that memorized its
sample, one that predicts the same thing for every input. Rather than a rule per loss function,
they run the user's own ``training_step`` with the model's prediction replaced, through forward
hooks on the modules that made it, by that reference output: every term of the loss (auxiliary
heads, distillation, label smoothing, class weights, a contrastive or a likelihood loss) then
counts as the user wrote it.

**What the prediction is.** :class:`PredictionRecorder` watches one step. A call can hold a
prediction when its module has trainable parameters and its output holds float tensors that
require a gradient (a frozen teacher, a call under ``no_grad``, a metric or a loss module
cannot). Among those, at the outermost depth (the module itself when the step calls
``self(x)``, else the outermost submodules it called, every call: the two views of a siamese
encoder), the predictions are the float tensors the step's loss depends on (every head of a
multi-output model; not a recurrent state kept for the next batch) and no other of them is
computed from (an encoder's features that a head called next turns into logits are not). A
call returning a scalar the loss depends on computes the loss itself (a Hugging Face model
given its labels): the predictions are then looked for among the calls inside it.

Example:
    >>> import torch, lightning.pytorch as pl
    >>> import torch.nn.functional as F
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(4, 3)
    ...     def training_step(self, batch, batch_idx):
    ...         return F.cross_entropy(self.net(batch[0]), batch[1], label_smoothing=0.1)
    >>> net, batch = Net(), (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> loss, (pred,), _ = record_predictions(net, batch)
    >>> pred.name, pred.form.activation
    ('net output', 'none')
    >>> with Substitution([pred], lambda j, out: pred.form.know_nothing(out)) as sub:
    ...     round(float(sub.step(net, batch)), 4)  # log 3, whatever the smoothing
    1.0986
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_diag.batch import step_loss
from lightning_diag.functional.output_form import OutputForm, output_form

__all__ = ["Prediction", "PredictionRecorder", "PredictionTap", "Replay", "ReplayMiss",
           "Substitution", "main_prediction", "record_predictions"]

#: How deep a prediction tensor may sit inside an output's tuples, lists and dicts.
_MAX_DEPTH = 4
Path = tuple[Any, ...]
#: ``replace(j, actual)``: the tensor to put in place of prediction ``j`` (None: keep it).
Replace = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Prediction:
    """One tensor the trained model predicted in the step.

    Attributes:
        module: The module whose call returned it.
        call: Which call of that module in the step (0 for the first).
        path: Where the tensor sits inside that call's output (``()`` for the output itself).
        form: Its last activation (:func:`~lightning_diag.functional.output_form.output_form`).
        name: For messages, e.g. ``"output[1]"`` or ``"encoder output (call 2)"``.
        shape: Its shape in the recorded step.
        inputs: The tensors the call was given, in the recorded step (detached).
    """

    module: nn.Module
    call: int
    path: Path
    form: OutputForm
    name: str
    shape: tuple[int, ...]
    inputs: tuple[torch.Tensor, ...] = ()


def _leaves(obj: Any, path: Path = (), depth: int = 0,
            floats: bool = True) -> Iterator[tuple[Path, torch.Tensor]]:
    """The float tensors (every tensor when not ``floats``) inside an output, with their
    paths."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or not floats:
            yield path, obj
    elif depth < _MAX_DEPTH and isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _leaves(value, (*path, key), depth + 1, floats)
    elif depth < _MAX_DEPTH and isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, (*path, i), depth + 1, floats)


def _replaced(obj: Any, new: dict[Path, torch.Tensor], path: Path = ()) -> Any:
    """``obj`` with the tensors at the paths of ``new`` replaced, its structure kept."""
    if path in new:
        return new[path]
    if not any(p[:len(path)] == path for p in new):
        return obj
    if isinstance(obj, Mapping):
        out = obj.copy() if hasattr(obj, "copy") else dict(obj)
        for key in obj:
            out[key] = _replaced(obj[key], new, (*path, key))
        return out
    items = [_replaced(v, new, (*path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*items)
    return type(obj)(items)


def _path_text(path: Path) -> str:
    return "".join(f"[{p!r}]" for p in path)


class PredictionRecorder:
    """Records every module call of the steps run inside it (forward hooks, removed on exit)
    and tells the predictions among them (see the module docstring)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._names = {id(m): name for name, m in root.named_modules()}
        self._trainable = {id(m): any(p.requires_grad for p in m.parameters())
                           for m in root.modules()}
        self._handles: list[Any] = []
        self._calls: list[tuple[nn.Module, int, Any, Any]] = []
        self._counts: dict[int, int] = {}

    def __enter__(self) -> PredictionRecorder:
        for m in self.root.modules():
            self._handles.append(m.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        k = self._counts.get(id(module), 0)
        self._counts[id(module)] = k + 1
        self._calls.append((module, k, args, output))

    def clear(self) -> None:
        """Forget what was recorded (call between steps)."""
        self._calls.clear()
        self._counts.clear()

    def predictions(self, loss: torch.Tensor) -> tuple[list[Prediction], list[torch.Tensor]]:
        """The predictions of the last step, whose loss is ``loss`` (still attached to its
        graph), in call order, and the tensors themselves; empty when there are none."""
        eligible = [(m, k, args, out) for m, k, args, out in self._calls
                    if self._trainable.get(id(m)) and any(t.requires_grad for _, t in _leaves(out))]
        if not loss.requires_grad:
            return [], []
        while eligible:
            depth = {id(m): self._depth(m) for m, *_ in eligible}
            top = min(depth.values())
            calls = [call for call in eligible if depth[id(call[0])] == top]
            # A call returning a scalar the loss depends on computes the loss itself (a Hugging
            # Face model given its labels): its predictions are those of the calls inside it.
            inner = [c for c in calls if _computes_loss(loss, c[3])]
            if not inner:
                break
            eligible = [c for c in eligible if c not in inner]
        if not eligible:
            return [], []
        leaves = [(m, k, args, path, t) for m, k, args, out in calls
                  for path, t in _leaves(out) if t.requires_grad and t.dim() > 0]
        keep = _final(loss, [t for *_, t in leaves])
        leaves = [leaf for leaf, kept in zip(leaves, keep, strict=True) if kept]
        several = len({(id(m), k) for m, k, *_ in leaves}) > 1
        found, tensors = [], []
        for m, k, args, path, tensor in leaves:
            module = self._names.get(id(m))
            name = (f"{module} output" if module else "output") + _path_text(path) + (
                f" (call {k + 1})" if several else "")
            inputs = tuple(t.detach() for _, t in _leaves(args, floats=False))
            found.append(Prediction(m, k, path, output_form(tensor), name, tuple(tensor.shape),
                                    inputs))
            tensors.append(tensor)
        return found, tensors

    def _depth(self, module: nn.Module) -> int:
        name = self._names.get(id(module))
        return 1 << 30 if name is None else (name.count(".") + 1 if name else 0)


def _computes_loss(loss: torch.Tensor, output: Any) -> bool:
    """The output holds a scalar the loss depends on (the loss, computed inside the call)."""
    scalars = [t for _, t in _leaves(output) if t.requires_grad and t.dim() == 0]
    if not scalars:
        return False
    if any(t is loss for t in scalars):
        return True
    try:
        grads = torch.autograd.grad(loss, scalars, retain_graph=True, allow_unused=True)
    except RuntimeError:
        return False
    return any(g is not None for g in grads)


def _final(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[bool]:
    """Which of ``tensors`` the loss depends on and no other of them is computed from."""
    if not tensors:
        return []
    try:
        used = [g is not None for g in torch.autograd.grad(loss, tensors, retain_graph=True,
                                                           allow_unused=True)]
        for i, t in enumerate(tensors):
            for j, later in enumerate(tensors):
                if i != j and used[i] and used[j] and later is not t and torch.autograd.grad(
                        later, t, torch.ones_like(later), retain_graph=True,
                        allow_unused=True)[0] is not None:
                    used[i] = False  # an intermediate: a prediction is computed from it
                    break
    except RuntimeError:  # an operation without a backward: every tensor stays a prediction
        return [True] * len(tensors)
    return used


def record_predictions(module: pl.LightningModule, batch: Any, batch_idx: int = 0,
                       ) -> tuple[torch.Tensor, list[Prediction], list[torch.Tensor]]:
    """Run the user's ``training_step`` on ``batch`` with gradients enabled (so that an
    activation can be read from the autograd history, and the loss's dependence on each
    output) and return its loss, its predictions and the predicted tensors (detached).

    Raises:
        UserCodeError: ``training_step`` raised.
        NoLossError: it returned no loss.
    """
    with torch.enable_grad(), PredictionRecorder(module) as recorder:
        loss = step_loss(module, batch, batch_idx)
        found, tensors = recorder.predictions(loss)
    return loss.detach(), found, tensors


class Substitution:
    """Forward hooks that replace the predictions of the steps run inside it.

    ``replace(j, actual)`` gives the tensor put in place of prediction ``j`` (``actual`` is
    what the model computed, for its shape, dtype and device), or None to keep it. Call
    :meth:`step` (or :meth:`reset` before each step of your own): calls are counted per step.
    """

    def __init__(self, predictions: list[Prediction], replace: Replace) -> None:
        self.predictions, self.replace = predictions, replace
        self._by_call: dict[tuple[int, int], list[tuple[int, Prediction]]] = {}
        for j, p in enumerate(predictions):
            self._by_call.setdefault((id(p.module), p.call), []).append((j, p))
        self._modules = {id(p.module): p.module for p in predictions}
        self._handles: list[Any] = []
        self._counts: dict[int, int] = {}

    def __enter__(self) -> Substitution:
        for m in self._modules.values():
            self._handles.append(m.register_forward_hook(self._substitute))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def reset(self) -> None:
        """Start counting calls afresh (a new step)."""
        self._counts.clear()

    def step(self, module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> torch.Tensor:
        """The loss of the user's ``training_step`` on ``batch``, predictions replaced.

        Raises:
            UserCodeError: ``training_step`` raised.
            NoLossError: it returned no loss.
        """
        self.reset()
        return step_loss(module, batch, batch_idx)

    def _substitute(self, module: nn.Module, args: Any, output: Any) -> Any:
        k = self._counts.get(id(module), 0)
        self._counts[id(module)] = k + 1
        targets = self._by_call.get((id(module), k))
        if not targets:
            return None
        actual = dict(_leaves(output))
        new = {}
        for j, p in targets:
            if p.path in actual:
                value = self.replace(j, actual[p.path])
                if value is not None:
                    new[p.path] = value
        return _replaced(output, new) if new else None


def main_prediction(predictions: list[Prediction], tensors: list[torch.Tensor],
                    captured: Any) -> int | None:
    """Which prediction is the step's output that the task is read from: the one the outermost
    captured output selects (:class:`~lightning_diag.batch.OutputCapture`,
    :func:`~lightning_diag.functional.task.select_output`), else, when that is no prediction
    (the step called a loss module or a metric last), the first tensor of the last prediction
    call; None without predictions."""
    for j, t in enumerate(tensors):
        if t is captured:
            return j
    if not predictions:
        return None
    last = predictions[-1]
    return next(j for j, p in enumerate(predictions)
                if p.module is last.module and p.call == last.call)


class PredictionTap:
    """Records, in each step run inside it, the tensor of one prediction (nothing replaced).

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net, self.criterion = torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss()
        ...     def training_step(self, batch, batch_idx):
        ...         return self.criterion(self.net(batch[0]), batch[1])
        >>> net, batch = Net(), (torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> _, (pred,), _ = record_predictions(net, batch)
        >>> with PredictionTap(pred) as tap:
        ...     tap.reset()
        ...     _ = net.training_step(batch, 0)
        >>> tap.value.shape  # the logits, not the criterion's loss
        torch.Size([8, 3])
    """

    def __init__(self, prediction: Prediction) -> None:
        self.value: torch.Tensor | None = None
        self._sub = Substitution([prediction], self._keep)

    def _keep(self, j: int, actual: torch.Tensor) -> None:
        self.value = actual

    def __enter__(self) -> PredictionTap:
        self._sub.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sub.__exit__(*exc)

    def reset(self) -> None:
        """Forget the last value and start counting calls afresh (a new step)."""
        self.value = None
        self._sub.reset()


def _detached(obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if depth < _MAX_DEPTH and isinstance(obj, Mapping):
        out = obj.copy() if hasattr(obj, "copy") else dict(obj)
        for key in obj:
            out[key] = _detached(obj[key], depth + 1)
        return out
    if depth < _MAX_DEPTH and isinstance(obj, (list, tuple)):
        items = [_detached(v, depth + 1) for v in obj]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    return obj


class ReplayMiss(Exception):
    """A replayed step called a module more often than in the recorded one."""


class Replay:
    """Stands in for the forward of the prediction modules with what they returned in a
    recorded pass, so that the user's loss can be evaluated at many replaced predictions
    without running the network again.

    Use :meth:`recording` around one pass of steps (``step(i)`` before each), then
    :meth:`replaying` around later passes. Only valid when the loss depends on the network
    through those outputs alone: check it, as :meth:`matches` does, against the recorded
    losses.
    """

    def __init__(self, predictions: list[Prediction]) -> None:
        self._modules = list({id(p.module): p.module for p in predictions}.values())
        self._outputs: dict[tuple[int, int, int], Any] = {}
        self._counts: dict[int, int] = {}
        self._step = 0
        self.losses: dict[int, float] = {}

    def step(self, index: int) -> None:
        """The next step is the one of batch ``index``."""
        self._step = index
        self._counts.clear()

    def _next(self, module: nn.Module) -> tuple[int, int, int]:
        k = self._counts.get(id(module), 0)
        self._counts[id(module)] = k + 1
        return self._step, id(module), k

    @contextmanager
    def recording(self) -> Iterator[Replay]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs[self._next(module)] = _detached(output)

        handles = [m.register_forward_hook(keep) for m in self._modules]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self) -> Iterator[Replay]:
        saved = {id(m): m.__dict__.get("forward") for m in self._modules}

        def stand_in(module: nn.Module) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                key = self._next(module)
                if key not in self._outputs:
                    raise ReplayMiss(f"call {key[2] + 1} of {type(module).__name__}")
                return self._outputs[key]
            return forward

        for m in self._modules:
            m.forward = stand_in(m)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            for m in self._modules:
                if saved[id(m)] is None:
                    del m.forward
                else:
                    m.forward = saved[id(m)]  # type: ignore[method-assign,assignment]

    def matches(self, losses: dict[int, float]) -> bool:
        """The replayed losses (nothing replaced) are the recorded ones."""
        return losses.keys() == self.losses.keys() and all(
            math.isclose(losses[i], v, rel_tol=1e-6, abs_tol=1e-9)
            for i, v in self.losses.items())

"""Copies of the module for side experiments, and the state a step carries between calls.

A side experiment (gradient check, overfit test, LR sweep) works on a deep copy of the module and
restores every RNG stream in ``finally``. Anything the copy's ``training_step`` logs with
``self.log`` is dropped.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.isolation.rng import preserved_rng
from lightning_diag.isolation.trainer_view import TrainerView

__all__ = ["StepState", "clone_module", "side_experiment"]


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log``/``self.log_dict`` on a copy: nothing reaches the real logs."""


def clone_module(module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of ``module`` that sees the run's Trainer through a view and logs nothing.

    The trainer (and its dataloaders, loggers, callbacks) is not copied: the copy's
    ``self.trainer`` is a :class:`~lightning_diag.isolation.trainer_view.TrainerView` that reads
    the real one (epoch, global step, datamodule...) and keeps to itself what could leak out
    (logging, optimizers, ``manual_backward``), so that ``self.trainer``-dependent code runs on
    the copy, also for a module checked without a Trainer. A tensor attribute still
    attached to the last step's graph (a recurrent ``self.hidden`` the step detaches only when it
    next reads it), which deepcopy refuses, is copied detached: the same value, no history.
    """
    memo: dict[int, Any] = {}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = trainer
    for m in module.modules():
        for value in vars(m).values():
            for t in _graph_tensors(value):
                memo[id(t)] = t.detach().clone()
    try:
        clone = copy.deepcopy(module, memo)
    # what deepcopy raises on an uncopyable attribute: TypeError (a lock, an open file),
    # RuntimeError (a non-leaf tensor), copy.Error and pickle.PicklingError (custom reducers)
    except (TypeError, RuntimeError, copy.Error, pickle.PicklingError) as err:
        raise RuntimeError(
            f"lightning_diag could not copy {type(module).__name__} for a side experiment "
            f"({type(err).__name__}: {err}). Make the module deep-copyable or remove this callback."
        ) from err
    clone.log = _no_log  # type: ignore[method-assign]
    clone.log_dict = _no_log  # type: ignore[method-assign]
    clone.trainer = TrainerView(trainer, clone)  # type: ignore[assignment]
    return clone


@contextmanager
def side_experiment(module: pl.LightningModule) -> Iterator[pl.LightningModule]:
    """Yield an isolated copy of ``module``; every RNG stream is restored afterwards."""
    with preserved_rng(), torch.enable_grad():
        clone = clone_module(module)
        try:
            yield clone
        finally:
            del clone


class StepState:
    """What ``training_step`` may carry from one call to the next: the public attributes of a
    module and its submodules that hold tensors (alone or in tuples, lists, dicts) or None,
    such as a recurrent hidden state kept in ``self.hidden``.

    A copy starts from the live module's values (deepcopy); :meth:`restore` puts the captured
    values back (fresh clones, so an in-place change cannot leak), which repeated evaluations
    of the same point need. Parameters, buffers and submodules are not part of it.

    The attributes are scanned once, here: :meth:`restore`, called before every step of a
    side experiment, then looks only at what a step can have changed (attributes added, public
    ones that now hold a tensor, and the captured ones), and does nothing more for a module
    whose attributes are the ones it had.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> m.hidden = None
        >>> state = StepState(m)
        >>> m.hidden = torch.ones(3)
        >>> state.changed()
        ['hidden']
        >>> state.restore(); m.hidden is None, state.changed()
        (True, [])
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self._modules = dict(module.named_modules())
        self._saved = {name: {k: _clone_state(v, dtype) for k, v in vars(m).items()
                              if _carried(k, v)}
                       for name, m in self._modules.items()}
        self._scans = [_Scan(m, self._saved[name]) for name, m in self._modules.items()]

    def restore(self) -> None:
        """Put every captured attribute back; remove those a step added since."""
        for scan in self._scans:
            scan.restore()

    def changed(self) -> list[str]:
        """Dotted names of the attributes whose value differs from the captured one."""
        names = []
        for name, m in self._modules.items():
            saved, now = self._saved[name], {k: v for k, v in vars(m).items() if _carried(k, v)}
            for key in sorted(set(saved) | set(now)):
                if key not in saved or key not in now or not _same_state(saved[key], now[key]):
                    names.append(f"{name}.{key}" if name else key)
        return names


class _Scan:
    """One module's part of :class:`StepState`: its captured attributes, the names it had,
    and its other public attributes with their values, scanned once.

    A step can make an attribute carried only by adding it, or by setting (or filling) a
    public one: the names are compared as a set, and a public value still the very object it
    was, and no container that can be filled in place (a number, a string, a function, a
    tuple of them), is skipped without a look inside. A captured value goes back into the
    instance's ``__dict__``, as deepcopy puts it there (``setattr`` where the step removed it:
    a name it may have made a parameter or a buffer of); a None still in place is left as it
    is.
    """

    def __init__(self, module: torch.nn.Module, saved: dict[str, Any]) -> None:
        self.module, self.saved = module, list(saved.items())
        attrs = vars(module)
        self.names = frozenset(attrs)
        self.public = [(k, v, _frozen(v)) for k, v in attrs.items()
                       if not k.startswith("_") and k not in saved]

    def restore(self) -> None:
        m = self.module
        attrs = vars(m)
        stale = [] if attrs.keys() == self.names else [
            k for k in attrs.keys() - self.names if _carried(k, attrs[k])]
        for key, before, frozen in self.public:
            now = attrs.get(key, _MISSING)
            if now is not _MISSING and not (frozen and now is before) and _carried(key, now):
                stale.append(key)
        for key in stale:
            delattr(m, key)
        for key, value in self.saved:
            now = attrs.get(key, _MISSING)
            if now is _MISSING:
                setattr(m, key, _clone_state(value, None))
            elif value is not None or now is not None:
                attrs[key] = _clone_state(value, None)


_MISSING = object()


def _frozen(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` cannot come to hold a tensor while it stays the same object: anything
    but a list or a mapping (filled in place), or a tuple holding one."""
    if isinstance(value, tuple):
        return depth < 4 and all(_frozen(v, depth + 1) for v in value)
    return not isinstance(value, (list, Mapping))


def _graph_tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside an attribute value (alone, or in tuples, lists, dicts) that are not graph
    leaves: the outputs of a step kept with their history."""
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            yield value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _graph_tensors(v, depth + 1)
    elif depth < 4 and isinstance(value, Mapping):
        for v in value.values():
            yield from _graph_tensors(v, depth + 1)


def _carried(key: str, value: Any) -> bool:
    return not key.startswith("_") and (value is None or _holds_tensor(value))


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not isinstance(value, torch.nn.Parameter)
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _clone_state(value: Any, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_clone_state(v, dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v, dtype) for v in value)
    if isinstance(value, Mapping):
        return type(value)({k: _clone_state(v, dtype) for k, v in value.items()})  # type: ignore[call-arg]
    return value


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and torch.equal(a, b.to(a.dtype)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return a is b or a == b

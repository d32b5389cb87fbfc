"""The guard every Lightning hook of a diagnostic callback runs under (docs/reliability.md),
the setups a callback refuses, and the cached ``state_key``.

:func:`guard_hooks` wraps each Lightning hook a :class:`~lightning_diag.base.DiagnosticCallback`
subclass defines (``__init_subclass__`` calls it, so a new callback cannot forget it); what a
callback does when a hook fails (step aside, report, undo) is its own
(``DiagnosticCallback._step_aside``).

Example:
    >>> isinstance(ConfigurationError("two EMAWeights swap in their average"), ValueError)
    True
    >>> "on_train_batch_end" in LIGHTNING_HOOKS
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from lightning_diag.batch import UserCodeError
from lightning_diag.findings import DiagnosticError, DiagnosticWarning

__all__ = ["BATCH_HOOKS", "DISPATCHED_HOOKS", "LIGHTNING_HOOKS", "SHARDED_STRATEGIES",
           "ConfigurationError", "cache_state_key", "guard_hooks", "refuse_sharded", "stable",
           "unused_hooks"]

SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")

#: Every hook Lightning may call on a callback: each one a DiagnosticCallback implements runs
#: under the guard (:func:`guard_hooks`).
LIGHTNING_HOOKS = tuple(name for name, value in vars(pl.Callback).items()
                        if inspect.isfunction(value) and not name.startswith("_"))


class ConfigurationError(ValueError):
    """A setup a callback cannot work with (a sharded strategy, two instances that would clash).

    Raised at ``setup``, before training starts, and passed through the guard to the user: the
    run cannot be diagnosed as configured, and stepping aside silently would hide it.
    """


def refuse_sharded(trainer: pl.Trainer, who: str, why: str) -> None:
    """Raise a clear error at setup when the trainer shards the weights across ranks.

    Matched by class name along the strategy's MRO, so subclasses are caught without importing
    optional backends (DeepSpeed).

    Raises:
        ConfigurationError: naming ``who``, the strategy and what to use instead.
    """
    names = {c.__name__ for c in type(trainer.strategy).__mro__}
    hit = next((n for n in SHARDED_STRATEGIES if n in names), None)
    if hit is not None:
        raise ConfigurationError(
            f"{who} does not support the sharded strategy {type(trainer.strategy).__name__} "
            f"({hit}): {why}. Use DDP or a single device, or remove {who}."
        )


def guard_hooks(cls: type) -> None:
    """Run each Lightning hook ``cls`` itself defines under :func:`_guarded`; ``on_train_end``
    and ``on_fit_end`` also tell the callback's run record that the fit is ending and, for
    ``on_fit_end``, that this callback's part is over (:func:`_told`)."""
    for name in LIGHTNING_HOOKS:
        fn = vars(cls).get(name)
        if inspect.isfunction(fn):
            hook = _guarded(name, fn)
            if name in ("on_train_end", "on_fit_end"):
                hook = _told(name, hook)
            setattr(cls, name, hook)


def _told(name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
    """The guarded ``hook`` (``on_train_end`` or ``on_fit_end``) after the callback's
    ``_fit_ending`` and, for ``on_fit_end``, before its ``_fit_ended``: outside the guard, so
    that a callback that stepped aside still counts for the run's fit-end diagnosis."""

    @functools.wraps(hook)
    def told(self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outermost = name not in self._running  # not a subclass's super() call
        if outermost:
            self._fit_ending(trainer)
        hook(self, trainer, pl_module)
        if outermost and name == "on_fit_end":
            self._fit_ended(trainer)

    return told


def _guarded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (the hook ``name``) under the guard described in
    :class:`~lightning_diag.base.DiagnosticCallback`."""

    @functools.wraps(fn)
    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        if name in self._running:  # a subclass's hook calling super(): the outer guard decides
            return fn(self, *args, **kwargs)
        if self._off and not self._back_on(name, args, kwargs):
            return None
        self._running.add(name)
        try:
            pending = self.hooks.pop_error()
            if pending is not None:  # a module hook of ours failed inside the user's step
                where, err = pending
                self._step_aside(name, args, err, where=f"{where} on the model (seen in `{name}`)")
                return None
            return fn(self, *args, **kwargs)
        except (DiagnosticError, ConfigurationError, DiagnosticWarning):
            raise  # a DiagnosticWarning raises only where a filter of the user's made it an error
        except UserCodeError as err:
            self._step_aside(name, args, err)
        except Exception as err:
            if self.strict and name != "on_exception":
                raise
            self._step_aside(name, args, err)
        finally:
            self._running.discard(name)
        return None

    return hook


def cache_state_key(cls: type) -> None:
    """Keep the ``state_key`` property ``cls`` defines once built.

    Lightning reads every callback's ``state_key`` around each hook call, and building it from
    twenty arguments costs ~10 us. The key is kept in the instance's dict, where a read finds
    it with no Python call (:class:`_StateKey`), and dropped (built again at the next read)
    when an attribute named like one of its arguments is set (the callback's
    ``__setattr__``).
    """
    prop = vars(cls).get("state_key")
    if isinstance(prop, property) and prop.fget is not None:
        cls.state_key = _StateKey(prop.fget)  # type: ignore[attr-defined]


class _StateKey:
    """A non-data descriptor (as :func:`functools.cached_property`) that builds the state key
    and stores it in the instance's ``__dict__``: later reads find it there, as a plain
    attribute (measured: ~0.08 us a read, against 0.2-0.4 us for a property returning a kept
    value)."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        key = obj.__dict__["state_key"] = str(self.build(obj))
        return key


#: Hooks Lightning calls on every batch, only through its ``_call_callback_hooks``.
BATCH_HOOKS = tuple(name for name in LIGHTNING_HOOKS
                    if "_batch_" in name or name.startswith(("on_before_", "on_after_")))

#: Hooks Lightning calls only through its ``_call_callback_hooks``, which skips an attribute
#: that is not callable: every ``on_*`` hook but the checkpoint ones (called directly), and
#: ``setup`` / ``teardown``. The per-epoch ones among them are called ~6 times an epoch.
DISPATCHED_HOOKS = tuple(name for name in LIGHTNING_HOOKS if name in ("setup", "teardown") or (
    name.startswith("on_") and name not in ("on_save_checkpoint", "on_load_checkpoint")))


def unused_hooks(cls: type) -> tuple[str, ...]:
    """The hooks of :data:`DISPATCHED_HOOKS` ``cls`` leaves as Lightning's no-ops, found once
    per class.

    A diagnostic callback holds None for each on its instances: Lightning skips a hook
    attribute that is not callable, where each call of an empty hook costs ~2-5 us (a profiler
    context and a name built from the state key, per callback and hook: on every batch for the
    per-batch hooks, ~6 times an epoch for the per-epoch ones, per callback). The class keeps
    the no-op, so a subclass's ``super()`` call still finds it.
    """
    found = cls.__dict__.get("_unused_hooks")
    if found is None:
        found = tuple(name for name in DISPATCHED_HOOKS
                      if getattr(cls, name) is getattr(pl.Callback, name))
        type.__setattr__(cls, "_unused_hooks", found)
    return found


def stable(value: Any) -> Any:
    """``value`` as a literal whose repr does not change between processes.

    Example:
        >>> stable([1, len]), stable(None)
        ((1, 'builtins.len'), None)
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(stable(v) for v in value)
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"{getattr(value, '__module__', type(value).__module__)}.{name}"
    return str(value)

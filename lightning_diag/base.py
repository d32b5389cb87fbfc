"""The base class every diagnostic callback derives from, and the shared module-hook registry.

A diagnostic callback collects :class:`~lightning_diag.findings.Finding` objects in ``.findings``
(reset at each ``fit``; one per fact: a fact seen again updates its finding, see
:func:`~lightning_diag.findings.updated`), publishes each to the run's ``findings.jsonl`` (one
:meth:`~lightning_diag.findings.Finding.to_dict` record a line, appended as published, updates
included), to TensorBoard (the run's one table of every callback's findings, rewritten under
:data:`~lightning_diag.tensorboard.tags.FINDINGS_TABLE`: :func:`findings_table`) and, on global rank
zero, to the terminal: one short line (:meth:`~lightning_diag.findings.Finding.headline`) on the
``lightning_diag`` logger at the finding's level, and a
:class:`~lightning_diag.findings.DiagnosticWarning` for WARN and FAIL, silent unless a warnings
filter of yours turns it on (see ``docs/api.md``). It raises
:class:`~lightning_diag.findings.DiagnosticError` on a FAIL when ``strict=True``.

Nobody configured logging (no handler on the root logger or on ``lightning_diag``): the
``lightning_diag`` logger prints WARNING and above itself, through ``tqdm.write`` so that a
progress bar stays whole, as Python's last-resort handler would without it. Once logging is
configured, your handlers decide.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.base import DiagnosticCallback, findings
    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> findings(trainer)
    []
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm
from typing_extensions import override

from lightning_diag.batch import NoLossError, UserCodeError
from lightning_diag.checks.diagnosis import diagnose
from lightning_diag.findings import (
    FINDINGS_FILE,
    DiagnosticError,
    DiagnosticWarning,
    Finding,
    Severity,
    append_findings,
    sort_findings,
    updated,
)
from lightning_diag.isolation import first_batches, preserved_rng, train_dataloader_of
from lightning_diag.tensorboard.tags import FINDINGS_TABLE
from lightning_diag.tensorboard.writer import log_dir, markdown_table, tensorboard_writer
from lightning_diag.validation import check_flag

__all__ = ["ConfigurationError", "DiagnosticCallback", "FitStartCheck", "HookRegistry", "findings",
           "findings_table", "refuse_sharded"]

log = logging.getLogger("lightning_diag")


class _TerminalHandler(logging.Handler):
    """Python's last-resort output for the ``lightning_diag`` logger (WARNING and above, the bare
    message, on stderr), written with ``tqdm.write`` so that a running progress bar is redrawn
    below the line instead of being cut by it. Silent as soon as another handler would handle
    the record: configured logging decides alone.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if _handled_elsewhere(record, self):
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # what logging's own handlers do: report, never raise into the run
            self.handleError(record)


def _handled_elsewhere(record: logging.LogRecord, mine: logging.Handler) -> bool:
    """Whether a handler other than ``mine`` on the record's logger chain takes ``record``."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not mine and record.levelno >= h.level for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def _warning_wanted(message: str) -> bool:
    """Whether a warnings filter covers a :class:`DiagnosticWarning` with ``message``: without
    one it is not issued (the logger's line is the default output); with one, it decides."""
    return any(issubclass(DiagnosticWarning, category) and (text is None or text.match(message))
               for _, text, category, *_ in warnings.filters)


if not any(isinstance(h, _TerminalHandler) for h in log.handlers):  # once, even on reload
    log.addHandler(_TerminalHandler())

_LOG_LEVEL = {
    Severity.INFO: logging.INFO, Severity.WARN: logging.WARNING, Severity.FAIL: logging.ERROR
}


SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")

#: Every hook Lightning may call on a callback: each one a DiagnosticCallback implements runs
#: under the guard (:func:`_guarded`).
LIGHTNING_HOOKS = tuple(name for name, value in vars(pl.Callback).items()
                        if inspect.isfunction(value) and not name.startswith("_"))


class ConfigurationError(ValueError):
    """A setup a callback cannot work with (a sharded strategy, two instances that would clash).

    Raised at ``setup``, before training starts, and passed through the guard to the user: the
    run cannot be diagnosed as configured, and stepping aside silently would hide it.

    Example:
        >>> isinstance(ConfigurationError("two EMAWeights swap in their average"), ValueError)
        True
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


class HookRegistry:
    """Keeps every module and tensor hook a callback registers, so that all can be removed at
    once, and guards them: these hooks run inside the user's own forward and backward passes,
    where an error of ours would end the user's step.

    A hook registered through :meth:`forward` or :meth:`tensor` that raises is removed with all
    the others, and its error is kept for the owning callback's next Lightning hook, which
    reports it as ``<slug>.error`` (see :class:`DiagnosticCallback`); with ``strict`` it is
    raised where it happened.

    Example:
        >>> import torch
        >>> hooks = HookRegistry()
        >>> layer = torch.nn.Linear(2, 2)
        >>> hooks.forward(layer, lambda m, i, o: 1 / 0)
        >>> len(hooks), len(layer._forward_hooks)
        (1, 1)
        >>> _ = layer(torch.zeros(1, 2))  # the user's forward goes on
        >>> len(layer._forward_hooks), type(hooks.pop_error()[1]).__name__
        (0, 'ZeroDivisionError')
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._handles: list[RemovableHandle] = []
        self._error: tuple[str, Exception] | None = None

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def forward(self, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
        """Register a guarded forward hook on ``module`` and keep its handle."""
        self.add(module.register_forward_hook(self._guarded(fn, "a forward hook")))

    def tensor(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> None:
        """Register a guarded gradient hook on ``tensor`` and keep its handle."""
        self.add(tensor.register_hook(self._guarded(fn, "a gradient hook")))

    def _guarded(self, fn: Callable[..., Any], where: str) -> Callable[..., Any]:
        def hook(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as err:
                if self.strict:
                    raise
                if self._error is None:
                    self._error = (where, err)
                self.remove_all()
                return None

        return hook

    def pop_error(self) -> tuple[str, Exception] | None:
        """The first error a guarded hook raised since the last call (where, exception)."""
        error, self._error = self._error, None
        return error

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


class DiagnosticCallback(pl.Callback):
    """Base class: finding collection, publication, strict mode, and hook cleanup.

    Subclasses set ``slug`` (the short name used in tags and codes, e.g. ``"overfit"``) and call
    :meth:`publish` with the findings of each check they run. A subclass with state builds its
    ``state_key`` with ``self._generate_state_key(...)`` from the constructor arguments that change
    what it measures, as Lightning's ``EarlyStopping`` does, so that two differently configured
    instances can share a Trainer and each finds its own state in a checkpoint. Presentation
    arguments (figures, progress bars, ``strict``) are left out of the key: changing them before
    resuming must not orphan the saved state.

    Every Lightning hook a subclass implements runs under one guard, applied in
    ``__init_subclass__`` (a new callback cannot forget it): an exception from inside the library
    becomes one WARN finding ``<slug>.error`` (the hook, the exception type and message; the
    traceback goes to the ``lightning_diag`` logger), the callback removes its module hooks and
    undoes what it changed (:meth:`_release`), and all its hooks are no-ops until the next
    ``fit``; training goes on. A :class:`~lightning_diag.batch.UserCodeError` (the user's code
    failing where a check called it on a copy) becomes ``<slug>.user_error`` instead.
    ``KeyboardInterrupt``, ``SystemExit``, :class:`DiagnosticError` and
    :class:`ConfigurationError` pass through untouched.

    Args:
        strict: When True, a FAIL finding raises :class:`DiagnosticError` as soon as it is
            published, and an internal error is raised instead of reported (except in
            ``on_exception``, where it would hide the exception that stopped the run).

    Example:
        >>> class Buggy(DiagnosticCallback):
        ...     slug = "buggy"
        ...     def on_train_start(self, trainer, pl_module):
        ...         raise ZeroDivisionError("a bug of ours")
        >>> cb = Buggy()
        >>> cb.on_train_start(None, None)  # reported, not raised
        >>> [(f.code, f.details) for f in cb.findings]
        [('buggy.error', {'hook': 'on_train_start', 'exception': 'ZeroDivisionError'})]
        >>> Buggy(strict=True).on_train_start(None, None)
        Traceback (most recent call last):
        ...
        ZeroDivisionError: a bug of ours
    """

    slug: ClassVar[str] = "diag"

    def __init__(self, strict: bool = False) -> None:
        check_flag("strict", strict)
        # Lightning skips a hook attribute that is not callable: a per-batch hook this class
        # does not implement costs nothing then (each call costs ~5 us: a profiler context and
        # a name built from the state key, per callback and hook, on every batch).
        self.__dict__.update(dict.fromkeys(_unused_batch_hooks(type(self))))
        self.strict = strict
        self.findings: list[Finding] = []
        self.hooks = HookRegistry(strict)
        self._said_no_tensorboard = False
        self._said_record_failed = False
        self._off = False  # stepped aside after an error, until the next fit
        self._running: set[str] = set()  # hooks in progress, to tell a super() call apart

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_hooks(cls)
        _cache_state_key(cls)

    def __setattr__(self, name: str, value: Any) -> None:
        # an argument the state key was built from changes: the key is built again
        if name in self.__dict__.get("_state_key_args", ()):
            self.__dict__.pop("state_key", None)
        object.__setattr__(self, name, value)

    @property
    def check_name(self) -> str:
        return type(self).__name__

    @override
    def _generate_state_key(self, **kwargs: Any) -> str:
        """Lightning's key (class name and the repr of ``kwargs``), the same in every process.

        Functions are named by module and qualified name (their repr holds a memory address),
        sequences become tuples, paths and devices strings.

        Example:
            >>> from lightning_diag.batch import default_batch_to_input
            >>> DiagnosticCallback()._generate_state_key(n=2, fn=default_batch_to_input)
            "DiagnosticCallback{'n': 2, 'fn': 'lightning_diag.batch.default_batch_to_input'}"
        """
        self.__dict__["_state_key_args"] = frozenset(kwargs)  # see `_cache_state_key`
        return super()._generate_state_key(**{k: _stable(v) for k, v in kwargs.items()})

    def finding(
        self, trainer: pl.Trainer | None, code: str, severity: Severity, message: str, **kw: Any
    ) -> Finding:
        """Build a finding of this check, stamped with the trainer's current step and epoch."""
        if trainer is not None:
            kw.setdefault("step", trainer.global_step)
            kw.setdefault("epoch", trainer.current_epoch)
        return Finding(check=self.check_name, code=code, severity=severity, message=message, **kw)

    def skipped(self, trainer: pl.Trainer | None, reason: str, advice: str = "") -> Finding:
        """The info finding ``<slug>.skipped`` saying why this check did not run."""
        return self.finding(trainer, f"{self.slug}.skipped", Severity.INFO,
                            f"{self.check_name} skipped: {reason}", advice=advice)

    def publish(self, trainer: pl.Trainer | None, new: Iterable[Finding]) -> list[Finding]:
        """Record, print and (in strict mode) raise on a batch of findings from one check.

        A finding whose :attr:`~lightning_diag.findings.Finding.key` is already in ``.findings``
        updates that one (:func:`~lightning_diag.findings.updated`: the worse reading, every
        step seen); the update is recorded and written, but printed only when its severity
        rose. Returns the findings as recorded (updates merged).
        """
        out, loud = [], []
        for f in (self._stamped(trainer, f) for f in new):
            i = next((k for k, old in enumerate(self.findings) if old.key == f.key), None)
            if i is None:
                self.findings.append(f)
                loud.append(f)
            else:
                f, old = updated(self.findings[i], f), self.findings[i]
                self.findings[i] = f
                if f.severity > old.severity:
                    loud.append(f)
            out.append(f)
        if not out:
            return out
        if trainer is None or trainer.is_global_zero:
            for f in loud:
                log.log(_LOG_LEVEL[f.severity], f.headline())
                if f.severity >= Severity.WARN and _warning_wanted(f.format()):
                    rank_zero_warn(f.format(), category=DiagnosticWarning)
        if trainer is not None:
            self._write_record(trainer, out)
            self._write_tensorboard(trainer, out)
        failures = [f for f in loud if f.severity is Severity.FAIL]
        if self.strict and failures:
            raise DiagnosticError(failures)
        return out

    @staticmethod
    def _stamped(trainer: pl.Trainer | None, f: Finding) -> Finding:
        """``f`` with the trainer's step and epoch where the (Trainer-free) check left them out."""
        if trainer is None or f.step is not None:
            return f
        return dataclasses.replace(f, step=trainer.global_step, epoch=trainer.current_epoch)

    def require_tensorboard(self, trainer: pl.Trainer, what: str) -> bool:
        """True when a TensorBoard writer exists; else say once (info finding) what is skipped."""
        if tensorboard_writer(trainer) is not None:
            return True
        if trainer.is_global_zero and not self._said_no_tensorboard:
            self._said_no_tensorboard = True
            self.publish(
                trainer,
                [
                    self.finding(
                        trainer,
                        f"{self.slug}.no_tensorboard",
                        Severity.INFO,
                        f"No TensorBoardLogger on the trainer: {what} skipped; findings are still "
                        "collected in `.findings`.",
                        advice="Add `lightning.pytorch.loggers.TensorBoardLogger` to see them.",
                    )
                ],
            )
        return False

    def _write_record(self, trainer: pl.Trainer, batch: list[Finding]) -> None:
        """Append ``batch`` to ``<log_dir>/findings.jsonl`` now, so that a crash later keeps it."""
        directory = log_dir(trainer) if trainer.is_global_zero else None
        if directory is None:
            return
        try:
            append_findings(directory / FINDINGS_FILE, batch)
        except OSError as err:
            if not self._said_record_failed:
                self._said_record_failed = True
                log.warning("%s could not append its findings to %s (%s); they are still in "
                            "`.findings`, the logs and TensorBoard.", self.check_name,
                            directory / FINDINGS_FILE, err)

    def _write_tensorboard(self, trainer: pl.Trainer, batch: list[Finding]) -> None:
        """Rewrite the run's one findings table: every callback's findings, at this step.

        TensorBoard's Text dashboard shows a tag's latest step on top and keeps one text per
        step (the last written), so the table a user sees first is the complete, current one.
        ``batch`` is already in ``self.findings``.
        """
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        every = findings(trainer)
        if not any(cb is self for cb in trainer.callbacks):  # type: ignore[attr-defined]
            every += self.findings
        step = trainer.global_step
        writer.add_text(FINDINGS_TABLE, findings_table(every, step), global_step=step)

    def user_error(self, trainer: pl.Trainer | None, err: UserCodeError,
                   hook: str = "on_fit_start") -> Finding:
        """The WARN finding ``<slug>.user_error``: which of the user's functions raised what."""
        what = "did not run" if hook == "on_fit_start" else f"stopped in `{hook}`"
        return self.finding(
            trainer, f"{self.slug}.user_error", Severity.WARN,
            f"{self.check_name} {what}: {err}",
            advice="The error is in your code, called by the check on a copy of your model or "
                   "data, outside your training loop: fix it, or pass `batch_to_input=` / "
                   "`batch_to_target=` if the check read the wrong part of a batch.",
            details={"where": err.where, "exception": type(err.error).__name__})

    def _release(self) -> None:
        """Remove this callback's module hooks and undo what it swapped or changed in the run.

        Called by ``teardown``, by ``on_exception`` and when the callback steps aside after an
        error; it must work from any state. Subclasses that change more extend it.
        """
        self.hooks.remove_all()

    def _release_quietly(self) -> None:
        try:
            self._release()
        except Exception:  # cleanup after a failure must not become the run's failure
            log.exception("%s could not undo its changes to the run.", self.check_name)

    def _back_on(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a callback that stepped aside runs ``hook`` (only a new fit's ``setup``).

        That ``setup`` turns it back on; ``teardown`` and ``on_exception`` still clean up.
        """
        if hook == "setup" and kwargs.get("stage", args[2] if len(args) > 2 else None) == "fit":
            self._off = False
            return True
        if hook in ("teardown", "on_exception"):
            self._release_quietly()
        return False

    def _step_aside(self, hook: str, args: tuple[Any, ...], err: Exception,
                    where: str = "") -> None:
        """Undo what this callback changed, turn it off until the next fit, report ``err``
        (raised in the Lightning hook ``hook``, or ``where`` it says: a module hook of ours)."""
        self._off = True
        self._release_quietly()
        trainer = args[0] if args and isinstance(args[0], pl.Trainer) else None
        try:
            if isinstance(err, UserCodeError):
                found = self.user_error(trainer, err, hook)
            else:
                log.error("%s.%s raised %s; the callback is off for the rest of this fit.",
                          self.check_name, hook, type(err).__name__, exc_info=err)
                found = self.finding(
                    trainer, f"{self.slug}.error", Severity.WARN,
                    f"{self.check_name} failed in {where or f'`{hook}`'} with "
                    f"{type(err).__name__}: {err}. "
                    "It is off for the rest of this fit; training goes on without it.",
                    advice="An error inside lightning_diag, not in your model: please report it "
                           "with the traceback from the `lightning_diag` logger. Pass "
                           "`strict=True` to raise it instead.",
                    details={"hook": hook, "exception": type(err).__name__})
            self.publish(trainer, [found])
        except Exception:  # e.g. the part that failed is the writer the report goes through
            log.exception("%s could not report its error in `%s`.", self.check_name, hook)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.findings = []
            self._said_no_tensorboard = False
            self._said_record_failed = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing of its own; every callback's ``on_fit_end`` is followed by
        :meth:`_diagnose`, which only the last diagnostic callback acts on."""

    def _diagnose(self, trainer: Any) -> None:
        """Publish the run's ``diagnosis.summary``
        (:func:`~lightning_diag.checks.diagnosis.diagnose`) when this is the last diagnostic
        callback on ``trainer``: one callback, once per fit, after every callback's own
        ``on_fit_end`` (Lightning calls them in list order), so that nothing can be forgotten
        and it cannot run twice. Made when the problems come from two checks or more (one
        check's findings already carry their advice); it never raises for ``strict``: the
        FAILs it sums up belong to their own checks.
        """
        if not isinstance(trainer, pl.Trainer):
            return
        ours = [cb for cb in trainer.callbacks  # type: ignore[attr-defined]
                if isinstance(cb, DiagnosticCallback)]
        if not ours or ours[-1] is not self:
            return
        try:
            found = diagnose(findings(trainer), min_checks=2)
            if found is not None:
                self.publish(trainer, [found])
        except DiagnosticError:
            pass  # recorded and written before it was raised
        except Exception:  # the run is over: a failed summary must not fail it
            if self.strict:
                raise
            log.exception("%s could not make the run's diagnosis.", self.check_name)


def _guard_hooks(cls: type[DiagnosticCallback]) -> None:
    """Run each Lightning hook ``cls`` itself defines under :func:`_guarded`."""
    for name in LIGHTNING_HOOKS:
        fn = vars(cls).get(name)
        if inspect.isfunction(fn):
            hook = _guarded(name, fn)
            setattr(cls, name, _then_diagnose(hook) if name == "on_fit_end" else hook)


def _cache_state_key(cls: type[DiagnosticCallback]) -> None:
    """Keep the ``state_key`` property ``cls`` defines once built.

    Lightning reads every callback's ``state_key`` around each hook call, and building it from
    twenty arguments costs ~10 us. The key is kept in the instance's dict, where a read finds
    it with no Python call (:class:`_StateKey`), and dropped (built again at the next read)
    when an attribute named like one of its arguments is set.
    """
    prop = vars(cls).get("state_key")
    if isinstance(prop, property) and prop.fget is not None:
        cls.state_key = _StateKey(prop.fget)  # type: ignore[assignment,method-assign]


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


def _unused_batch_hooks(cls: type) -> tuple[str, ...]:
    """The per-batch hooks ``cls`` leaves as Lightning's no-ops (set to None on its instances:
    a subclass's ``super()`` call still finds the no-op on the class), found once per class."""
    found = cls.__dict__.get("_unused_hooks")
    if found is None:
        found = tuple(name for name in BATCH_HOOKS
                      if getattr(cls, name) is getattr(pl.Callback, name))
        type.__setattr__(cls, "_unused_hooks", found)
    return found


def _then_diagnose(hook: Callable[..., Any]) -> Callable[..., Any]:
    """The guarded ``on_fit_end`` ``hook``, then :meth:`DiagnosticCallback._diagnose`: outside
    the guard, so that a callback that stepped aside still makes the diagnosis."""

    @functools.wraps(hook)
    def on_fit_end(self: DiagnosticCallback, trainer: pl.Trainer,
                   pl_module: pl.LightningModule) -> None:
        outermost = "on_fit_end" not in self._running  # not a subclass's super() call
        hook(self, trainer, pl_module)
        if outermost:
            self._diagnose(trainer)

    return on_fit_end


def _guarded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (the hook ``name``) under the guard described in :class:`DiagnosticCallback`."""

    @functools.wraps(fn)
    def hook(self: DiagnosticCallback, *args: Any, **kwargs: Any) -> Any:
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


_guard_hooks(DiagnosticCallback)


def _stable(value: Any) -> Any:
    """``value`` as a literal whose repr does not change between processes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_stable(v) for v in value)
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"{getattr(value, '__module__', type(value).__module__)}.{name}"
    return str(value)


#: Advice stays the fourth column, where readers of the older four-column table look for it.
_TABLE_HEADER = ["severity", "code", "message", "advice", "value", "expected", "step"]


def findings_table(found: list[Finding], step: int) -> str:
    """The markdown of the TensorBoard findings table: a count line, then one row per finding
    in the order of :func:`~lightning_diag.findings.sort_findings`.

    Example:
        >>> head, _, *table = findings_table([Finding("X", "x.a", Severity.INFO, "m"), Finding(
        ...     "Y", "y.b", Severity.FAIL, "n", step=2)], step=2).splitlines()
        >>> head.split(". ")[0]
        '**2 findings** (1 fail, 0 warn, 1 info) at step 2'
        >>> for line in table:
        ...     print(line)
        | severity | code | message | advice | value | expected | step |
        |---|---|---|---|---|---|---|
        | FAIL | `y.b` | n | - | - | - | 2 |
        | INFO | `x.a` | m | - | - | - | - |
    """
    counts = ", ".join(f"{sum(f.severity is s for f in found)} {s.value}"
                       for s in (Severity.FAIL, Severity.WARN, Severity.INFO))
    head = (f"**{len(found)} finding{'s' * (len(found) != 1)}** ({counts}) at step {step}. "
            "Rewritten at each new finding: the table of the latest step, on top of this page, "
            "is the current one.")
    rows = [_table_row(f.to_dict()) for f in sort_findings(found)]
    for row in rows:  # message and advice
        row[2:4] = [_wrapped(cell) for cell in row[2:4]]
    return f"{head}\n\n{markdown_table(_TABLE_HEADER, rows)}"


def _wrapped(text: str, width: int = 32) -> str:
    """``text`` in lines of about ``width`` characters joined by ``<br>``: TensorBoard shares a
    table's width out by each column's longest line, so unwrapped sentences squeeze the short
    columns (severity, value, step) to a letter a line. A `code span` is never split (markdown
    would show the ``<br>`` inside it as text).

    Example:
        >>> _wrapped("run `lightning-diag tune` first", width=8)
        'run<br>`lightning-diag tune`<br>first'
    """
    # spaces inside code spans (odd-numbered pieces between backticks) become unbreakable
    pieces = text.split("`")
    joined = "`".join(p.replace(" ", "\0") if i % 2 else p for i, p in enumerate(pieces))
    lines = textwrap.wrap(joined, width, break_long_words=False, break_on_hyphens=False)
    return "<br>".join(lines).replace("\0", " ") or text


def _table_row(record: dict[str, Any]) -> list[str]:
    """The cells of one :meth:`Finding.to_dict` record in the TensorBoard findings table.

    Example:
        >>> _table_row(Finding("X", "x.a", Severity.WARN, "m", value=0.123456,
        ...                    expected=(0, float("inf")), step=3).to_dict())
        ['WARN', '`x.a`', 'm', '-', '0.1235', '[0, Infinity]', '3']
    """
    return [record["severity"].upper(), f"`{record['code']}`", record["message"],
            record["advice"] or "-", _cell(record["value"]), _cell(record["expected"]),
            _cell(record["step"])]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(map(_cell, value)) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class FitStartCheck(DiagnosticCallback):
    """A diagnostic that runs once, at fit start, before any training step.

    It is skipped (with an info finding saying why) under ``fast_dev_run``, when resuming from a
    checkpoint, and once it has run: ``state_dict`` remembers that, so a resumed run does not
    repeat it. Subclasses implement :meth:`run_check`.
    """

    #: Whether the check deep-copies the module (impossible to do meaningfully on a shard).
    copies_module: ClassVar[bool] = True

    def __init__(self, strict: bool = False) -> None:
        super().__init__(strict=strict)
        self.done = False

    def run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        raise NotImplementedError

    def fit_start_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          num_batches: int) -> tuple[list[Any], list[Finding]]:
        """The first ``num_batches`` training batches, or no batch and an info ``<slug>.skipped``.

        The user's sampler and the global RNG streams are left untouched.
        """
        try:
            loader = train_dataloader_of(trainer)
            with preserved_rng():
                return first_batches(loader, num_batches, pl_module.device), []
        except ValueError as err:  # no loader, not a DataLoader, or an empty dataset
            return [], [self.skipped(trainer, str(err))]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            if self.copies_module:
                refuse_sharded(trainer, self.check_name,
                               "its side experiment runs on a full copy of the module")
            self.done = False  # a checkpoint restored after setup sets it back

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reason = self._skip_reason(trainer, pl_module)
        if reason:
            self.publish(trainer, [self.skipped(trainer, f"{reason}.")])
            return
        try:  # the user's code failing in the check (UserCodeError) is reported by the guard
            found = self.run_check(trainer, pl_module)
        except NoLossError as err:  # e.g. a step returning None: a skip, not a crash of the fit
            found = [self.skipped(trainer, str(err))]
        finally:
            self.done = True
        self.publish(trainer, found)

    def _skip_reason(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if getattr(trainer, "fast_dev_run", False):
            return "`fast_dev_run` is on (side experiments would defeat its purpose)"
        if self.done or trainer.ckpt_path:
            return "resumed run; it ran before the checkpoint was written"
        if not pl_module.automatic_optimization:
            return ("manual optimization: the loss cannot be read from `training_step` "
                    "(it steps the optimizers itself)")
        return ""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))


def findings(trainer: pl.Trainer) -> list[Finding]:
    """All findings of every diagnostic callback attached to ``trainer``, in callback order."""
    out: list[Finding] = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, DiagnosticCallback):
            out.extend(cb.findings)
    return out

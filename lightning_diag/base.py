"""The base class every diagnostic callback derives from.

A diagnostic callback collects :class:`~lightning_diag.findings.Finding` objects in ``.findings``
(reset at each ``fit``; one per fact: a fact seen again updates its finding, see
:func:`~lightning_diag.findings.updated`) and hands them to its trainer's run record
(:class:`~lightning_diag.record.RunRecord`), which keeps the run's findings, writes them to the
run's ``findings.jsonl`` and to TensorBoard
(:data:`~lightning_diag.tensorboard.tags.FINDINGS_TABLE`), prints them on global rank zero (one
short line on the ``lightning_diag`` logger, :mod:`lightning_diag.terminal`) and makes the
run's diagnosis at fit end. It raises
:class:`~lightning_diag.findings.DiagnosticError` on a FAIL when ``strict=True``. Every Lightning
hook it implements runs under the guard of :mod:`lightning_diag.guard`.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.base import DiagnosticCallback, findings
    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> findings(trainer)
    []
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
from typing_extensions import override

from lightning_diag.batch import NoLossError, UserCodeError
from lightning_diag.findings import DiagnosticError, Finding, Severity, merge
from lightning_diag.guard import (
    BATCH_HOOKS,
    LIGHTNING_HOOKS,
    SHARDED_STRATEGIES,
    ConfigurationError,
    cache_state_key,
    guard_hooks,
    refuse_sharded,
    stable,
    unused_hooks,
)
from lightning_diag.hooks import HookRegistry
from lightning_diag.isolation import first_batches, preserved_rng, train_dataloader_of
from lightning_diag.record import RunRecord
from lightning_diag.tensorboard.writer import tensorboard_writer
from lightning_diag.terminal import log, say
from lightning_diag.validation import check_flag

__all__ = ["BATCH_HOOKS", "LIGHTNING_HOOKS", "SHARDED_STRATEGIES", "ConfigurationError",
           "DiagnosticCallback", "FitStartCheck", "HookRegistry", "findings", "refuse_sharded"]


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
        # hooks this class does not implement: None, so Lightning skips them
        self.__dict__.update(dict.fromkeys(unused_hooks(type(self))))
        self.strict = strict
        self.findings: list[Finding] = []
        self.hooks = HookRegistry(strict)
        self._said_no_tensorboard = False
        self._off = False  # stepped aside after an error, until the next fit
        self._running: set[str] = set()  # hooks in progress, to tell a super() call apart

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_hooks(cls)
        cache_state_key(cls)

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
        self.__dict__["_state_key_args"] = frozenset(kwargs)  # see `guard.cache_state_key`
        return super()._generate_state_key(**{k: stable(v) for k, v in kwargs.items()})

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
        """Hand a batch of findings from one check to the run's record
        (:class:`~lightning_diag.record.RunRecord`), which keeps, prints and writes them; in
        strict mode, raise on a new FAIL.

        A finding whose :attr:`~lightning_diag.findings.Finding.key` is already in ``.findings``
        updates that one (:func:`~lightning_diag.findings.updated`: the worse reading, every
        step seen); the update is recorded and written, but printed only when its severity
        rose. Without a trainer the findings are only kept and printed. Returns the findings
        as recorded (updates merged).
        """
        if isinstance(trainer, pl.Trainer):
            out, loud = RunRecord.of(trainer).publish(self, trainer, new)
        else:
            out, loud = merge(self.findings, new)
            say(loud)
        failures = [f for f in loud if f.severity is Severity.FAIL]
        if self.strict and failures:
            raise DiagnosticError(failures)
        return out

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
            self._said_no_tensorboard = False
            if isinstance(trainer, pl.Trainer):
                RunRecord.of(trainer).join(self, trainer)
            else:
                self.findings = []

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
        """Nothing of its own; every callback's ``on_fit_end`` tells the run's record when it
        begins and ends (:meth:`_fit_ending`, :meth:`_fit_ended`)."""

    def _fit_ending(self, trainer: Any) -> None:
        """Tell the record this callback's ``on_train_end`` or ``on_fit_end`` begins: the
        summaries published from now on reach TensorBoard's table once, at the end."""
        if isinstance(trainer, pl.Trainer):
            RunRecord.of(trainer).fit_ending()

    def _fit_ended(self, trainer: Any) -> None:
        """Tell the record this callback's ``on_fit_end`` is over: once every diagnostic
        callback's is, it makes the run's diagnosis (``diagnosis.summary``, kept in this
        callback's ``.findings`` when it is the last one; it never raises for ``strict``)."""
        if isinstance(trainer, pl.Trainer):
            attached = [cb for cb in trainer.callbacks  # type: ignore[attr-defined]
                        if isinstance(cb, DiagnosticCallback)]
            RunRecord.of(trainer).fit_ended(self, trainer, attached)


guard_hooks(DiagnosticCallback)


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
        return ""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))


def findings(trainer: pl.Trainer) -> list[Finding]:
    """All findings of every diagnostic callback attached to ``trainer``, in callback order, as
    its run record keeps them (:meth:`~lightning_diag.record.RunRecord.findings`)."""
    return RunRecord.of(trainer).findings()

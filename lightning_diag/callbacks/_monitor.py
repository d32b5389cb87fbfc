"""The bases of the monitors: a callback whose arguments are one frozen settings record, and a
monitor that measures on a logging schedule.

:class:`ConfiguredCallback` holds its arguments in ``config``, a frozen dataclass whose fields
are declared once with :func:`~lightning_diag.validation.argument` (name, default, check, and
whether it is part of the ``state_key``). Each field also reads as an attribute of the
callback (``cb.every_n_steps``); setting one builds a new, validated record (and the state key
again). A field renamed in the state key (the advisor's ``train_loss_key``) is read through
``config`` only.

:class:`MonitorCallback` owns the schedule and the lifecycle of a logging step:

1. ``on_train_batch_start`` of an optimizer step that :meth:`~MonitorCallback.is_logging_step`
   (steps 0, n, 2n, ... with ``n = every_n_steps``; with ``early_steps`` also 1, 2, 4, ... below
   n): the step is *armed* and :meth:`~MonitorCallback._arm` runs once (module hooks go on).
   With gradient accumulation the later micro-batches of an armed step do not arm it again.
   Each batch of the armed step adds its samples to :attr:`~MonitorCallback.seen_samples`
   (and one to ``seen_batches``), for rules judged over ``min_samples``.
2. ``on_before_optimizer_step`` while armed: :meth:`~MonitorCallback._optimizer_step`.
3. ``on_train_batch_end`` while armed: :meth:`~MonitorCallback._finish` measures what the
   step left pending and returns True when it is complete (False: it waits for another
   micro-batch, e.g. the optimizer step of an accumulated step; or, where
   :meth:`~MonitorCallback._keeps_measuring`, for the next optimizer steps' batches: a rule
   that needs more samples than one batch holds).
4. ``teardown`` / ``on_exception`` / the guard stepping aside (``_release``), or a step that
   moved on before its measurement completed: :meth:`~MonitorCallback._abandon` disarms and
   drops what is pending, module hooks included (subclasses extend it).

On a step that is not logged only ``on_train_batch_start`` runs, and returns after three
comparisons (the step is below the next logging step, :func:`next_logging_step`, found when the
schedule was last checked; no step is armed; the schedule is the one checked): no allocation, no
loop over parameters or layers, no tensor operation. The hooks a logging step needs
(``on_before_optimizer_step``, ``on_train_batch_end``) are shadowed on the instance by None
while no step is armed and no work waits to be taken in: Lightning skips a hook that is not
callable, so an idle monitor costs one hook call per batch (each one costs ~5 us in Lightning's
dispatch: a profiler context and a name built per call).

Example:
    >>> from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
    >>> cb = UpdateRatioMonitor(every_n_steps=10)
    >>> [s for s in range(25) if cb.is_logging_step(s)]
    [0, 1, 2, 4, 8, 10, 20]
    >>> cb.every_n_steps, cb.config.every_n_steps
    (10, 10)
    >>> cb.patience = 0
    Traceback (most recent call last):
    ...
    ValueError: `patience` must be an int >= 1, got 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag.base import DiagnosticCallback
from lightning_diag.batch import _batch_size
from lightning_diag.checks.verdict import Verdict
from lightning_diag.findings import Finding
from lightning_diag.functional.monitors import is_logging_step
from lightning_diag.validation import key_arguments

__all__ = ["ConfiguredCallback", "MonitorCallback", "next_logging_step"]

#: The hooks a monitor needs only while a logging step is armed or work waits to be taken in.
ARMED_HOOKS = ("on_before_optimizer_step", "on_train_batch_end")


def next_logging_step(step: int, every_n_steps: int, early_steps: bool) -> int:
    """The first step after ``step`` that :func:`~lightning_diag.functional.monitors.
    is_logging_step` logs: the next multiple of ``every_n_steps`` or, with ``early_steps``, the
    next power of two below it. A monitor checks the schedule again only from there.

    Example:
        >>> [next_logging_step(s, 10, True) for s in (0, 1, 2, 3, 8, 9, 10, 25)]
        [1, 2, 4, 4, 10, 10, 20, 30]
    """
    after = (step // every_n_steps + 1) * every_n_steps
    power = 1 << step.bit_length()  # the first power of two above step (0: 1)
    return power if early_steps and power < min(after, every_n_steps) else after


class _Setting:
    """A field of the callback's ``config`` read and set as an attribute of the callback."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.config, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.config = dataclasses.replace(obj.config, **{self.name: value})  # validated again


class ConfiguredCallback(DiagnosticCallback):
    """A diagnostic callback whose arguments are one frozen record, ``config`` (of
    ``config_type``), from which its ``state_key`` is built.

    Subclasses set ``config_type`` and build the record in ``__init__`` from their own
    arguments: ``super().__init__(from_arguments(MyConfig, locals()), strict=strict)``.
    """

    config_type: ClassVar[type[Any] | None] = None

    def __init__(self, config: Any, strict: bool = False) -> None:
        super().__init__(strict=strict)
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.config_type is None:
            return
        for field in dataclasses.fields(cls.config_type):
            key = field.metadata.get("key", True)
            renamed = isinstance(key, str)  # its state key is another name: read via `config`
            if not renamed and not any(field.name in vars(c) for c in cls.__mro__):
                setattr(cls, field.name, _Setting(field.name))

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**key_arguments(self.config))

    def publish_verdicts(self, trainer: pl.Trainer | None, verdicts: Iterable[Verdict | None],
                         **stamp: Any) -> list[Finding]:
        """Publish each verdict of a rule (None: no verdict) as a finding of this callback,
        with ``stamp`` (e.g. the ``step`` and ``epoch`` it measured)."""
        return self.publish(trainer, [self.verdict_finding(trainer, v, **stamp)
                                      for v in verdicts if v is not None])

    def verdict_finding(self, trainer: pl.Trainer | None, verdict: Verdict,
                        **stamp: Any) -> Finding:
        """One verdict as a finding of this callback (``stamp`` as in :meth:`publish_verdicts`)."""
        v = verdict
        return self.finding(trainer, v.code, v.severity, v.message, advice=v.advice,
                            value=v.value, expected=v.expected, subject=v.subject,
                            details=v.details or {}, **stamp)


class MonitorCallback(ConfiguredCallback):
    """A monitor that measures on logging steps: see the module's docstring for the schedule
    and the lifecycle. ``config`` has ``every_n_steps`` and ``early_steps``.

    Subclasses implement :meth:`_arm` and :meth:`_finish`, and, if they need them,
    :meth:`_optimizer_step` and :meth:`_poll`; they extend :meth:`_abandon` to drop what a
    logging step left pending.
    """

    def __init__(self, config: Any, strict: bool = False) -> None:
        super().__init__(config, strict=strict)
        self._armed = False  # a logging step is being measured
        self._logging_step = -1  # the optimizer step armed last
        self._next_check = 0  # no logging step below it after the last step checked
        self._checked: Any = None  # the config `_next_check` was found with
        #: Samples (the batches' first dimension) and batches the armed logging step has seen.
        self.seen_samples = self.seen_batches = 0
        # the armed-step hooks this class leaves to the base (a subclass's own run every batch)
        self._idle_hooks = tuple(name for name in ARMED_HOOKS
                                 if getattr(type(self), name) is getattr(MonitorCallback, name))

    def is_logging_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is measured (the schedule in the module docstring)."""
        return is_logging_step(step, self.config.every_n_steps, self.config.early_steps)

    @property
    def logging_step(self) -> int:
        """The optimizer step being measured, or measured last (-1: none yet in this fit)."""
        return self._logging_step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # the usual step: nothing to do (unless the schedule was replaced since)
        if step < self._next_check and not self._armed and self._checked is self.config:
            return
        if step == self._logging_step:  # another micro-batch of the step armed last
            if self._armed:
                self._count(batch)
            return
        if self._armed:  # the step moved on without completing its measurement
            if self._keeps_measuring():
                self._count(batch)
                return
            self._abandon()
        c = self._checked = self.config
        self._next_check = next_logging_step(step, c.every_n_steps, c.early_steps)
        if self.is_logging_step(step):
            self._armed, self._logging_step = True, step
            self.seen_samples = self.seen_batches = 0
            self._count(batch)
            self._listen(True)
            self._arm(trainer, pl_module)

    def _count(self, batch: Any) -> None:
        """Add a batch of the armed step to :attr:`seen_samples` and :attr:`seen_batches`."""
        size = _batch_size(batch)
        self.seen_samples += self._unknown_size if size is None else size
        self.seen_batches += 1

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._armed:
            self._optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._poll(trainer)
        if self._armed and self._finish(trainer, pl_module):
            self._armed = False
        self._listen(self._armed or self._waiting())

    def _listen(self, on: bool) -> None:
        """Put the armed-step hooks back (``on``), or shadow them with None on the instance
        (Lightning then skips them; the class keeps them, so a ``super()`` call still works)."""
        if on:
            for name in self._idle_hooks:
                self.__dict__.pop(name, None)
        else:
            self.__dict__.update(dict.fromkeys(self._idle_hooks))

    def _arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start measuring the logging step :attr:`logging_step` (e.g. put module hooks on)."""

    def _optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                        optimizer: torch.optim.Optimizer) -> None:
        """An optimizer of the armed step is about to step (gradients final)."""

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Measure what the armed step left pending; True when its measurement is complete."""
        return True

    @property
    def _unknown_size(self) -> int:
        """The samples a batch of unknown size counts for: enough for any rule (it is judged
        alone, as when batches were not counted)."""
        return int(getattr(self.config, "min_samples", 1))

    def _keeps_measuring(self) -> bool:
        """Whether an armed logging step whose measurement is not complete goes on into the
        next optimizer steps (a rule that judges over several batches, e.g. enough samples when
        batches are small); False (default): what it left is dropped and the schedule goes on."""
        return False

    def _poll(self, trainer: pl.Trainer) -> None:
        """At every batch end while :meth:`_waiting` or armed: take in work finished off the
        training thread (must return at once when there is none)."""

    def _waiting(self) -> bool:
        """Whether work started on a logging step is still to be taken in by :meth:`_poll`
        (``on_train_batch_end`` runs on every batch until it is)."""
        return False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._armed, self._logging_step, self._next_check = False, -1, 0
            self._listen(False)

    def _abandon(self) -> None:
        """Disarm and drop what the armed step left pending, its module hooks included
        (subclasses extend it with what else they keep)."""
        self._armed = False
        self.hooks.remove_all()
        self._listen(self._waiting())

    @override
    def _release(self) -> None:
        super()._release()
        self._abandon()

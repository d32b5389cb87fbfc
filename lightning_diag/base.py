"""The base class every diagnostic callback derives from, and the shared module-hook registry.

A diagnostic callback collects :class:`~lightning_diag.findings.Finding` objects in ``.findings``
(reset at each ``fit``), publishes each to Python logging, to Lightning's rank-zero warnings (WARN
and FAIL), and to TensorBoard (a markdown table under ``diagnostics/<Check>``, numbers as scalars),
and raises :class:`~lightning_diag.findings.DiagnosticError` on a FAIL when ``strict=True``.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.base import DiagnosticCallback, findings
    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> findings(trainer)
    []
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle

from lightning_diag.batch import NoLossError
from lightning_diag.findings import DiagnosticError, DiagnosticWarning, Finding, Severity
from lightning_diag.isolation import first_batches, preserved_rng, train_dataloader_of
from lightning_diag.tensorboard.writer import log_scalars, tensorboard_writer

__all__ = ["DiagnosticCallback", "FitStartCheck", "HookRegistry", "findings", "refuse_sharded"]

log = logging.getLogger("lightning_diag")

_LOG_LEVEL = {
    Severity.INFO: logging.INFO, Severity.WARN: logging.WARNING, Severity.FAIL: logging.ERROR
}


SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def refuse_sharded(trainer: pl.Trainer, who: str, why: str) -> None:
    """Raise a clear error at setup when the trainer shards the weights across ranks.

    Matched by class name along the strategy's MRO, so subclasses are caught without importing
    optional backends (DeepSpeed).

    Raises:
        ValueError: naming ``who``, the strategy and what to use instead.
    """
    names = {c.__name__ for c in type(trainer.strategy).__mro__}
    hit = next((n for n in SHARDED_STRATEGIES if n in names), None)
    if hit is not None:
        raise ValueError(
            f"{who} does not support the sharded strategy {type(trainer.strategy).__name__} "
            f"({hit}): {why}. Use DDP or a single device, or remove {who}."
        )


class HookRegistry:
    """Keeps every module hook handle a callback registers, so that all can be removed at once.

    Example:
        >>> import torch
        >>> hooks = HookRegistry()
        >>> layer = torch.nn.Linear(2, 2)
        >>> hooks.add(layer.register_forward_hook(lambda m, i, o: None))
        >>> len(hooks), len(layer._forward_hooks)
        (1, 1)
        >>> hooks.remove_all(); len(layer._forward_hooks)
        0
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def forward(self, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
        """Register a forward hook on ``module`` and keep its handle."""
        self.add(module.register_forward_hook(fn))

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


class DiagnosticCallback(pl.Callback):
    """Base class: finding collection, publication, strict mode, and hook cleanup.

    Subclasses set ``slug`` (the short name used in tags and codes, e.g. ``"overfit"``) and call
    :meth:`publish` with the findings of each check they run.

    Args:
        strict: When True, a FAIL finding raises :class:`DiagnosticError` as soon as it is
            published.
    """

    slug: ClassVar[str] = "diag"

    def __init__(self, strict: bool = False) -> None:
        if not isinstance(strict, bool):
            raise TypeError(f"`strict` must be a bool, got {strict!r}.")
        self.strict = strict
        self.findings: list[Finding] = []
        self.hooks = HookRegistry()
        self._said_no_tensorboard = False

    @property
    def check_name(self) -> str:
        return type(self).__name__

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
        """Record, log and (in strict mode) raise on a batch of findings from one check."""
        batch = [self._stamped(trainer, f) for f in new]
        if not batch:
            return batch
        self.findings.extend(batch)
        for f in batch:
            log.log(_LOG_LEVEL[f.severity], f.format())
            if f.severity >= Severity.WARN:
                rank_zero_warn(f.format(), category=DiagnosticWarning)
        if trainer is not None:
            self._write_tensorboard(trainer, batch)
        failures = [f for f in batch if f.severity is Severity.FAIL]
        if self.strict and failures:
            raise DiagnosticError(failures)
        return batch

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

    def _write_tensorboard(self, trainer: pl.Trainer, batch: list[Finding]) -> None:
        step = trainer.global_step
        numbers = {
            f"diagnostics/{self.check_name}/{f.code}": float(f.value)
            for f in batch
            if isinstance(f.value, (int, float))
        }
        log_scalars(trainer, numbers, step)
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        rows = "\n".join(f.to_markdown_row() for f in batch)
        table = "| severity | code | message | advice |\n|---|---|---|---|\n" + rows
        writer.add_text(f"diagnostics/{self.check_name}", table, global_step=step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.findings = []
            self._said_no_tensorboard = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.hooks.remove_all()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.hooks.remove_all()


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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            if self.copies_module:
                refuse_sharded(trainer, self.check_name,
                               "its side experiment runs on a full copy of the module")
            self.done = False  # a checkpoint restored after setup sets it back

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reason = self._skip_reason(trainer, pl_module)
        if reason:
            self.publish(trainer, [self.skipped(trainer, f"{reason}.")])
            return
        try:
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

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))


def findings(trainer: pl.Trainer) -> list[Finding]:
    """All findings of every diagnostic callback attached to ``trainer``, in callback order."""
    out: list[Finding] = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, DiagnosticCallback):
            out.extend(cb.findings)
    return out

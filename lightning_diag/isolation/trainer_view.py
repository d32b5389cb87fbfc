"""What a copy of the module sees as ``self.trainer``: the run's own values, nothing it can change.

A deep copy of a LightningModule has no Trainer (Lightning drops it when copying), so a
``training_step`` that reads ``self.trainer.current_epoch``, ``self.global_step`` or
``self.trainer.datamodule`` raised on every side experiment. :class:`TrainerView` stands in for
the Trainer on the copy: every attribute it does not answer itself is read from the real
Trainer (the epoch, the global step, the datamodule, ``max_epochs``, the estimated stepping
batches...), and everything the copy writes stays on the view. It answers itself what could
leak out of the side experiment:

- **logging**: ``logger``/``loggers`` are Lightning's ``DummyLogger`` (every call of its
  experiment swallowed); the copy's ``self.log``/``self.log_dict`` are no-ops
  (:func:`~lightning_diag.isolation.copies.clone_module`).
- **optimizers** (manual optimization): ``self.optimizers()``, ``self.lr_schedulers()``,
  ``self.trainer.optimizers`` and ``toggle_optimizer`` get the copy's own optimizers, built from
  the copy's ``configure_optimizers`` on first use; ``optimizer.step()`` and ``zero_grad()``
  change nothing (a closure passed to ``step`` is evaluated), and ``self.manual_backward(loss)``
  records the loss instead of backpropagating it. A side experiment then takes the one recorded
  loss as the step's loss (:meth:`TrainerView.step_loss`), computes its gradients and steps its
  own optimizer, as it does for automatic optimization: the real optimizers and weights are never
  touched.

Example:
    >>> import torch, lightning.pytorch as pl
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.automatic_optimization = False
    ...         self.w = torch.nn.Parameter(torch.ones(2))
    ...     def training_step(self, batch, batch_idx):
    ...         opt = self.optimizers()
    ...         loss = (self.w * batch).sum() * (1 + self.current_epoch)
    ...         opt.zero_grad()
    ...         self.manual_backward(loss)
    ...         opt.step()
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=1.0)
    >>> net = Net()
    >>> view = TrainerView(None, net)
    >>> net.trainer = view
    >>> view.begin_step()
    >>> out = net.training_step(torch.ones(2), 0)
    >>> view.step_loss(out).item(), net.w.tolist()  # the loss recorded, the weights unchanged
    (2.0, [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.types import LRSchedulerConfig

from lightning_diag.batch import NoLossError, loss_from_output
from lightning_diag.isolation.optimization import configured_optimizers

__all__ = ["TrainerView"]

#: What a view without a Trainer answers: a fresh default Trainer's values, for the
#: LightningModule methods that read them (``clip_gradients`` reads the clipping settings and
#: calls the precision plugin).
_WITHOUT_TRAINER: dict[str, Callable[[], Any]] = {
    "current_epoch": lambda: 0, "global_step": lambda: 0, "max_epochs": lambda: None,
    "gradient_clip_val": lambda: None, "gradient_clip_algorithm": lambda: None,
    "accumulate_grad_batches": lambda: 1, "precision_plugin": Precision,
    "is_global_zero": lambda: True, "world_size": lambda: 1, "global_rank": lambda: 0,
    "local_rank": lambda: 0}


class TrainerView:
    """Stands in for the Trainer on a copy of the module (see the module docstring).

    Args:
        trainer: The real Trainer, read through; None for a module checked without one (the
            epoch and global step then read 0, as on a module without a Trainer).
        module: The copy this view belongs to (``self.trainer.lightning_module``).
    """

    def __init__(self, trainer: pl.Trainer | None, module: pl.LightningModule) -> None:
        self._real = trainer
        self.lightning_module = module
        self.logger = DummyLogger() if trainer is not None and trainer.loggers else None
        self.loggers = [self.logger] if self.logger is not None else []
        self.strategy = _StrategyView(self)
        self.should_stop = False
        self._optimizers: list[torch.optim.Optimizer] | None = None
        self._schedulers: list[LRSchedulerConfig] = []
        self._wrapped: list[LightningOptimizer] = []
        #: The losses ``manual_backward`` received since :meth:`begin_step`.
        self.recorded: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        # only what the view does not hold itself: read from the real Trainer
        real = self.__dict__.get("_real")
        if real is not None:
            return getattr(real, name)
        if name in _WITHOUT_TRAINER:
            return _WITHOUT_TRAINER[name]()
        raise AttributeError(f"`self.trainer.{name}`: this copy of the module is checked "
                             "without a Trainer.")

    @property
    def callback_metrics(self) -> dict[str, Any]:
        """A copy of the real Trainer's: what the copy changes in it stays here."""
        return dict(getattr(self._real, "callback_metrics", {}))

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The copy's own optimizers, from its ``configure_optimizers`` (built on first use)."""
        if self._optimizers is None:
            optimizers, schedulers = configured_optimizers(self.lightning_module)
            self._schedulers = [LRSchedulerConfig(s) for s in schedulers]
            self._wrapped = [_CopyOptimizer(o, self.strategy) for o in optimizers]
            self._optimizers = optimizers
        return self._optimizers

    @property
    def lr_scheduler_configs(self) -> list[LRSchedulerConfig]:
        _ = self.optimizers
        return self._schedulers

    @property
    def lightning_optimizers(self) -> list[LightningOptimizer]:
        _ = self.optimizers
        return self._wrapped

    def begin_step(self) -> None:
        """Forget the recorded losses; under manual optimization, refuse a step of several
        optimizers (raises :class:`~lightning_diag.batch.NoLossError`, a skip)."""
        self.recorded.clear()
        if self.lightning_module.automatic_optimization:
            return
        count = len(self.optimizers)
        if count > 1:
            raise NoLossError(
                f"manual optimization with {count} optimizers: the step updates them one after "
                "the other (a GAN-style step, each loss meant for its own optimizer), so no one "
                "loss of the weights can be judged for the whole step")

    def step_loss(self, output: Any) -> torch.Tensor:
        """The loss of one step: the one ``manual_backward`` received under manual
        optimization, else the loss the step returned.

        Raises:
            NoLossError: several ``manual_backward`` calls in the step, or no loss at all.
        """
        if self.lightning_module.automatic_optimization or not self.recorded:
            return loss_from_output(output)
        if len(self.recorded) > 1:
            raise NoLossError(
                f"manual optimization: `training_step` called `manual_backward` "
                f"{len(self.recorded)} times, so the step has no one loss to judge")
        return self.recorded[0]


class _StrategyView:
    """The strategy as a copy sees it: its own optimizers, ``backward`` recorded, ``optimizer_step``
    evaluating the closure only; anything else read from the real strategy."""

    def __init__(self, view: TrainerView) -> None:
        self._view = view

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__["_view"]._real
        if real is None:
            raise AttributeError(f"`self.trainer.strategy.{name}`: this copy of the module is "
                                 "checked without a Trainer.")
        return getattr(real.strategy, name)

    @property
    def lightning_module(self) -> pl.LightningModule:
        return self._view.lightning_module

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._view.optimizers

    @property
    def _lightning_optimizers(self) -> list[LightningOptimizer]:
        return self._view.lightning_optimizers

    def backward(self, loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        """``manual_backward``: the loss is recorded; the side experiment backpropagates it."""
        self._view.recorded.append(loss)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        """``optimizer.step(closure)``: the closure runs (it computes the loss), nothing steps."""
        # what a real step marks, so that a scheduler the step then steps does not warn that
        # the optimizer never stepped
        optimizer._opt_called = True
        return closure()


class _CopyOptimizer(LightningOptimizer):
    """The copy's optimizer as ``self.optimizers()`` hands it out: ``step`` goes to the view's
    strategy (the closure only), ``zero_grad`` does nothing (the side experiment owns the
    gradients)."""

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: _StrategyView) -> None:
        super().__init__(optimizer)
        self._strategy = strategy  # type: ignore[assignment]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the side experiment clears the gradients it computes."""

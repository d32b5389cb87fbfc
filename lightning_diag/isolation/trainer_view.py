"""What a copy of the module sees as ``self.trainer``: the run's own values, nothing it can change.

A deep copy of a LightningModule has no Trainer (Lightning drops it when copying), so a
``training_step`` that reads ``self.trainer.current_epoch``, ``self.global_step`` or
``self.trainer.datamodule`` raised on every side experiment. :class:`TrainerView` stands in for
the Trainer on the copy. It is an allow-list:

- **read from the real Trainer**: the run's read-only facts (:data:`READ_THROUGH`: the epoch,
  the global step, the datamodule, ``max_epochs``, ``estimated_stepping_batches``, the ranks,
  the precision, the stage flags...), everything Lightning's own ``LightningModule`` reads
  from its trainer included; ``callback_metrics``, ``logged_metrics``,
  ``progress_bar_metrics`` and ``state`` as copies; ``train_dataloader``/``val_dataloaders``
  as views giving their length and settings but no iterator (iterating would draw the run's
  next shuffling); ``lightning_module``/``model`` are the copy.
- **answered by the view**: what could leak out of the side experiment.

  - *logging*: ``logger``/``loggers`` are Lightning's ``DummyLogger`` (every call of its
    experiment swallowed); the copy's ``self.log``/``self.log_dict`` are no-ops
    (:func:`~lightning_diag.isolation.copies.clone_module`); ``progress_bar_callback`` is None
    (``self.print`` prints).
  - *optimizers* (manual optimization): ``self.optimizers()``, ``self.lr_schedulers()``,
    ``self.trainer.optimizers`` and ``toggle_optimizer`` get the copy's own optimizers, built
    from the copy's ``configure_optimizers`` on first use; ``optimizer.step()`` and
    ``zero_grad()`` change nothing (a closure passed to ``step`` is evaluated), and
    ``self.manual_backward(loss)`` records the loss instead of backpropagating it (the
    trainable parameters get a zero ``.grad`` where they have none, so that code reading the
    gradients after it runs). ``self.clip_gradients(...)`` is recorded too
    (:attr:`TrainerView.clips`): a side experiment that trains applies it after its own
    backward, as the main run does, and one that does not (the gradient check) ignores it.
    A side experiment then takes the one recorded loss as the step's loss
    (:meth:`TrainerView.step_loss`), computes its gradients and steps its own optimizer, as
    it does for automatic optimization: the real optimizers and weights are never touched.

- **anything else** (``save_checkpoint``, ``fit_loop``, ``callbacks``, ``train_dataloader``,
  ``strategy.checkpoint_io``...) raises :class:`~lightning_diag.batch.RefusedOnACopy`: on
  the copy it could act on the real run (write a file, stop it, advance its loops or its
  sampler), so the check steps aside (``<slug>.skipped`` naming the attribute). What the copy
  writes on the view stays on the view (``self.trainer.should_stop = True`` stops nothing).

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

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.utils.data import DataLoader

from lightning_diag.batch import NoLossError, RefusedOnACopy, loss_from_output
from lightning_diag.isolation.optimization import configured_optimizers

__all__ = ["READ_THROUGH", "TrainerView"]

#: What a copy reads from the real Trainer: the run's read-only facts (numbers, flags, strings,
#: the datamodule), every one that Lightning's ``LightningModule`` reads from its trainer
#: included (the epoch, the step and the ranks for its properties; the clipping settings for
#: ``clip_gradients``).
READ_THROUGH = frozenset({
    # where the run is
    "current_epoch", "global_step", "is_last_batch", "num_training_batches", "num_val_batches",
    "num_sanity_val_steps", "estimated_stepping_batches", "training", "validating", "testing",
    "predicting", "sanity_checking", "interrupted", "received_sigterm", "ckpt_path",
    # how it was configured
    "max_epochs", "min_epochs", "max_steps", "min_steps", "limit_train_batches",
    "limit_val_batches", "limit_test_batches", "limit_predict_batches", "val_check_interval",
    "check_val_every_n_epoch", "log_every_n_steps", "accumulate_grad_batches",
    "gradient_clip_val", "gradient_clip_algorithm", "precision", "fast_dev_run",
    "overfit_batches", "reload_dataloaders_every_n_epochs", "barebones",
    # the processes
    "world_size", "global_rank", "local_rank", "node_rank", "num_nodes", "num_devices",
    "device_ids", "is_global_zero",
    # the data's owner
    "datamodule"})

#: Read from the real Trainer as copies: what the copy changes in them stays on the view.
_COPIED = ("callback_metrics", "logged_metrics", "progress_bar_metrics", "state")
_METRICS = ("callback_metrics", "logged_metrics", "progress_bar_metrics")

#: The run's dataloaders, seen through :class:`_LoaderView`: their length and settings, never an
#: iterator (``len(self.trainer.train_dataloader)`` for a scheduler's steps per epoch).
_LOADERS = ("train_dataloader", "val_dataloaders")

#: What a view without a Trainer answers: a fresh default Trainer's values, for the
#: LightningModule methods that read them (``clip_gradients`` reads the clipping settings).
_WITHOUT_TRAINER: dict[str, Callable[[], Any]] = {
    "current_epoch": lambda: 0, "global_step": lambda: 0, "max_epochs": lambda: None,
    "gradient_clip_val": lambda: None, "gradient_clip_algorithm": lambda: None,
    "accumulate_grad_batches": lambda: 1, "precision": lambda: "32-true",
    "is_global_zero": lambda: True, "world_size": lambda: 1, "global_rank": lambda: 0,
    "local_rank": lambda: 0, "node_rank": lambda: 0, "barebones": lambda: False}


def _refuse(where: str) -> RefusedOnACopy:
    return RefusedOnACopy(
        f"`{where}` is not offered to a side experiment: lightning_diag runs the step on a copy "
        "of the model, where anything but the run's read-only facts could act on the real run "
        "(write a file, stop it, advance its loops or its sampler), so the check stepped aside "
        "rather than call it. The copy reads the epoch, the step, the ranks, the configured "
        "limits, the datamodule and copies of the logged metrics (see "
        "`lightning_diag.isolation.trainer_view`).")


class TrainerView:
    """Stands in for the Trainer on a copy of the module (see the module docstring).

    Args:
        trainer: The real Trainer, read through; None for a module checked without one (the
            epoch and global step then read 0, as on a module without a Trainer).
        module: The copy this view belongs to (``self.trainer.lightning_module``).

    Raises:
        RefusedOnACopy: (on reading) an attribute that is neither one of the run's read-only
            facts (:data:`READ_THROUGH`) nor answered by the view.
    """

    def __init__(self, trainer: pl.Trainer | None, module: pl.LightningModule) -> None:
        self._real = trainer
        self.lightning_module = module
        self.model = module
        self.logger = DummyLogger() if trainer is not None and trainer.loggers else None
        self.loggers = [self.logger] if self.logger is not None else []
        self.progress_bar_callback = None
        self.precision_plugin = _PrecisionView(self)
        self.strategy = _StrategyView(self)
        self.should_stop = False
        self._optimizers: list[torch.optim.Optimizer] | None = None
        self._schedulers: list[LRSchedulerConfig] = []
        self._wrapped: list[LightningOptimizer] = []
        #: The losses ``manual_backward`` received since :meth:`begin_step`.
        self.recorded: list[torch.Tensor] = []
        #: The ``clip_gradients`` calls since :meth:`begin_step`: ``(value, "norm" | "value")``.
        self.clips: list[tuple[float, str]] = []

    def __getattr__(self, name: str) -> Any:
        # only what the view does not hold itself
        if name.startswith("__"):  # copy, pickle and friends probing for their protocols
            raise AttributeError(name)
        real = self.__dict__.get("_real")
        if name in _COPIED and real is not None:
            return copy.copy(getattr(real, name))
        if name in _LOADERS and real is not None:
            return _loaders_view(getattr(real, name), f"self.trainer.{name}")
        if name in _METRICS:  # none logged without a Trainer
            return {}
        if name not in READ_THROUGH and name not in _COPIED and name not in _LOADERS:
            raise _refuse(f"self.trainer.{name}")
        if real is not None:
            return getattr(real, name)
        if name in _WITHOUT_TRAINER:
            return _WITHOUT_TRAINER[name]()
        raise AttributeError(f"`self.trainer.{name}`: this copy of the module is checked "
                             "without a Trainer.")

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
        """Forget the recorded losses and clips; under manual optimization, refuse a step of
        several optimizers (raises :class:`~lightning_diag.batch.NoLossError`, a skip)."""
        self.recorded.clear()
        self.clips.clear()
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


#: What the strategy view reads from the real strategy: facts, and the collectives (every rank
#: runs the same side experiments on the same batches; ``self.all_gather`` goes through them).
_STRATEGY_READ_THROUGH = frozenset({
    "root_device", "world_size", "global_rank", "local_rank", "node_rank", "num_nodes",
    "num_processes", "is_global_zero", "all_gather", "reduce", "broadcast", "barrier",
    "reduce_boolean_decision"})


class _StrategyView:
    """The strategy as a copy sees it: its own optimizers, ``backward`` recorded, ``optimizer_step``
    evaluating the closure only; the facts and collectives of :data:`_STRATEGY_READ_THROUGH`
    read from the real strategy, anything else refused."""

    def __init__(self, view: TrainerView) -> None:
        self._view = view
        self.precision_plugin = view.precision_plugin

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in _STRATEGY_READ_THROUGH:
            raise _refuse(f"self.trainer.strategy.{name}")
        real = self.__dict__["_view"]._real
        if real is None:
            raise AttributeError(f"`self.trainer.strategy.{name}`: this copy of the module is "
                                 "checked without a Trainer.")
        return getattr(real.strategy, name)

    @property
    def lightning_module(self) -> pl.LightningModule:
        return self._view.lightning_module

    @property
    def model(self) -> pl.LightningModule:
        return self._view.lightning_module

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._view.optimizers

    @property
    def _lightning_optimizers(self) -> list[LightningOptimizer]:
        return self._view.lightning_optimizers

    def backward(self, loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        """``manual_backward``: the loss is recorded; the side experiment backpropagates it.
        The trainable parameters without a gradient get a zero one, as after a real backward,
        so that what the step does with ``.grad`` next (``clip_grad_value_``, which refuses an
        empty list) runs."""
        self._view.recorded.append(loss)
        for p in self._view.lightning_module.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        """``optimizer.step(closure)``: the closure runs (it computes the loss), nothing steps."""
        # what a real step marks, so that a scheduler the step then steps does not warn that
        # the optimizer never stepped
        optimizer._opt_called = True
        return closure()


class _PrecisionView:
    """The precision plugin as a copy sees it: ``clip_gradients`` recorded (the gradients it
    would clip are not the step's yet: ``manual_backward`` only recorded the loss), its
    precision read; anything else refused."""

    def __init__(self, view: TrainerView) -> None:
        self._view = view

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "precision":
            return self.__dict__["_view"].precision
        raise _refuse(f"self.trainer.precision_plugin.{name}")

    def clip_gradients(self, optimizer: Any, clip_val: int | float = 0.0,
                       gradient_clip_algorithm: Any = "norm") -> None:
        """Record a clip of ``clip_val`` (nothing to do at 0, as in Lightning's plugin)."""
        if clip_val and clip_val > 0:
            algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)
            self._view.clips.append((float(clip_val), str(algorithm)))


#: What a copy reads of one of the run's DataLoaders (``sampler``, ``batch_sampler`` and
#: ``generator`` are not among them: drawing from them changes the run's batch order).
_LOADER_READ_THROUGH = frozenset({
    "dataset", "batch_size", "drop_last", "num_workers", "pin_memory", "collate_fn",
    "persistent_workers", "prefetch_factor", "timeout"})


def _loaders_view(value: Any, where: str) -> Any:
    """The run's DataLoader (or list of them) seen through :class:`_LoaderView`; anything else
    (None before the Trainer set them up, a CombinedLoader, a dict) refused."""
    if isinstance(value, DataLoader):
        return _LoaderView(value, where)
    if isinstance(value, (list, tuple)) and all(isinstance(v, DataLoader) for v in value):
        return type(value)(_LoaderView(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise _refuse(where)


class _LoaderView:
    """One of the run's DataLoaders as a copy sees it: ``len()`` and its settings; iterating it
    (which draws the run's next shuffling from its sampler's generator) is refused."""

    def __init__(self, loader: DataLoader, where: str) -> None:
        self._loader, self._where = loader, where

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Any:
        raise _refuse(f"iter({self._where})")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in _LOADER_READ_THROUGH:
            raise _refuse(f"{self.__dict__['_where']}.{name}")
        return getattr(self.__dict__["_loader"], name)


class _CopyOptimizer(LightningOptimizer):
    """The copy's optimizer as ``self.optimizers()`` hands it out: ``step`` goes to the view's
    strategy (the closure only), ``zero_grad`` does nothing (the side experiment owns the
    gradients)."""

    def __init__(self, optimizer: torch.optim.Optimizer, strategy: _StrategyView) -> None:
        super().__init__(optimizer)
        self._strategy = strategy  # type: ignore[assignment]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the side experiment clears the gradients it computes."""

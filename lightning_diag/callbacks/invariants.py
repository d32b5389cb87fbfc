"""Training invariants: the silent bugs of a training loop that no loss curve shows at once
(missing ``zero_grad``, a parameter no optimizer holds or updates, a module left in eval mode,
a metric out of range, an epoch loss that stopped matching its steps, a target leak).

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.invariants import TrainingInvariants
    >>> trainer = pl.Trainer(callbacks=[TrainingInvariants()], logger=False)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lightning_diag.base import SHARDED_STRATEGIES, DiagnosticCallback
from lightning_diag.callbacks._metric_keys import find_metric
from lightning_diag.callbacks._optimizer_watch import OptimizerSteps, Watch
from lightning_diag.checks.epoch_loss import (
    EpochSteps,
    check_epoch_loss,
    epoch_loss_names,
    matching_reductions,
)
from lightning_diag.checks.invariants import (
    ModeLayer,
    check_modes,
    check_optimizer_coverage,
    mode_layers,
)
from lightning_diag.checks.metric_range import (
    check_metric_ranges,
    known_classes,
    label_counts,
    metric_bound,
)
from lightning_diag.checks.target_leak import LeakWatch
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.monitors import is_logging_step
from lightning_diag.validation import (
    check_choice,
    check_int,
    check_number,
    check_sequence,
    check_str,
)

__all__ = ["CHECKS", "TrainingInvariants"]

#: The checks, by the last part of their finding codes (``invariants.<check>``).
CHECKS = ("grad_not_zeroed", "param_not_in_optimizer", "param_not_updated",
          "eval_mode_in_training", "metric_out_of_range", "epoch_loss_inconsistent",
          "target_leak")
#: Step losses kept before they are summed (one small device op per this many steps).
_FOLD = 256
#: Training batches whose inputs are compared with the target (and whose labels counted),
#: and epochs a leak is sought in by the loss's collapse (but for evidence judged at any epoch:
#: ``LeakEvidence.any_epoch``).
_LEAK_BATCHES, _LEAK_EPOCHS = 3, 3


class TrainingInvariants(DiagnosticCallback):
    """Checks, cheaply enough to leave on, what must hold in any training loop.

    - ``invariants.grad_not_zeroed`` (FAIL when proven, else WARN): between two steps of an
      optimizer, no backward pass found the gradient cleared (a missing ``zero_grad``). One
      small parameter per optimizer is watched by a gradient hook, on the steps of the
      schedule. Gradient accumulation, ``zero_grad(set_to_none=...)`` before or after the step,
      several optimizers (a GAN) are sound.
    - ``invariants.param_not_in_optimizer`` (WARN): trainable parameters that get a gradient
      in the first epoch but that no optimizer holds; checked after the first batch and at the
      end of the first epoch.
    - ``invariants.param_not_updated`` (WARN): parameters with a non-zero, finite gradient that
      ``optimizer.step`` left bit for bit unchanged on ``patience`` checked steps in a row,
      although their learning rate can move them (lr 0, a warm-up from 0 or a step below float
      precision is not judged; a skipped AMP step has non-finite gradients and is not judged).
    - ``invariants.eval_mode_in_training`` (WARN): the trained part of the module in eval mode
      at an optimizer step (a frozen teacher or backbone, frozen batch-norm statistics, and
      dropout disabled from the first step are not flagged).
    - ``invariants.metric_out_of_range`` (WARN): a logged accuracy, precision, recall, F1,
      AUROC, IoU, Dice, mAP... outside [0, 1] (or [0, 100] for a percentage).
    - ``invariants.epoch_loss_inconsistent`` (WARN): a logged epoch loss that matched its
      step losses at the first epoch and no longer does (a running sum never reset).
    - ``invariants.target_leak`` (WARN): an integer input holds the target at the position it
      is predicted from, and the loss collapsed in the first epochs.

    At the end of training, one INFO ``invariants.summary``: what was checked, and each check
    that stepped aside, with why. Details and assumptions: ``docs/callbacks/invariants.md``.

    Args:
        every_n_steps: Check gradients, updates and modes on optimizer steps 0, 1, 2, 4, ...
            below it and every this many steps after (per optimizer).
        patience: Checked steps in a row a parameter must stay unchanged to be flagged.
        percent_metrics: Logged names on the 0-100 scale on purpose (names with ``pct`` or
            ``percent`` are read so anyway).
        leak_fraction: The loss, as a share of the first steps' loss, at or below which the
            first epochs count as having collapsed (with the target found in the input).
        disable: Checks to turn off, among :data:`CHECKS`.
        strict: Raise on FAIL findings.

    Example:
        >>> cb = TrainingInvariants(every_n_steps=50, percent_metrics=["val_acc"])
    """

    slug = "invariants"

    def __init__(self, every_n_steps: int = 100, patience: int = 2,
                 percent_metrics: Sequence[str] = (), leak_fraction: float = 0.05,
                 disable: Sequence[str] = (), strict: bool = False) -> None:
        super().__init__(strict=strict)
        check_int("every_n_steps", every_n_steps)
        check_int("patience", patience)
        check_sequence("percent_metrics", percent_metrics, check_str, min_len=0)
        check_number("leak_fraction", leak_fraction, low=0, high=1, low_open=True,
                     high_open=True)
        check_sequence("disable", disable, lambda n, v: check_choice(n, v, CHECKS), min_len=0)
        self.every_n_steps, self.patience = every_n_steps, patience
        self.percent_metrics = tuple(percent_metrics)
        self.leak_fraction = float(leak_fraction)
        self.disable = tuple(disable)
        self._reset()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, patience=self.patience,
                                        percent_metrics=self.percent_metrics,
                                        leak_fraction=self.leak_fraction, disable=self.disable)

    def _reset(self) -> None:
        self._on = {c: c not in self.disable for c in CHECKS}
        self._aside: dict[str, str] = {}  # check -> why it stepped aside
        self._counts: dict[str, int] = dict.fromkeys(CHECKS, 0)  # what was checked
        self._optim = OptimizerSteps(self.hooks, self.patience, self._counts, self._aside)
        self._uncovered: list[tuple[str, torch.Tensor]] = []
        self._unused: list[str] = []
        self._trainable, self._flagged = 0, 0
        self._layers: list[ModeLayer] = []
        self._modules: dict[str, torch.nn.Module] = {}
        self._seen_training: set[str] = set()
        self._published: dict[tuple[str, str, str], Severity] = {}
        # step losses of the current epoch, and the sums of every epoch
        self._losses: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._sums: torch.Tensor | None = None
        self._samples, self._steps = 0, 0
        self._scale = 1.0  # undoes Lightning's division by accumulate_grad_batches
        self._first_losses: list[torch.Tensor] = []
        self._epochs: dict[int, EpochSteps] = {}
        self._end_metrics: dict[str, Any] = {}
        self._read: dict[str, Any] = {}
        self._readings: dict[str, list[float]] = {}
        self._series: dict[str, tuple[list[str], list[float], list[EpochSteps]]] = {}
        self._not_loss: dict[str, str] = {}
        self._leak = LeakWatch()
        self._labels: list[torch.Tensor] = []  # class counts of the first batches' labels
        self._label_batches = 0
        self._percent: list[str] = []
        self._resumed_epoch: int | None = None  # its steps are not all seen: not compared
        self._ended: int | None = None  # the last epoch whose end was seen, until it is read

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            self._resumed_epoch = trainer.current_epoch
        optimizers = list(trainer.optimizers)
        sharded = {c.__name__ for c in type(trainer.strategy).__mro__} & set(SHARDED_STRATEGIES)
        params = ("grad_not_zeroed", "param_not_in_optimizer", "param_not_updated")
        if sharded:
            self._stand_down(params, f"the strategy shards the parameters ({sharded.pop()})")
        elif not optimizers:
            self._stand_down(params, "no optimizer (`configure_optimizers` returned none)")
        held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        self._optim.names = {id(p): n for n, p in pl_module.named_parameters()}
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self._uncovered = [(n, p) for n, p in trainable if id(p) not in held]
        self._trainable = len(trainable)
        if self._on["param_not_in_optimizer"] and not self._uncovered:
            self._counts["param_not_in_optimizer"] = 1  # checked: nothing to follow
        if self._on["eval_mode_in_training"]:
            self._layers = mode_layers(pl_module, {id(p) for _, p in trainable if id(p) in held})
            self._modules = dict(pl_module.named_modules())
            if not any(layer.trained for layer in self._layers):
                self._stand_down(("eval_mode_in_training",), "no dropout or running-statistics "
                                 "normalization layer in the trained part: the mode has no effect")
        self._scale = float(trainer.accumulate_grad_batches) if (
            pl_module.automatic_optimization) else 1.0
        if trainer.world_size > 1:
            self._stand_down(("epoch_loss_inconsistent",), "several processes: a logged epoch "
                             "loss may be averaged over them (`sync_dist`), the steps seen here "
                             "are this process's")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        watch = self._optim.watches.get(id(optimizer))
        if watch is None:
            watch = self._optim.watches[id(optimizer)] = Watch(self._label(trainer, optimizer))
        if watch.armed and (found := self._optim.close_window(watch)) is not None:
            self._publish_once(trainer, found)
        if is_logging_step(watch.count, self.every_n_steps):
            if self._on["grad_not_zeroed"]:
                self._optim.open_window(watch, optimizer)
            if self._on["param_not_updated"]:
                self._optim.snapshot(watch, optimizer)
            if self._on["eval_mode_in_training"]:
                self._counts["eval_mode_in_training"] += 1
                found = check_modes(pl_module, self._layers, self._seen_training, self._modules)
                if found is not None:
                    self._publish_once(trainer, found)
        watch.count += 1

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._optim.pending:
            for found in self._optim.compare():
                self._publish_once(trainer, found)
        if self._uncovered and self._on["param_not_in_optimizer"] and not self._counts[
                "param_not_in_optimizer"]:
            self._coverage(trainer)  # the first batch's backward has run
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            if loss.requires_grad or loss.dim():  # automatic optimization's is a 0-d copy
                loss = loss.detach().reshape(())
            self._losses.append(loss)
            self._sizes.append(_batch_size(batch))
            if len(self._first_losses) < 3 and trainer.current_epoch == 0:
                self._first_losses.append(loss)
            if len(self._losses) >= _FOLD:
                self._fold()
        if self._leak.batches < _LEAK_BATCHES and self._on["target_leak"]:
            self._leak.add(batch)
        if self._label_batches < _LEAK_BATCHES and self._on["metric_out_of_range"]:
            self._label_batches += 1
            if (counts := label_counts(batch)) is not None:
                self._labels.append(counts)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold()
        epoch = trainer.current_epoch
        if self._sums is not None and self._steps and epoch != self._resumed_epoch:
            weighted, plain = self._sums.tolist()  # the one host copy of the epoch's losses
            self._epochs[epoch] = EpochSteps(epoch, weighted * self._scale, plain * self._scale,
                                             float(self._samples), self._steps)
        self._sums, self._samples, self._steps = None, 0, 0
        if self._uncovered and self._on["param_not_in_optimizer"] and epoch == 0:
            self._coverage(trainer)
        if self._on["epoch_loss_inconsistent"]:
            # what is here already is not computed at this epoch's end: step values, validation
            self._end_metrics = dict(trainer.callback_metrics)
        self._ended = epoch

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_metrics(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_metrics(trainer)
        self.publish(trainer, [self._summary(trainer)])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"streaks": {k: dict(v) for k, v in self._optim.streaks.items()},
                "readings": {k: list(v) for k, v in self._readings.items()},
                "series": {k: [list(r), list(logged), [dataclasses.asdict(h) for h in hist]]
                           for k, (r, logged, hist) in self._series.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optim.streaks = {str(k): {str(n): int(c) for n, c in v.items()}
                               for k, v in state_dict.get("streaks", {}).items()}
        self._readings = {str(k): [float(x) for x in v]
                          for k, v in state_dict.get("readings", {}).items()}
        self._series = {str(k): ([str(r) for r in red], [float(x) for x in logged],
                                 [EpochSteps(**h) for h in hist])
                        for k, (red, logged, hist) in state_dict.get("series", {}).items()}

    @override
    def _release(self) -> None:
        super()._release()
        # what refers to the model's tensors and modules: nothing is kept past the fit
        self._optim.release()
        self._uncovered, self._modules = [], {}
        self._losses, self._first_losses, self._sums = [], [], None

    # -- gradients and updates -----------------------------------------------------------------
    def _label(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> str:
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), None)
        return f"optimizer {index if index is not None else '?'} ({type(optimizer).__name__})"

    # -- every trainable parameter in an optimizer -------------------------------------------
    def _coverage(self, trainer: pl.Trainer) -> None:
        """After the first batch, then at the first epoch's end (a branch taken later)."""
        self._counts["param_not_in_optimizer"] += 1
        with_grad = [n for n, p in self._uncovered if p.grad is not None]
        self._unused = [n for n, p in self._uncovered if p.grad is None]
        if len(with_grad) > self._flagged:
            self._flagged = len(with_grad)
            self.publish(trainer, check_optimizer_coverage(with_grad, self._unused,
                                                           self._trainable))

    # -- logged metrics ----------------------------------------------------------------------
    def _fold(self) -> None:
        if not self._losses:
            return
        losses = torch.stack(self._losses)
        dtype = torch.float32 if losses.device.type == "mps" else torch.float64
        losses = losses.to(dtype)
        sizes = torch.tensor(self._sizes, dtype=dtype, device=losses.device)
        sums = torch.stack([(losses * sizes).sum(), losses.sum()])
        self._sums = sums if self._sums is None else self._sums + sums
        self._samples += sum(self._sizes)
        self._steps += len(self._sizes)
        self._losses, self._sizes = [], []

    def _read_metrics(self, trainer: pl.Trainer) -> None:
        """Read what was logged up to the end of the epoch that just ended (once): bounded
        metrics, the epoch losses (values computed at that epoch's end), the loss a leak would
        have collapsed to."""
        epoch, self._ended = self._ended, None
        if epoch is None:
            return
        metrics = dict(trainer.callback_metrics)
        new = {k: v for k, v in metrics.items() if self._read.get(k) is not v}
        self._read.update(metrics)
        values = {k: float(v) for k, v in new.items() if _scalar(v)}
        if self._on["metric_out_of_range"]:
            for name, value in values.items():
                if metric_bound(name, self.percent_metrics) is not None:
                    self._readings.setdefault(name, []).append(value)
            steps, initial = self._epochs.get(epoch), self._initial()
            ratio = (steps.reductions()["mean"] / initial if steps is not None and initial
                     else None)
            found, self._percent = check_metric_ranges(
                self._readings, self.percent_metrics, known_classes(self._labels), ratio)
            self._counts["metric_out_of_range"] = len(self._readings)
            for f in found:
                self._publish_once(trainer, dataclasses.replace(f, epoch=epoch))
        steps = self._epochs.get(epoch)
        if steps is None:
            return
        if self._on["epoch_loss_inconsistent"] and "epoch_loss_inconsistent" not in self._aside:
            at_end = [k for k in epoch_loss_names(values) if k in metrics
                      and self._end_metrics.get(k) is not metrics[k]]
            for name in at_end:
                self._check_epoch_loss(trainer, name, values[name], steps)
        if self._on["target_leak"]:
            self._check_leak(trainer, metrics, epoch, steps)

    def _check_epoch_loss(self, trainer: pl.Trainer, name: str, value: float,
                          steps: EpochSteps) -> None:
        if not (math.isfinite(value) and all(map(math.isfinite, steps.reductions().values()))):
            return
        series = self._series.get(name)
        if series is None:
            reductions = matching_reductions(value, steps)
            if not reductions:
                self._not_loss[name] = (f"{value:.4g} at epoch {steps.epoch}, not a mean or sum "
                                        f"of the step losses ({steps.reductions()['mean']:.4g})")
                return
            self._series[name] = (reductions, [value], [steps])
            self._not_loss.pop(name, None)
            return
        reductions, logged, history = series
        logged.append(value)
        history.append(steps)
        self._counts["epoch_loss_inconsistent"] += 1
        found = check_epoch_loss(name, logged, history, reductions)
        if found is not None:
            self._publish_once(trainer, found)

    def _check_leak(self, trainer: pl.Trainer, metrics: dict[str, Any], epoch: int,
                    steps: EpochSteps) -> None:
        initial, early = self._initial(), epoch < _LEAK_EPOCHS
        if not self._leak.strong(early) or initial is None:
            return
        val = find_metric(list(metrics), "val_loss")
        if val is not None and _scalar(metrics[val]):
            reached, source = float(metrics[val]), val
        else:
            reached, source = steps.reductions()["mean"], "the training steps' mean loss"
        self._counts["target_leak"] += 1
        found = self._leak.judge(initial, reached, source, epoch, self.leak_fraction, early)
        if found is not None:
            self._publish_once(trainer, found)

    def _initial(self) -> float | None:
        """The loss of the first steps (their mean), or None before any returned one."""
        if not self._first_losses:
            return None
        return float(torch.stack(self._first_losses).double().mean())

    # -- reporting ---------------------------------------------------------------------------
    def _stand_down(self, checks: Sequence[str], why: str) -> None:
        for check in checks:
            if self._on[check]:
                self._on[check] = False
                self._aside[check] = why

    def _publish_once(self, trainer: pl.Trainer, found: Finding) -> None:
        """Publish a fact once per fit; again only when its severity rises."""
        before = self._published.get(found.key)
        if before is not None and found.severity <= before:
            return
        self._published[found.key] = found.severity
        if found.epoch is not None and found.step is None:  # about an epoch read later
            found = dataclasses.replace(found, step=trainer.global_step)
        self.publish(trainer, [found])

    def _summary(self, trainer: pl.Trainer) -> Finding:
        if self._not_loss and not self._series:
            self._aside.setdefault("epoch_loss_inconsistent", "; ".join(
                f"`{k}` logged {v}" for k, v in self._not_loss.items()))
        aside = {c: "disabled (`disable=`)" if c in self.disable
                 else self._aside.get(c, _NOTHING_TO_CHECK[c])
                 for c in CHECKS if not self._counts[c]}
        checked = {c: n for c, n in self._counts.items() if n}
        problems = sorted({k[1] for k, s in self._published.items() if s >= Severity.WARN})
        parts = [f"{_WHAT[c].format(n=n)}" for c, n in checked.items()]
        text = (f"Training invariants: {len(checked)} of {len(CHECKS)} checks ran ("
                + "; ".join(parts) + ")" if parts else "Training invariants: no check ran")
        text += ("; stepped aside: " + "; ".join(f"{c} ({why})" for c, why in aside.items())
                 if aside else "") + "."
        if self._percent:
            text += f" Read as percentages: {', '.join(f'`{n}`' for n in self._percent)}."
        if self._unused:
            text += (f" {len(self._unused)} trainable parameter tensor(s) in no optimizer got "
                     "no gradient (unused, or run under no_grad: freeze them with "
                     "`requires_grad_(False)`).")
        return self.finding(trainer, f"{self.slug}.summary", Severity.INFO, text,
                            value=float(len(problems)),
                            details={"checked": checked, "stepped_aside": aside,
                                     "problems": problems, "percent_metrics": self._percent,
                                     "unused_parameters": self._unused})


_WHAT = {
    "grad_not_zeroed": "{n} gradient window(s) between optimizer steps",
    "param_not_in_optimizer": "optimizer coverage of the trainable parameters",
    "param_not_updated": "{n} checked update(s)",
    "eval_mode_in_training": "the mode at {n} step(s)",
    "metric_out_of_range": "{n} bounded metric(s)",
    "epoch_loss_inconsistent": "{n} epoch loss reading(s) against the step losses",
    "target_leak": "{n} epoch(s) for a target leak",
}
_NOTHING_TO_CHECK = {
    "grad_not_zeroed": "no backward pass reached a watched parameter between two checked steps",
    "param_not_in_optimizer": "every trainable parameter is in an optimizer",
    "param_not_updated": "no checked optimizer step",
    "eval_mode_in_training": "no checked optimizer step",
    "metric_out_of_range": "no bounded metric (accuracy, F1, IoU...) was logged",
    "epoch_loss_inconsistent": "no epoch loss logged over at least two epochs, or no step "
                               "returned its loss",
    "target_leak": "no input holds the target (an integer input shaped like an integer target "
                   "at its position or one before, or a float input a scalar float target at "
                   "some position)",
}


def _batch_size(batch: Any) -> int:
    """The batch size Lightning weights a logged mean by: the first dimension of the first
    tensor (read directly in the common cases, as ``extract_batch_size`` would find it)."""
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return len(first)
    try:
        return int(extract_batch_size(batch))
    except (MisconfigurationException, RecursionError):  # no tensor to size: unweighted
        return 1


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor)
                                               and value.numel() == 1)


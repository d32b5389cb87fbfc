"""EMAWeights: an exponential moving average of the weights (recipe step 7.4).

After each optimizer step the average becomes ``decay * ema + (1 - decay) * w`` (float parameters
and float buffers; integer buffers such as BatchNorm's ``num_batches_tracked`` are copied). With
``warmup=True`` the decay of update ``n + 1`` is ``min(decay, (1 + n) / (10 + n))``. The saved
average is loaded for inference by :func:`lightning_diag.inference.load_ema_weights`.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.ema import EMAWeights
    >>> ema = EMAWeights(decay=0.99, evaluate="both")
    >>> trainer = pl.Trainer(callbacks=[ema], max_epochs=1, logger=False)  # doctest: +SKIP
    >>> trainer.fit(model, datamodule)  # doctest: +SKIP
    >>> with ema.swapped(model):  # doctest: +SKIP
    ...     trainer.test(model, datamodule)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_diag.base import ConfigurationError, DiagnosticCallback, refuse_sharded
from lightning_diag.batch import loss_from_output
from lightning_diag.callbacks._ema_slots import EMASlots
from lightning_diag.callbacks._metric_keys import find_metric
from lightning_diag.callbacks._validate_copy import validate_copy
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.ema import warmup_decay
from lightning_diag.tensorboard.tags import EMA_RUN, VALIDATION_RUN, ema_comparison, ema_metric
from lightning_diag.tensorboard.writer import SiblingRuns
from lightning_diag.validation import check_choice, check_flag, check_int, check_number, require

__all__ = ["EMAWeights"]

_EVALUATE = ("ema", "raw", "both")


class EMAWeights(DiagnosticCallback):
    """Keep an exponential moving average of the weights; validate with it.

    Args:
        decay: Weight of the old average per update, in [0, 1).
        warmup: Ramp the decay up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates.
        update_every_n_steps: Update after every n-th optimizer step.
        start_step: First optimizer step (0-based) that updates the average; the average is reset
            to the weights of that step when ``start_step > 0``.
        device: Where the average lives (``"cpu"`` keeps it off the accelerator); default: with the
            weights.
        evaluate: ``"ema"`` validates with the average (raw weights restored bit-identically
            afterwards), ``"raw"`` leaves validation alone, ``"both"`` also logs every validation
            metric of the average with an ``_ema`` suffix. Only validation inside ``fit`` is
            affected; use :meth:`swapped` for ``validate``/``test``/``predict``.
        check_weights: Before each update, also check every weight for NaN/Inf (one extra fused
            pass over the weights, which costs about as much as the update itself). Off by
            default: the loss is always checked, and a non-finite loss skips the update and keeps
            the last finite average, which covers weights poisoned by a diverging step.
        strict: Raise on a FAIL finding (this callback emits none).

    At the end of training, one INFO verdict ``ema.summary``: the updates made and, with
    ``evaluate="both"``, the average against the raw weights on the monitored validation metric
    (the checkpoint's ``monitor``, else the validation accuracy, else the validation loss) and
    on every other one.
    """

    slug = "ema"

    def __init__(self, decay: float = 0.999, warmup: bool = True, update_every_n_steps: int = 1,
                 start_step: int = 0, device: str | torch.device | None = None,
                 evaluate: str = "ema", check_weights: bool = False, strict: bool = False) -> None:
        super().__init__(strict=strict)
        _check_args(decay, warmup, update_every_n_steps, start_step, device, evaluate,
                    check_weights)
        self.decay, self.warmup, self.evaluate = float(decay), warmup, evaluate
        self.check_weights = check_weights
        self.update_every_n_steps, self.start_step = update_every_n_steps, start_step
        self.device = torch.device(device) if device is not None else None
        self.num_updates = 0
        self.num_skipped = 0
        self._last_step = 0
        self._slots: EMASlots | None = None  # built at fit start
        self._pending: dict[str, Any] | None = None
        self._runs = SiblingRuns()

    @property
    @override
    def state_key(self) -> str:
        # what the average depends on; `device`, `evaluate` and `check_weights` may change on resume
        return self._generate_state_key(decay=self.decay, warmup=self.warmup,
                                        update_every_n_steps=self.update_every_n_steps,
                                        start_step=self.start_step)

    # --- lifecycle -------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        refuse_sharded(trainer, "EMAWeights", "each rank holds only a shard of the weights")
        _refuse_clashing_evaluation(trainer, self)
        # a new fit starts a new average; a checkpoint restored after setup sets these back
        self.num_updates = self.num_skipped = self._last_step = 0
        self._slots, self._pending = None, None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # a chain of Lightning properties: read once a batch
        if step > self._last_step:  # an optimizer step happened (accumulation)
            self._last_step = step
            self._maybe_update(trainer, outputs, step - 1)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _in_fit(trainer) and self._slots is not None:
            self._slots.sync_ranks(trainer)
        if self.evaluate == "ema" and _in_fit(trainer) and self.num_updates:
            self._built().swap_in()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._slots is not None:
            self._slots.sync_ranks(trainer)
        self.publish(trainer, [self._summary(trainer)])

    def _summary(self, trainer: pl.Trainer) -> Finding:
        """The INFO verdict ``ema.summary``: EMA vs raw weights on the validation metrics."""
        made = (f"EMA of {self.num_updates} update(s) (decay {self.decay:g}"
                + (f", {self.num_skipped} skipped on a non-finite loss" if self.num_skipped
                   else "") + ")")
        metrics = trainer.callback_metrics
        pairs = {k: (float(metrics[ema_metric(k)]), float(v)) for k, v in metrics.items()
                 if ema_metric(k) in metrics and v.numel() == 1}
        code = f"{self.slug}.summary"
        if not pairs:
            how = {"ema": "validation ran with the average, the raw weights were not validated",
                   "raw": "validation ran with the raw weights, the average was not validated",
                   "both": "no validation ran after an update, nothing was compared"}
            return self.finding(trainer, code, Severity.INFO,
                                f"{made}: {how[self.evaluate]}.",
                                advice="" if self.evaluate == "both" else
                                "Pass `evaluate='both'` to validate both and compare them.")
        checkpoint = trainer.checkpoint_callback
        monitor = getattr(checkpoint, "monitor", None)
        acc, loss = find_metric(pairs, "val_acc"), find_metric(pairs, "val_loss")
        key = monitor if monitor in pairs else acc or loss or sorted(pairs)[0]
        higher = (getattr(checkpoint, "mode", "min") == "max" if key == monitor else
                  None if key not in (acc, loss) else key == acc)  # is higher better?
        ema, raw = pairs[key]
        verdict = ("equal" if ema == raw else f"the average is {'higher' if ema > raw else 'lower'}"
                   if higher is None else "the average is better" if (ema > raw) == higher
                   else "the raw weights are better")
        others = "; ".join(f"`{k}` {e:.4g} vs {r:.4g}" for k, (e, r) in sorted(pairs.items())
                           if k != key)
        return self.finding(
            trainer, code, Severity.INFO,
            f"{made}: `{key}` EMA {ema:.4g} vs raw {raw:.4g} ({ema - raw:+.3g}, {verdict})"
            + (f"; {others}" if others else "") + ".",
            value=ema - raw, details={"monitor": key, "ema_vs_raw": pairs})

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._undo_hook_swap() and self.evaluate == "both" and _in_fit(trainer) \
                and self.num_updates:
            averaged = validate_copy(trainer, pl_module, self.ema_state_dict())
            for key, value in averaged.items():
                pl_module.log(ema_metric(key), value, on_step=False, on_epoch=True, sync_dist=True)
            self._log_comparison(trainer, averaged)

    def _log_comparison(self, trainer: pl.Trainer, averaged: dict[str, float]) -> None:
        """Each metric of the trained weights (as the validation loop just logged it, in the run
        ``validation`` that holds the validation curves) and of the average (run ``ema``) under
        one tag per epoch: one chart, two colours."""
        logged = trainer.callback_metrics
        raw = {key: float(logged[key]) for key in averaged if key in logged}
        self._runs.log(trainer, {VALIDATION_RUN: {ema_comparison(k): v for k, v in raw.items()},
                                 EMA_RUN: {ema_comparison(k): v for k, v in averaged.items()}},
                       trainer.current_epoch)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._slots is not None and self._slots.swapped_in:
            raw = self._slots.raw_state()  # saved mid-swap: the training slot gets the raw ones
            checkpoint["state_dict"] = {k: raw.get(k, v) for k, v in
                                        checkpoint["state_dict"].items()}

    @override
    def _release(self) -> None:
        self._undo_hook_swap()
        super()._release()
        self._runs.close()

    # --- the average -----------------------------------------------------------------------
    def _build(self, module: nn.Module) -> None:
        self._slots = EMASlots(module, self.device)
        pending, self._pending = self._pending, None
        if pending is not None:
            self._slots.load(pending["ema"])

    def _maybe_update(self, trainer: pl.Trainer, outputs: Any, step: int) -> None:
        """Update the average after optimizer step ``step`` (0-based) when it is due."""
        start = self.start_step
        if step < start or (step - start) % self.update_every_n_steps:
            return
        slots = self._slots if self._slots is not None else self._built()
        if not (_finite_loss(outputs) and (not self.check_weights or slots.weights_finite())):
            self._skip(trainer)
            return
        n = self.num_updates
        slots.update(0.0 if not n and start > 0 else warmup_decay(self.decay, n, self.warmup))
        self.num_updates = n + 1

    def _skip(self, trainer: pl.Trainer) -> None:
        self.num_skipped += 1
        if self.num_skipped == 1:
            self.publish(trainer, [self.finding(
                trainer, "ema.non_finite", Severity.WARN,
                f"Non-finite loss or weights at step {trainer.global_step}: the EMA update was "
                "skipped and the last finite average kept (later ones are skipped silently).",
                advice="The run is diverging: lower the learning rate (recipe step 5).",
                value=float(trainer.global_step))])

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged state, keyed exactly like ``pl_module.state_dict()`` (detached copies)."""
        return {k: t.detach().clone() for k, t in self._built().state().items()}

    # --- swapping --------------------------------------------------------------------------
    @contextmanager
    def swapped(self, pl_module: nn.Module) -> Iterator[nn.Module]:
        """Use the averaged weights inside the block; the raw ones come back bit-identically."""
        with self._built().swapped(pl_module):
            yield pl_module

    def _undo_hook_swap(self) -> bool:
        """Put back the raw weights a hook swapped out (never those of a `swapped()` block)."""
        if self._slots is None or not self._slots.swapped_in or self._slots.pinned:
            return False
        self._slots.restore()
        return True

    def _built(self) -> EMASlots:
        if self._slots is None:
            raise RuntimeError("EMAWeights has no average yet: call trainer.fit first.")
        return self._slots

    # --- checkpointing ---------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        ema = self._slots.state() if self._slots is not None else (
            (self._pending or {}).get("ema", {}))
        # `decay` lets load_ema_weights(decay=...) pick this average among several
        return {"ema": ema, "num_updates": self.num_updates, "num_skipped": self.num_skipped,
                "last_step": self._last_step, "decay": self.decay}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self.num_skipped = int(state_dict.get("num_skipped", 0))
        self._last_step = int(state_dict["last_step"])
        if self._slots is not None:
            self._slots.load(state_dict["ema"])
        else:  # restored before fit start: copied in once the slots exist
            self._pending = state_dict


def _check_args(decay: Any, warmup: Any, update_every_n_steps: Any, start_step: Any,
                device: Any, evaluate: Any, check_weights: Any) -> None:
    """Check the arguments of EMAWeights (see :mod:`lightning_diag.validation`)."""
    check_number("decay", decay, low=0, high=1, high_open=True)
    check_flag("warmup", warmup)
    check_int("update_every_n_steps", update_every_n_steps)
    check_int("start_step", start_step, low=0)
    allowed = "a torch.device, a device name such as 'cpu' or 'cuda:0', or None"
    require(device is None or isinstance(device, (str, torch.device)), "device", device, allowed,
            TypeError)
    require(not isinstance(device, str) or _is_device_name(device), "device", device, allowed)
    check_choice("evaluate", evaluate, _EVALUATE)
    check_flag("check_weights", check_weights)


def _is_device_name(name: str) -> bool:
    try:
        torch.device(name)
    except RuntimeError:  # an unknown device type or a malformed index
        return False
    return True


def _refuse_clashing_evaluation(trainer: pl.Trainer, ema: EMAWeights) -> None:
    """Two averages swapped into the module at once ("ema"), or logged under the same ``_ema``
    names ("both"), would corrupt the weights or mix the metrics: refuse the second."""
    if ema.evaluate == "raw":
        return
    others = [cb for cb in trainer.callbacks  # type: ignore[attr-defined]
              if isinstance(cb, EMAWeights) and cb is not ema and cb.evaluate == ema.evaluate]
    if others:
        raise ConfigurationError(
            f"Two EMAWeights on one Trainer have evaluate={ema.evaluate!r}: "
            + ("both would swap their average into the module for validation"
               if ema.evaluate == "ema" else "both would log their metrics as `<name>_ema`")
            + ". Give one of them evaluate='raw' and validate it with `with ema.swapped(model):`.")


def _in_fit(trainer: pl.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING


def _finite_loss(outputs: Any) -> bool:
    try:
        loss = loss_from_output(outputs)
    except ValueError:  # manual optimization or a step returning None: weights are checked anyway
        return True
    # one op for the usual scalar loss (isfinite, all and bool are three); `item()` needs no
    # `detach()`
    return math.isfinite(loss.item()) if loss.numel() == 1 else bool(
        torch.isfinite(loss.detach()).all())

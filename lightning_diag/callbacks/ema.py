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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from lightning_diag.base import DiagnosticCallback, refuse_sharded
from lightning_diag.batch import loss_from_output
from lightning_diag.findings import Severity
from lightning_diag.functional.ema import all_finite, ema_update_, warmup_decay
from lightning_diag.isolation import clone_module, preserved_rng

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
    """

    slug = "ema"

    def __init__(self, decay: float = 0.999, warmup: bool = True, update_every_n_steps: int = 1,
                 start_step: int = 0, device: str | torch.device | None = None,
                 evaluate: str = "ema", check_weights: bool = False, strict: bool = False) -> None:
        super().__init__(strict=strict)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"`decay` must be a float in [0, 1), got {decay!r}.")
        for flag, flag_val in (("warmup", warmup), ("check_weights", check_weights)):
            if not isinstance(flag_val, bool):
                raise TypeError(f"`{flag}` must be a bool, got {flag_val!r}.")
        for name, val, low in (("update_every_n_steps", update_every_n_steps, 1),
                               ("start_step", start_step, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {val!r}.")
        if evaluate not in _EVALUATE:
            raise ValueError(f"`evaluate` must be one of {_EVALUATE}, got {evaluate!r}.")
        self.decay, self.warmup, self.evaluate = float(decay), warmup, evaluate
        self.check_weights = check_weights
        self.update_every_n_steps, self.start_step = update_every_n_steps, start_step
        self.device = torch.device(device) if device is not None else None
        self.num_updates = 0
        self.num_skipped = 0
        self._last_step = 0
        self._names: list[str] = []
        self._live: list[torch.Tensor] = []
        self._ema: list[torch.Tensor] = []
        self._live_f: list[torch.Tensor] = []
        self._ema_f: list[torch.Tensor] = []
        self._live_i: list[torch.Tensor] = []
        self._ema_i: list[torch.Tensor] = []
        self._stage: list[torch.Tensor] | None = None
        self._backup: list[torch.Tensor] | None = None
        self._user_swap = False  # a `swapped()` block is open: hooks must not undo it
        self._ema_buffers: list[torch.Tensor] = []
        self._pending: dict[str, Any] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        refuse_sharded(trainer, "EMAWeights", "each rank holds only a shard of the weights")
        # a new fit starts a new average; a checkpoint restored after setup sets these back
        self.num_updates = self.num_skipped = self._last_step = 0
        self._names, self._pending = [], None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > self._last_step:  # an optimizer step happened (accumulation)
            self._last_step = trainer.global_step
            self._maybe_update(trainer, outputs)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_fit(trainer) and self._names:
            self._sync_ranks(trainer)
        if self.evaluate == "ema" and self._in_fit(trainer) and self.num_updates:
            self._swap_in()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._names:
            self._sync_ranks(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._backup is not None and not self._user_swap:
            self._restore()
        elif self.evaluate == "both" and self._in_fit(trainer) and self.num_updates:
            for key, value in _validate_copy(trainer, pl_module, self.ema_state_dict()).items():
                pl_module.log(f"{key}_ema", value, on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._backup is not None:  # saved mid-swap: the training slot gets the raw weights
            raw = dict(zip(self._names, self._backup, strict=True))
            checkpoint["state_dict"] = {k: raw.get(k, v) for k, v in
                                        checkpoint["state_dict"].items()}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._backup is not None and not self._user_swap:
            self._restore()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self._backup is not None and not self._user_swap:
            self._restore()
        super().on_exception(trainer, pl_module, exception)

    # --- the average -----------------------------------------------------------------------
    def _build(self, module: nn.Module) -> None:
        state = module.state_dict(keep_vars=True)
        self._names = list(state)
        self._live = [t.detach() for t in state.values()]
        self._ema = [self._new_slot(t) for t in self._live]
        self._ema_buffers = [e for t, e in zip(state.values(), self._ema, strict=True)
                             if not isinstance(t, nn.Parameter)]
        pairs = list(zip(self._live, self._ema, strict=True))
        self._live_f = [w for w, _ in pairs if w.is_floating_point()]
        self._ema_f = [e for w, e in pairs if w.is_floating_point()]
        self._live_i = [w for w, _ in pairs if not w.is_floating_point()]
        self._ema_i = [e for w, e in pairs if not w.is_floating_point()]
        self._stage = None
        if any(e.dtype != w.dtype or e.device != w.device for w, e in pairs):
            self._stage = [torch.empty_like(e) for e in self._ema_f]
        pending, self._pending = self._pending, None
        if pending is not None:
            self._load_pending(pending)

    def _new_slot(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
        return t.to(device=self.device or t.device, dtype=dtype, copy=True)

    def _maybe_update(self, trainer: pl.Trainer, outputs: Any) -> None:
        step = trainer.global_step - 1
        if step < self.start_step or (step - self.start_step) % self.update_every_n_steps:
            return
        live = self._live_f
        if not (_finite_loss(outputs) and (not self.check_weights or all_finite(live))):
            self._skip(trainer)
            return
        with torch.no_grad():
            if self._stage is not None:
                torch._foreach_copy_(self._stage, live)
                live = self._stage
            restart = self.num_updates == 0 and self.start_step > 0
            ema_update_(self._ema_f, live, 0.0 if restart else
                        warmup_decay(self.decay, self.num_updates, self.warmup))
            if self._ema_i:
                torch._foreach_copy_(self._ema_i, self._live_i)
        self.num_updates += 1

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
        self._require_built()
        return {k: t.detach().clone() for k, t in zip(self._names, self._ema, strict=True)}

    # --- swapping --------------------------------------------------------------------------
    @contextmanager
    def swapped(self, pl_module: nn.Module) -> Iterator[nn.Module]:
        """Use the averaged weights inside the block; the raw ones come back bit-identically."""
        self._require_built()
        if self._backup is not None:
            raise RuntimeError("EMAWeights: the average is already swapped in.")
        if [t.data_ptr() for t in pl_module.state_dict().values()] != \
                [t.data_ptr() for t in self._live]:
            raise ValueError("EMAWeights.swapped: the module given is not the one trained.")
        self._swap_in()
        self._user_swap = True
        try:
            yield pl_module
        finally:
            self._user_swap = False
            self._restore()

    def _swap_in(self) -> None:
        self._backup = [t.clone() for t in self._live]
        with torch.no_grad():
            torch._foreach_copy_(self._live, self._ema)

    def _restore(self) -> None:
        assert self._backup is not None
        with torch.no_grad():
            torch._foreach_copy_(self._live, self._backup)
        self._backup = None

    def _sync_ranks(self, trainer: pl.Trainer) -> None:
        """Give every rank rank 0's averaged buffers (a collective: called on every rank).

        DDP broadcasts buffers at each forward, but each rank then updates its BatchNorm
        statistics with its own batch, so the averages of buffers drift apart between ranks.
        """
        if trainer.world_size < 2 or not self._ema_buffers:
            return
        synced = trainer.strategy.broadcast([t.cpu() for t in self._ema_buffers], src=0)
        with torch.no_grad():
            for mine, theirs in zip(self._ema_buffers, synced, strict=True):
                mine.copy_(theirs)

    def _require_built(self) -> None:
        if not self._names:
            raise RuntimeError("EMAWeights has no average yet: call trainer.fit first.")

    @staticmethod
    def _in_fit(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    # --- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ema = dict(zip(self._names, self._ema, strict=True)) if self._names else (
            (self._pending or {}).get("ema", {}))
        return {"ema": ema, "num_updates": self.num_updates, "num_skipped": self.num_skipped,
                "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self.num_skipped = int(state_dict.get("num_skipped", 0))
        self._last_step = int(state_dict["last_step"])
        if self._names:
            self._load_pending(state_dict)
        else:  # restored before fit start: copied in once the slots exist
            self._pending = state_dict

    def _load_pending(self, state: dict[str, Any]) -> None:
        saved = state["ema"]
        if list(saved) != self._names:
            raise ValueError("EMAWeights: the checkpoint's EMA keys do not match the model "
                             f"(missing {sorted(set(self._names) - set(saved))}, unexpected "
                             f"{sorted(set(saved) - set(self._names))}).")
        with torch.no_grad():
            torch._foreach_copy_(self._ema, [saved[k] for k in self._names])


def _finite_loss(outputs: Any) -> bool:
    try:
        loss = loss_from_output(outputs)
    except ValueError:  # manual optimization or a step returning None: weights are checked anyway
        return True
    return bool(torch.isfinite(loss.detach()).all())


def _validate_copy(trainer: pl.Trainer, pl_module: pl.LightningModule,
                   weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Run ``validation_step`` of a copy holding ``weights`` over the validation batches.

    Returns the epoch value of everything the step logs: batch-size-weighted means of tensors,
    ``compute()`` of torchmetrics objects (reset first on the copy).
    """
    from torchmetrics import Metric

    sums: dict[str, list[float]] = {}
    metrics: dict[str, Metric] = {}
    current = {"batch_size": 1}  # Lightning's default weight: the size inferred from the batch

    def capture(name: str, value: Any, *args: Any, batch_size: int | None = None,
                **kwargs: Any) -> None:
        if isinstance(value, Metric):
            metrics[name] = value
            return
        n = float(batch_size or current["batch_size"])
        total = sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * n
        total[1] += n

    def capture_dict(values: Any, *args: Any, batch_size: int | None = None, **kw: Any) -> None:
        for name, value in values.items():
            capture(name, value, batch_size=batch_size)

    with preserved_rng(), torch.no_grad():
        clone = clone_module(pl_module)
        clone.load_state_dict(weights)
        for m in clone.modules():
            if isinstance(m, Metric):
                m.reset()
        clone.log = capture  # type: ignore[method-assign]
        clone.log_dict = capture_dict  # type: ignore[method-assign,assignment]
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        limits = trainer.num_val_batches
        for dl_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=False)):
            for idx, batch in enumerate(loader):
                if idx >= limit:
                    break
                batch = move_data_to_device(batch, pl_module.device)
                try:
                    current["batch_size"] = extract_batch_size(batch)
                except Exception:  # no tensor to size: an unweighted mean over batches
                    current["batch_size"] = 1
                args = (batch, idx, dl_idx) if len(loaders) > 1 else (batch, idx)
                clone.validation_step(*args)
        out = {k: s / n for k, (s, n) in sums.items() if n}
        out.update({k: float(m.compute()) for k, m in metrics.items()})
    return out

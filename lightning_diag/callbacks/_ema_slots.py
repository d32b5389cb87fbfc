"""The averaged copy of a module's state kept by :class:`~lightning_diag.callbacks.ema.EMAWeights`.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> slots = EMASlots(bn, device=None)
    >>> slots.names
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    >>> slots.update(0.5)  # the average of identical weights is those weights
    >>> all(torch.equal(a, b) for a, b in zip(slots.ema, slots.live))
    True
    >>> slots.swap_in()  # the module now holds the average's storage: nothing was copied
    >>> slots.swapped_in, bn.weight.data_ptr() == slots.ema[0].data_ptr()
    (True, True)
    >>> slots.restore(); slots.swapped_in, bn.weight.data_ptr() == slots.live[0].data_ptr()
    (False, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_diag.functional.ema import all_finite, ema_update_

__all__ = ["EMASlots"]


class EMASlots:
    """One average slot per entry of ``module.state_dict()``, paired with the live tensor.

    Args:
        module: The module whose state is averaged (its tensors are referenced, not copied).
        device: Where the average lives; ``None``: with each live tensor.
    """

    def __init__(self, module: nn.Module, device: torch.device | None) -> None:
        state = module.state_dict(keep_vars=True)
        self.names = list(state)
        self.live = [t.detach() for t in state.values()]  # the raw storage, also while swapped
        self.ema = [_new_slot(t, device) for t in self.live]
        self.buffers = [e for t, e in zip(state.values(), self.ema, strict=True)
                        if not isinstance(t, nn.Parameter)]
        pairs = list(zip(self.live, self.ema, strict=True))
        self._live_f = [w for w, _ in pairs if w.is_floating_point()]
        self._ema_f = [e for w, e in pairs if w.is_floating_point()]
        self._live_i = [w for w, _ in pairs if not w.is_floating_point()]
        self._ema_i = [e for w, e in pairs if not w.is_floating_point()]
        self._stage: list[torch.Tensor] | None = None
        if any(e.dtype != w.dtype or e.device != w.device for w, e in pairs):
            self._stage = [torch.empty_like(e) for e in self._ema_f]
        # A swap hands the module's own Parameter and buffer objects (what optimizers, DDP and
        # hooks hold) the average's storage and back: no tensor is copied. An average of
        # another dtype or device (float32 for bf16 weights, `device="cpu"`) is copied instead.
        trade = [_same_layout(w, e) for w, e in pairs]
        self._trade = [(t, w, e) for t, w, e, ok in zip(state.values(), self.live, self.ema, trade,
                                                         strict=True) if ok]
        self._copy_live = [w for w, ok in zip(self.live, trade, strict=True) if not ok]
        self._copy_ema = [e for e, ok in zip(self.ema, trade, strict=True) if not ok]
        self._copied_at = [i for i, ok in enumerate(trade) if not ok]
        self._backup: list[torch.Tensor] | None = None  # raw values of the copied slots
        self.pinned = False  # a `swapped()` block is open: hooks must not undo it

    def weights_finite(self) -> bool:
        """Whether every floating-point live tensor is free of NaN/Inf."""
        return all_finite(self._live_f)

    def update(self, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * live`` for floats; integer tensors are copied."""
        # Run on every step, so no `torch.no_grad()` block (~5 us a step with cold caches): no
        # tensor here requires grad (the live ones are detached, the slots and stage were made
        # from them), so autograd records nothing.
        live = self._live_f
        if self._stage is not None:
            torch._foreach_copy_(self._stage, live)
            live = self._stage
        ema_update_(self._ema_f, live, decay)
        if self._ema_i:
            torch._foreach_copy_(self._ema_i, self._live_i)

    @property
    def swapped_in(self) -> bool:
        """Whether the live tensors hold the average (the raw ones kept aside)."""
        return self._backup is not None

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        """The average in ``module`` inside the block, pinned there; raw weights back after."""
        if self.swapped_in:
            raise RuntimeError("EMAWeights: the average is already swapped in.")
        if not self.holds(module):
            raise ValueError("EMAWeights.swapped: the module given is not the one trained.")
        self.swap_in()
        self.pinned = True
        try:
            yield
        finally:
            self.pinned = False
            self.restore()

    def swap_in(self) -> None:
        """Give the module the average, keeping the raw tensors aside (storage traded, not copied).

        While swapped in, an in-place write to the module's tensors lands in the average.
        """
        with torch.no_grad():
            for target, _, avg in self._trade:
                target.data = avg
            self._backup = [t.clone() for t in self._copy_live]
            if self._copy_live:
                torch._foreach_copy_(self._copy_live, self._copy_ema)

    def restore(self) -> None:
        """Give the module its raw tensors back: the same storage, hence bit-identical."""
        assert self._backup is not None
        with torch.no_grad():
            for target, raw, _ in self._trade:
                target.data = raw
            if self._copy_live:
                torch._foreach_copy_(self._copy_live, self._backup)
        self._backup = None

    def raw_state(self) -> dict[str, torch.Tensor]:
        """The raw tensors kept aside while swapped in, by state-dict key."""
        assert self._backup is not None
        raw = list(self.live)
        for i, saved in zip(self._copied_at, self._backup, strict=True):
            raw[i] = saved
        return dict(zip(self.names, raw, strict=True))

    def holds(self, module: nn.Module) -> bool:
        """Whether ``module`` is the one whose tensors these slots pair with."""
        return [t.data_ptr() for t in module.state_dict().values()] == \
            [t.data_ptr() for t in self.live]

    def state(self) -> dict[str, torch.Tensor]:
        """The average by state-dict key (the slots themselves, not copies)."""
        return dict(zip(self.names, self.ema, strict=True))

    def load(self, saved: dict[str, Any]) -> None:
        """Copy a saved average in; its keys must be exactly the module's."""
        if list(saved) != self.names:
            raise ValueError("EMAWeights: the checkpoint's EMA keys do not match the model "
                             f"(missing {sorted(set(self.names) - set(saved))}, unexpected "
                             f"{sorted(set(saved) - set(self.names))}).")
        with torch.no_grad():
            torch._foreach_copy_(self.ema, [saved[k] for k in self.names])

    def sync_ranks(self, trainer: pl.Trainer) -> None:
        """Give every rank rank 0's averaged buffers (a collective: called on every rank).

        DDP broadcasts buffers at each forward, but each rank then updates its BatchNorm
        statistics with its own batch, so the averages of buffers drift apart between ranks.
        """
        if trainer.world_size < 2 or not self.buffers:
            return
        synced = trainer.strategy.broadcast([t.cpu() for t in self.buffers], src=0)
        with torch.no_grad():
            for mine, theirs in zip(self.buffers, synced, strict=True):
                mine.copy_(theirs)


def _same_layout(live: torch.Tensor, avg: torch.Tensor) -> bool:
    """Whether ``avg`` can stand in for ``live`` as is (same dtype, device, shape and strides)."""
    return (live.dtype == avg.dtype and live.device == avg.device and live.shape == avg.shape
            and live.stride() == avg.stride())


def _new_slot(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    return t.to(device=device or t.device, dtype=dtype, copy=True)

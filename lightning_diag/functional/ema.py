"""The exponential moving average of weights: warm-up schedule and the fused in-place update.

Example:
    >>> import torch
    >>> from lightning_diag.functional.ema import ema_update_, warmup_decay
    >>> ema, w = [torch.zeros(2)], [torch.ones(2)]
    >>> ema_update_(ema, w, decay=0.75)
    >>> ema[0].tolist()
    [0.25, 0.25]
    >>> warmup_decay(0.999, num_updates=0, warmup=True)
    0.1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["all_finite", "ema_update_", "warmup_decay"]


def warmup_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """The decay used for update number ``num_updates + 1``.

    With warm-up the decay is ``min(decay, (1 + n) / (10 + n))`` where ``n`` is the number of
    updates already done: 0.1, 0.18, 0.25, ... reaching 0.99 after 881 updates, so the average
    forgets the random initialization quickly (the TensorFlow ``ExponentialMovingAverage``
    ``num_updates`` schedule). Without warm-up it is ``decay`` from the first update.
    """
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else decay


def ema_update_(ema: Sequence[torch.Tensor], new: Sequence[torch.Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * new`` for all tensors in one fused, in-place call.

    ``torch._foreach_lerp_`` computes ``ema + (1 - decay) * (new - ema)``: one multi-tensor kernel,
    no Python loop over parameters and no allocation.
    """
    if ema:  # run on every step: lists are passed as they are
        torch._foreach_lerp_(ema if type(ema) is list else list(ema),
                             new if type(new) is list else list(new), 1.0 - decay)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds a NaN or an infinity (one fused norm pass, one host sync)."""
    if not tensors:
        return True
    norms = torch._foreach_norm(list(tensors))
    return bool(torch.isfinite(torch.stack(norms).sum()))

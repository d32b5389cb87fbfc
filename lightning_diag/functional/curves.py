"""Pure maths on loss and accuracy curves: smoothing, plateaus, jumps, and the sweep's pick rule.

Every function takes plain sequences of floats (or a 1-D tensor) and returns plain numbers or a
1-D float64 tensor, so it can be checked without a Trainer.

Example:
    >>> from lightning_diag.functional.curves import smooth_ema, plateau_length, pick_learning_rate
    >>> smooth_ema([4.0, 2.0, 2.0], alpha=0.5).tolist()
    [4.0, 3.0, 2.5]
    >>> plateau_length([2.0, 1.0, 0.99, 1.0, 1.01], min_rel_delta=0.05)
    3
    >>> pick_learning_rate({0.1: [2.3, float("nan")], 0.01: [2.3, 1.0], 0.001: [2.3, 2.0]})[0]
    0.01
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "diverged",
    "smooth_ema",
    "is_jump",
    "jump_threshold",
    "pick_learning_rate",
    "plateau_length",
    "running_median",
]

Curve = Sequence[float] | torch.Tensor


def _as_tensor(values: Curve) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


def smooth_ema(values: Curve, alpha: float = 0.1) -> torch.Tensor:
    """Exponential moving average ``s_t = (1 - alpha) s_{t-1} + alpha v_t`` with ``s_0 = v_0``.

    A non-finite value makes every later smoothed value non-finite, which is what a divergence
    check wants to see.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1]``.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"`alpha` must be in (0, 1], got {alpha!r}.")
    v = _as_tensor(values)
    out = torch.empty_like(v)
    for i in range(v.numel()):
        out[i] = v[i] if i == 0 else (1.0 - alpha) * out[i - 1] + alpha * v[i]
    return out


def running_median(values: Curve, window: int) -> torch.Tensor:
    """Trailing median over the last ``window`` values (fewer at the start), non-finite skipped.

    Uses the lower median (``torch.median``); positions whose window holds no finite value are NaN.

    Raises:
        ValueError: ``window`` < 1.
    """
    if window < 1:
        raise ValueError(f"`window` must be >= 1, got {window!r}.")
    v = _as_tensor(values)
    out = torch.full_like(v, float("nan"))
    for i in range(v.numel()):
        chunk = v[max(0, i - window + 1): i + 1]
        chunk = chunk[torch.isfinite(chunk)]
        if chunk.numel():
            out[i] = chunk.median()
    return out


def jump_threshold(median: float, factor: float, min_jump: float) -> float:
    """The loss above which a step counts as a jump: ``max(factor * median, median + min_jump)``."""
    return max(factor * median, median + min_jump)


def is_jump(value: float, history: Curve, factor: float, min_jump: float) -> bool:
    """True when ``value`` is non-finite or far above the median of ``history``.

    "Far above" means above ``max(factor * median, median + min_jump)``: the relative test catches
    a blow-up early in training, the absolute floor ``min_jump`` keeps per-batch noise near zero
    loss (0.01 then 0.1) from counting as a divergence. An empty ``history`` only flags
    non-finite values.
    """
    if not math.isfinite(value):
        return True
    # Called on every training step: plain floats, not tensors (a short list's median in
    # Python costs a few microseconds; torch's ~10x more). The lower median, as torch's.
    values = history.tolist() if isinstance(history, torch.Tensor) else history
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return False
    return value > jump_threshold(statistics.median_low(finite), factor, min_jump)


def plateau_length(values: Curve, min_rel_delta: float) -> int:
    """Number of trailing values since the last one that improved (went down) on the best so far.

    A value improves when it is below ``best * (1 - min_rel_delta)`` (``best - |best| *
    min_rel_delta`` for negative losses). Non-finite values never improve. Returns 0 when the
    last value is itself an improvement, ``len(values) - 1`` when nothing after the first did.
    """
    v = _as_tensor(values)
    best, since = math.inf, 0
    for i, x in enumerate(v.tolist()):
        if math.isfinite(x) and (i == 0 or x < best - abs(best) * min_rel_delta):
            best, since = x, 0
        else:
            since += 1
    return since


def diverged(values: Curve, alpha: float = 0.1, factor: float = 4.0) -> bool:
    """True when a loss curve holds a non-finite value or its EMA rises above ``factor`` x start.

    The start is the first finite raw value; comparing the smoothed curve keeps one noisy batch
    from condemning a learning rate.
    """
    v = _as_tensor(values)
    if v.numel() == 0:
        return False
    if not bool(torch.isfinite(v).all()):
        return True
    return bool((smooth_ema(v, alpha) > factor * float(v[0])).any()) if float(v[0]) > 0 else False


def pick_learning_rate(
    curves: Mapping[float, Curve], alpha: float = 0.1, tail: float = 0.1, factor: float = 4.0
) -> tuple[float, dict[float, float], set[float]]:
    """The learning rate whose loss falls furthest within the budget without diverging.

    Rule (documented in docs/tuning.md): smooth every curve with :func:`ema`; drop the curves
    that :func:`diverged`; score the rest by the mean of the last ``tail`` fraction of their
    smoothed values (at least one value); pick the lowest score. Every curve starts from the same
    initialization, so the lowest final loss is also the fastest fall. Ties go to the larger
    learning rate. When every curve diverged, the smallest learning rate is returned.

    Returns:
        ``(chosen_lr, score_per_lr, diverged_lrs)``; diverged learning rates score ``inf``.

    Raises:
        ValueError: no curve, or ``tail`` outside ``(0, 1]``.
    """
    if not curves:
        raise ValueError("`curves` is empty: give at least one learning rate's loss curve.")
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"`tail` must be in (0, 1], got {tail!r}.")
    scores: dict[float, float] = {}
    bad: set[float] = set()
    for lr, curve in curves.items():
        v = _as_tensor(curve)
        if v.numel() == 0 or diverged(v, alpha, factor):
            bad.add(lr)
            scores[lr] = math.inf
            continue
        smooth = smooth_ema(v, alpha)
        k = max(1, round(tail * smooth.numel()))
        scores[lr] = float(smooth[-k:].mean())
    good = [lr for lr in scores if lr not in bad]
    if not good:
        return min(scores), scores, bad
    return min(good, key=lambda lr: (scores[lr], -lr)), scores, bad

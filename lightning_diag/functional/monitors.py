"""Pure tensor maths behind the training monitors (step 5 of the recipe).

Everything here runs on the tensor's own device and returns tensors, never Python numbers, so
that a caller can stack the results of many layers and copy them to the host once.
Non-finite values are ignored by the statistics (and counted by nothing); empty tensors give NaN
statistics and an empty histogram; bf16/fp16 inputs are computed in float32. Nothing raises.

Example:
    >>> import torch
    >>> from lightning_diag.functional.monitors import layer_stats, STAT_NAMES
    >>> x = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    >>> dict(zip(STAT_NAMES, layer_stats(x).tolist()))["dead_fraction"]
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "HIST_HEADER",
    "STAT_NAMES",
    "gradient_flow",
    "histogram_row",
    "histogram_edges",
    "is_logging_step",
    "layer_stats",
    "update_ratios",
]

STAT_NAMES = ("mean", "std", "zero_fraction", "dead_fraction", "saturated_fraction")
HIST_HEADER = ("min", "max", "num", "sum", "sum_squares")


def _finite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).float()
    return flat, torch.isfinite(flat)


def histogram_row(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """``[min, max, num, sum, sum_squares, counts...]`` of the finite values of ``x``.

    Computed without a host sync (masked reductions and ``scatter_add_``, no boolean indexing),
    so rows of many tensors can be stacked and copied once. Equal-width bins span
    ``[min, max]``; see :func:`histogram_edges`. ``num == 0`` means there is nothing to draw.

    Example:
        >>> row = histogram_row(torch.tensor([0.0, 1.0, float("nan"), 1.0]), bins=2)
        >>> row.tolist()
        [0.0, 1.0, 3.0, 2.0, 2.0, 1.0, 2.0]
    """
    flat, mask = _finite(x)
    inf = torch.tensor(math.inf, device=flat.device)
    lo = torch.where(mask, flat, inf).amin() if flat.numel() else inf
    hi = torch.where(mask, flat, -inf).amax() if flat.numel() else -inf
    vals = torch.where(mask, flat, torch.zeros_like(flat))
    pos = (vals - lo) / (hi - lo) * bins
    idx = torch.nan_to_num(pos, nan=0.0, posinf=0.0, neginf=0.0).clamp(0, bins - 1).long()
    counts = torch.zeros(bins, device=flat.device).scatter_add_(0, idx, mask.float())
    header = torch.stack([lo, hi, mask.sum().float(), vals.sum(), (vals * vals).sum()])
    return torch.cat([header, counts])


def histogram_edges(lo: float, hi: float, bins: int) -> list[float]:
    """Right bucket limits of the bins of :func:`histogram_row` (TensorBoard's format)."""
    if not hi > lo:
        hi = lo + 1e-6
    return [lo + (hi - lo) * (i + 1) / bins for i in range(bins)]


def layer_stats(
    x: torch.Tensor, bounds: tuple[float, float] | None = None, saturation_tol: float = 0.02
) -> torch.Tensor:
    """``[mean, std, zero_fraction, dead_fraction, saturated_fraction]`` of a layer's output.

    Args:
        x: The output, batch first; dimension 1 holds the units (features or channels).
        bounds: The range of a bounded activation (tanh: ``(-1, 1)``); None: not bounded, and
            the saturated fraction is NaN.
        saturation_tol: A value within ``saturation_tol * (high - low)`` of a bound is
            saturated (for tanh, ``|x| >= 0.96``: local gradient ``1 - x**2 < 0.08``).

    A unit is dead when it is exactly zero for every sample and position of the batch (a ReLU
    that never fires). Statistics ignore non-finite values.

    Example:
        >>> layer_stats(torch.tensor([[0.99, -0.2]]), bounds=(-1.0, 1.0))[4].item()
        0.5
    """
    flat, mask = _finite(x)
    n = mask.sum().float()
    vals = torch.where(mask, flat, torch.zeros_like(flat))
    mean = vals.sum() / n
    var = torch.where(mask, flat - mean, torch.zeros_like(flat)).square().sum() / (n - 1).clamp(1)
    zero = ((flat == 0) & mask).sum() / n
    if x.dim() >= 2 and x.numel():
        other = [d for d in range(x.dim()) if d != 1]
        alive = (x.detach() != 0).any(dim=other[0], keepdim=True)
        for d in other[1:]:
            alive = alive.any(dim=d, keepdim=True)
        dead = 1.0 - alive.float().mean()
    else:
        dead = (~(x.detach() != 0).any()).float() if x.numel() else mean * math.nan
    if bounds is None:
        sat = mean * math.nan
    else:
        low, high = bounds
        tol = saturation_tol * (high - low)
        sat = (((flat >= high - tol) | (flat <= low + tol)) & mask).sum() / n
    return torch.stack([mean, var.sqrt(), zero, dead.reshape(()), sat])


def is_logging_step(step: int, every_n_steps: int) -> bool:
    """Every ``every_n_steps``-th step, plus the powers of two before the first of them.

    The early steps are where divergence and bad initializations show, and a sparse schedule
    would miss them; this adds only ``log2(every_n_steps)`` logging steps per run.

    Example:
        >>> [s for s in range(40) if is_logging_step(s, 10)]
        [0, 1, 2, 4, 8, 10, 20, 30]
    """
    if step % every_n_steps == 0:
        return True
    return step < every_n_steps and step & (step - 1) == 0


def update_ratios(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> torch.Tensor:
    """``||after - before|| / ||before||`` per tensor, with foreach ops, as one float tensor.

    A tensor whose norm is zero gives ``inf`` when it moved and 0 when it did not; NaN means a
    non-finite weight or update.

    Example:
        >>> update_ratios([torch.ones(4)], [torch.full((4,), 1.001)])
        tensor([0.0010])
    """
    if not before:
        return torch.empty(0)
    deltas = torch._foreach_sub([a.detach().float() for a in after],
                                [b.detach().float() for b in before])
    num = torch.stack([n.float() for n in torch._foreach_norm(deltas)])
    den = torch.stack([n.float() for n in torch._foreach_norm([b.float() for b in before])])
    return torch.where((den == 0) & (num == 0), torch.zeros_like(num), num / den)


def gradient_flow(
    grad_rms: Sequence[float], vanishing: float = 1e-3, exploding: float = 1e3
) -> tuple[str | None, float]:
    """Classify per-layer gradient scales, ordered from the first layer to the last.

    Args:
        grad_rms: Root-mean-square of the gradient flowing into each layer's output (NaN for
            layers without one, which are skipped).
        vanishing: ``first / last`` below this is vanishing.
        exploding: ``first / last`` above this, or any non-finite gradient, is exploding.

    Returns:
        ``("vanishing" | "exploding" | None, first / last)``.

    Example:
        >>> gradient_flow([1e-6, 1e-3, 1.0])
        ('vanishing', 1e-06)
    """
    finite = [g for g in grad_rms if not math.isnan(g)]
    if len(finite) < 2:
        return None, math.nan
    if any(math.isinf(g) for g in finite):
        return "exploding", math.inf
    first, last = finite[0], finite[-1]
    if last == 0.0:
        return (None, math.nan) if first == 0.0 else ("exploding", math.inf)
    ratio = first / last
    if ratio < vanishing:
        return "vanishing", ratio
    if ratio > exploding:
        return "exploding", ratio
    return None, ratio

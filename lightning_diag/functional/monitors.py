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
from typing import Any

import torch

__all__ = [
    "HIST_HEADER",
    "STAT_NAMES",
    "gradient_flow",
    "histogram_row",
    "histogram_edges",
    "is_logging_step",
    "layer_stats",
    "layer_summary",
    "parse_summary_row",
    "pool_batches",
    "update_ratios",
]

STAT_NAMES = ("mean", "std", "zero_fraction", "dead_fraction", "saturated_fraction")
HIST_HEADER = ("min", "max", "num", "sum", "sum_squares")


def layer_summary(
    x: torch.Tensor,
    bounds: tuple[float, float] | None = None,
    bins: int = 64,
    saturation_tol: float = 0.02,
    lean: bool = False,
    histogram: bool = True,
) -> torch.Tensor:
    """:func:`layer_stats` followed by :func:`histogram_row` of ``x``, in one fused pass.

    ``[mean, std, zero_fraction, dead_fraction, saturated_fraction, min, max, num, sum,
    sum_squares, counts...]`` as one float32 tensor. About 25 small float kernels per tensor
    and no host sync: the monitors call this once per layer and copy all layers' rows to the
    host together. The variance is two-pass (no cancellation); the counts come from one
    ``torch.bincount``. ``lean``: only what the findings read (dead and saturated fractions,
    num, sum_squares), the rest NaN and the counts 0, in about a third of the time.
    ``histogram=False``: every statistic but min, max (NaN) and the counts (0), which on CPU
    cost most of the time (the monitors then count a copy off the training thread).

    Example:
        >>> layer_summary(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), bins=2).tolist()
        [1.0, 1.4142135381698608, 0.5, 0.5, nan, 0.0, 3.0, 4.0, 4.0, 10.0, 3.0, 1.0]
        >>> layer_summary(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), bins=2, lean=True).tolist()
        [nan, nan, nan, 0.5, nan, nan, nan, 4.0, nan, 10.0, 0.0, 0.0]
    """
    # Float arithmetic only: on CPU a boolean mask costs ~10x a float op of the same size.
    flat = x.detach().reshape(-1).float()
    size = flat.numel()
    bad = (flat - flat).nan_to_num_(1.0)  # 1 where non-finite (inf - inf is NaN), else 0
    vals = flat.nan_to_num(0.0, 0.0, 0.0)
    k = bad.sum().double()
    n = size - k
    nothing = n * math.nan
    dead = _dead_fraction(x, flat) if size else nothing
    sat = nothing if bounds is None else _saturated_fraction(flat, n, bounds, saturation_tol)
    if lean:
        return _row([nothing, nothing, nothing, dead, sat, nothing, nothing, n, nothing,
                     torch.dot(vals, vals).double()], bins)
    total = vals.sum()
    dev = vals - total / max(size, 1)
    total, m2 = total.double(), torch.dot(dev, dev).double()  # two-pass: no cancellation
    # Undo the zeros that stand in for non-finite values: M2 over n = M2 over size - S^2 k/(N n).
    mean = total / n
    var = ((m2 - total * total * k / (size * n)) / (n - 1).clamp(min=1)).clamp(min=0)
    squares = m2 + total * total / max(size, 1)
    zero = (n - vals.sign().abs().sum()) / n
    if not histogram:
        return _row([mean, var.sqrt(), zero, dead, sat, nothing, nothing, n, total, squares],
                    bins)
    # The mean stands in for non-finite values: it lies within [min, max] of the finite ones.
    lo, hi = torch.aminmax(vals.addcmul(bad, mean.float())) if size else (nothing,) * 2
    # Bin index per value; non-finite ones go to an overflow bin that is dropped. An
    # overflowing range (hi - lo = inf) puts values in the first bin rather than none.
    pos = ((flat - lo) * (bins / (hi - lo).clamp(min=1e-30))).nan_to_num_(0.0, bins - 1.0, 0.0)
    idx = pos.clamp_(0, bins - 1).add_(bad, alpha=bins).long()
    counts = torch.bincount(idx, minlength=bins + 1)[:bins].float()
    return _row([mean, var.sqrt(), zero, dead, sat, lo.double(), hi.double(), n, total,
                 squares], bins, counts)


def _row(head: list[torch.Tensor], bins: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 row of :func:`layer_summary`: the statistics, then the counts (0 if none)."""
    stats = torch.stack(head).float()
    return torch.cat([stats, counts if counts is not None
                      else torch.zeros(bins, device=stats.device)])


def _dead_fraction(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Share of units (dimension 1) zero on every sample and position; a 1-D ``x`` is one."""
    if x.dim() >= 2:
        other = tuple(d for d in range(x.dim()) if d != 1)
        shaped = flat.view(x.shape)
        return ((shaped.amax(dim=other) == 0) & (shaped.amin(dim=other) == 0)).double().mean()
    return ((flat.amax() == 0) & (flat.amin() == 0)).double()


def _saturated_fraction(flat: torch.Tensor, n: torch.Tensor, bounds: tuple[float, float],
                        saturation_tol: float) -> torch.Tensor:
    """Share of the ``n`` finite values within ``saturation_tol`` of the range of a bound."""
    mid, half = (bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2
    thr = half - saturation_tol * (bounds[1] - bounds[0])
    dist = flat.nan_to_num(mid, mid, mid).sub_(mid).abs_().sub_(thr)
    return dist.sign_().add_(1).clamp_(max=1).sum() / n  # 1 where |x - mid| >= thr


def pool_batches(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One layer's outputs (or gradients) of several batches as one batch of all their samples.

    Concatenated along dimension 0 when the other dimensions agree, so that every statistic
    of :func:`layer_summary` is that of one batch of all the samples; when only the units
    (dimension 1) agree, as ``(samples x positions, units)`` rows (a unit is dead when zero on
    every row, as on every sample and position); otherwise the values alone (one unit).

    Example:
        >>> pool_batches([torch.ones(1, 3), torch.zeros(2, 3)]).shape
        torch.Size([3, 3])
        >>> pool_batches([torch.ones(1, 2, 5), torch.zeros(1, 2, 7)]).shape
        torch.Size([12, 2])
        >>> pool_batches([torch.ones(1, 2), torch.zeros(1, 3)]).shape
        torch.Size([5])
    """
    if len({p.shape[1:] for p in parts}) == 1:
        return torch.cat(list(parts))
    if all(p.dim() >= 2 for p in parts) and len({p.shape[1] for p in parts}) == 1:
        return torch.cat([p.movedim(1, -1).reshape(-1, p.shape[1]) for p in parts])
    return torch.cat([p.reshape(-1) for p in parts])


def histogram_row(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """``[min, max, num, sum, sum_squares, counts...]`` of the finite values of ``x``.

    Computed without a host sync, so rows of many tensors can be stacked and copied once.
    Equal-width bins span ``[min, max]``; see :func:`histogram_edges`. ``num == 0`` means there
    is nothing to draw. A slice of :func:`layer_summary`.

    Example:
        >>> row = histogram_row(torch.tensor([0.0, 1.0, float("nan"), 1.0]), bins=2)
        >>> row.tolist()
        [0.0, 1.0, 3.0, 2.0, 2.0, 1.0, 2.0]
    """
    return layer_summary(x, bins=bins)[len(STAT_NAMES):]


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
    that never fires). Statistics ignore non-finite values. A slice of :func:`layer_summary`.

    Example:
        >>> layer_stats(torch.tensor([[0.99, -0.2]]), bounds=(-1.0, 1.0))[4].item()
        0.5
    """
    return layer_summary(x, bounds, bins=1, saturation_tol=saturation_tol)[:len(STAT_NAMES)]


def is_logging_step(step: int, every_n_steps: int, early_steps: bool = True) -> bool:
    """The monitors' one logging schedule: steps 0, n, 2n, ... (``n = every_n_steps``), plus,
    with ``early_steps``, the powers of two below n (1, 2, 4, 8, ...).

    The early steps are where divergence and bad initializations show, and a sparse schedule
    would miss them; they add only ``log2(every_n_steps)`` logging steps per run.

    Example:
        >>> [s for s in range(40) if is_logging_step(s, 10)]
        [0, 1, 2, 4, 8, 10, 20, 30]
        >>> [s for s in range(40) if is_logging_step(s, 10, early_steps=False)]
        [0, 10, 20, 30]
    """
    if step % every_n_steps == 0:
        return True
    return early_steps and step < every_n_steps and step & (step - 1) == 0


def parse_summary_row(row: Sequence[float], has_grad: bool, numel: int) -> dict[str, Any]:
    """One layer's host row, its activation's :func:`layer_summary` then its gradient's, as
    named statistics: those of :data:`STAT_NAMES`, ``act_hist`` and ``grad_hist`` (each
    ``[min, max, num, sum, sum_squares, counts...]``), and the gradient's ``grad_norm`` and
    per-element ``grad_rms`` (NaN without a gradient; infinite when a gradient value is not
    finite, since those are left out of the sums).

    Example:
        >>> act = layer_summary(torch.tensor([[0.0, 1.0]]), bins=2).tolist()
        >>> grad = layer_summary(torch.tensor([[3.0, 4.0]]), bins=2).tolist()
        >>> s = parse_summary_row(act + grad, has_grad=True, numel=2)
        >>> s["dead_fraction"], s["grad_norm"], s["act_hist"][2]
        (0.5, 5.0, 2.0)
    """
    k, width = len(STAT_NAMES), len(row) // 2
    out: dict[str, Any] = dict(zip(STAT_NAMES, row[:k], strict=True))
    out["act_hist"], grad, out["grad_hist"] = row[k:width], row[width:], row[width + k:]
    num, squares = grad[k + 2], grad[k + 4]
    norm = math.sqrt(squares) if num == numel and math.isfinite(squares) else math.inf
    out["grad_norm"] = norm if has_grad else math.nan
    out["grad_rms"] = out["grad_norm"] / math.sqrt(max(numel, 1))
    return out


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

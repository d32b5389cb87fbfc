"""Recipe step 2: compare analytic gradients with centered finite differences, at fit start.

Example:
    >>> import torch
    >>> from lightning_diag.examples.digits import DigitsClassifier, load_digits_tensors
    >>> from lightning_diag.checks.gradients import check_gradients
    >>> x, y = load_digits_tensors()
    >>> found = check_gradients(DigitsClassifier(arch="mlp"), (x[:8], y[:8]), coords_per_tensor=3)
    >>> [f.code for f in found]
    ['gradient_check.ok']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import default_batch_to_input, map_floats, select_samples, step_loss
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.checks import (
    centered_difference,
    count_param_layers,
    evaluate_around,
    gradient_tolerance,
    has_kinks,
    kink_gap,
    relative_error,
)
from lightning_diag.isolation import RNGState, side_experiment
from lightning_diag.validation import check_flag, check_int, check_number

__all__ = ["TensorGradientError", "check_gradients", "error_table", "validate_arguments"]

CHECK = "GradientCheck"
ADVICE = (
    "The analytic gradient disagrees with the numeric one (recipe step 2): look for a custom "
    "autograd.Function with a wrong backward, a `.detach()`/`.data`/`torch.no_grad` cutting the "
    "graph, or an in-place operation in the layers named."
)
#: Roundoff of one float64 loss evaluation is about one ulp; this margin covers a few more.
_ROUNDOFF_ULPS = 4.0
#: Default steps. Measured on digits nets in float64: 1e-6 puts roundoff errors of ~2e-6 on
#: small coordinates of smooth nets (over their 1e-6 tolerance), so they use 1e-5; with kinks
#: (tolerance 1e-4) 1e-6 is accurate enough and crosses ten times fewer kinks than 1e-5.
_SMOOTH_STEP, _KINK_STEP = 1e-5, 1e-6


@dataclass(frozen=True)
class TensorGradientError:
    """The worst relative gradient error found in one parameter tensor."""

    name: str
    numel: int
    checked: int
    both_zero: int
    kinks: int
    worst_error: float
    analytic: float
    numeric: float

    def row(self) -> str:
        return (f"| `{self.name}` | {self.numel} | {self.checked} | {self.both_zero} | "
                f"{self.kinks} | {self.worst_error:.2e} | {self.analytic:.3e} | "
                f"{self.numeric:.3e} |")


def check_gradients(
    module: pl.LightningModule,
    batch: Any,
    *,
    num_samples: int = 4,
    coords_per_tensor: int = 10,
    direction: bool = True,
    h: float | None = None,
    tolerance: float | None = None,
    kinks: bool | None = None,
    seed: int = 0,
) -> list[Finding]:
    """Gradient check of ``module.training_step`` on the first ``num_samples`` of ``batch``.

    Runs on a float64 copy; ``module`` and every global RNG stream are left untouched. For each
    trainable tensor, ``coords_per_tensor`` random coordinates (and, with ``direction``, one
    random unit direction) are checked with centered differences of step ``h`` (default: 1e-5
    when the tolerance is below 1e-4, else 1e-6). The same RNG
    state is replayed before every loss evaluation, so dropout draws the same mask each time.

    A coordinate whose analytic and numeric values are both below the resolution of float64
    differences at this tolerance (``4 ulp(loss) / (2 h) / tolerance``) is counted as "both zero"
    rather than judged: roundoff alone could give it any relative error. A coordinate over
    tolerance whose error is explained by the gap between its forward and backward slopes
    (:func:`~lightning_diag.functional.checks.kink_gap`) crossed a kink within ``h`` and is
    counted as "kink crossed" rather than failed.

    Returns:
        ``gradient_check.mismatch`` (FAIL) naming the tensors over tolerance, else
        ``gradient_check.ok`` (INFO); ``gradient_check.non_finite`` (FAIL) for a NaN/Inf loss.
        The per-tensor table is in ``details["table"]`` (a list of :class:`TensorGradientError`).
    """
    validate_arguments(num_samples=num_samples, coords_per_tensor=coords_per_tensor,
                       direction=direction, h=h, tolerance=tolerance, kinks=kinks, seed=seed)
    with side_experiment(module) as clone:
        clone.double().train()
        size = _first_dim(batch)
        index = torch.arange(min(num_samples, size)) if size else torch.arange(0)
        sample = map_floats(select_samples(batch, index) if size else batch, lambda t: t.double())
        rng = RNGState.capture()

        def loss_at() -> float:
            rng.restore()
            with torch.no_grad():
                return float(step_loss(clone, sample))

        rng.restore()
        loss = step_loss(clone, sample)
        value = float(loss.detach())
        if not math.isfinite(value):
            return [Finding(CHECK, "gradient_check.non_finite", Severity.FAIL,
                            f"The training loss is {value} on the first samples; gradients "
                            "cannot be checked.", advice="Fix the NaN/Inf loss first (inputs, "
                            "log of zero, division by zero).", value=value)]
        if loss.requires_grad:
            loss.backward()
        kinky = has_kinks(clone) if kinks is None else kinks
        tol = tolerance if tolerance is not None else gradient_tolerance(
            kinky, count_param_layers(clone))
        step = h if h is not None else (_KINK_STEP if tol >= 1e-4 else _SMOOTH_STEP)
        eps = _ROUNDOFF_ULPS * math.ulp(max(abs(value), 1.0)) / (2 * step) / tol
        gen = torch.Generator().manual_seed(seed)
        probe = _Probe(step, eps, tol, loss_at())
        table = [_check_tensor(name, p, loss_at, probe, coords_per_tensor, direction, gen)
                 for name, p in clone.named_parameters() if p.requires_grad]
    return [_summarize(table, tol, kinky, len(index) if size else None)]


def validate_arguments(*, num_samples: Any, coords_per_tensor: Any, direction: Any, h: Any,
                       tolerance: Any, kinks: Any, seed: Any) -> None:
    """Check the arguments of :func:`check_gradients` (see :mod:`lightning_diag.validation`).

    Example:
        >>> validate_arguments(num_samples=4, coords_per_tensor=10, direction=True, h=1.0,
        ...                    tolerance=None, kinks=None, seed=0)
        Traceback (most recent call last):
        ...
        ValueError: `h` must be a number in (0, 1) or None, got 1.0.
    """
    check_int("num_samples", num_samples)
    check_int("coords_per_tensor", coords_per_tensor)
    check_flag("direction", direction)
    check_number("h", h, low=0, high=1, low_open=True, high_open=True, optional=True)
    check_number("tolerance", tolerance, low=0, low_open=True, optional=True)
    check_flag("kinks", kinks, optional=True)
    check_int("seed", seed, low=None)


def _first_dim(batch: Any) -> int:
    try:
        x = default_batch_to_input(batch)
    except ValueError:
        return 0
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 0


@dataclass(frozen=True)
class _Probe:
    """Settings of one check: step, both-zero threshold, tolerance, unperturbed loss."""

    h: float
    eps: float
    tol: float
    f_zero: float


def _check_tensor(name: str, p: torch.Tensor, loss_at: Callable[[], float], probe: _Probe,
                  coords: int, direction: bool, gen: torch.Generator) -> TensorGradientError:
    grad = p.grad if p.grad is not None else torch.zeros_like(p)
    numel = p.numel()
    picks = (torch.randperm(numel, generator=gen)[:coords] if numel <= 100 * coords
             else torch.randint(numel, (coords,), generator=gen).unique())
    basis = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    flat_grad = grad.reshape(-1)
    rows: list[tuple[float, float, bool]] = []
    for i in picks.tolist():
        basis.view(-1)[i] = 1.0
        rows.append(_probe(loss_at, p.data, basis, float(flat_grad[i]), probe))
        basis.view(-1)[i] = 0.0
    if direction:
        v = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)  # CPU generator
        v /= v.norm()
        rows.append(_probe(loss_at, p.data, v, float((grad * v).sum()), probe))
    a, n, kink = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows, strict=True))
    err, both_zero = relative_error(a, n, probe.eps)
    err = torch.where(kink.bool(), torch.zeros_like(err), err)
    worst = int(err.argmax())
    return TensorGradientError(name, numel, len(rows), int(both_zero.sum()), int(kink.sum()),
                               float(err[worst]), float(a[worst]), float(n[worst]))


def _probe(loss_at: Callable[[], float], param: torch.Tensor, direction: torch.Tensor,
           analytic: float, probe: _Probe) -> tuple[float, float, bool]:
    """``(analytic, numeric, kink crossed)`` for one direction (see :func:`kink_gap`)."""
    f_plus, f_minus = evaluate_around(loss_at, param, direction, probe.h)
    numeric = centered_difference(f_plus, f_minus, probe.h)
    pair = torch.tensor([[analytic], [numeric]], dtype=torch.float64)
    if float(relative_error(pair[0], pair[1], probe.eps)[0][0]) <= probe.tol:
        return analytic, numeric, False
    gap = kink_gap(f_plus, probe.f_zero, f_minus, probe.h)
    return analytic, numeric, gap >= 0.5 * abs(analytic - numeric)


def _summarize(table: list[TensorGradientError], tol: float, kinky: bool,
               samples: int | None) -> Finding:
    worst = max((t.worst_error for t in table), default=0.0)
    bad = sorted((t for t in table if t.worst_error > tol), key=lambda t: -t.worst_error)
    checked = sum(t.checked for t in table)
    zeros = sum(t.both_zero for t in table)
    kinks = sum(t.kinks for t in table)
    basis = f"tolerance {tol:.0e} ({'with' if kinky else 'no'} kinks; ~1e-7 is good)"
    details = {"table": table, "tolerance": tol, "samples": samples}
    if bad:
        named = ", ".join(f"{t.name} ({t.worst_error:.2e})" for t in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        return Finding(CHECK, "gradient_check.mismatch", Severity.FAIL,
                       f"Relative gradient error above {basis} in {len(bad)} of {len(table)} "
                       f"tensors: {named}{more}.", advice=ADVICE, value=worst, expected=tol,
                       details=details)
    return Finding(CHECK, "gradient_check.ok", Severity.INFO,
                   f"Worst relative gradient error {worst:.2e} over {checked} checks in "
                   f"{len(table)} tensors ({zeros} both near zero, {kinks} across a kink), within "
                   f"{basis}.",
                   value=worst, expected=tol,
                   details=details)


def error_table(table: list[TensorGradientError]) -> str:
    """The per-tensor errors as a markdown table (what goes to TensorBoard)."""
    head = ("| tensor | numel | checked | both zero | kink crossed | worst rel. error | analytic "
            "| numeric |\n|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(t.row() for t in table)

"""Recipe step 2: compare analytic gradients with centered finite differences, at fit start.

:func:`check_gradients` runs on a float64 copy of the module; the module and every global RNG
stream are left untouched. For each trainable tensor, ``coords_per_tensor`` random coordinates
(and, with ``direction``, one random unit direction) are checked with centered differences of
step ``h`` (default: 1e-5 when the tolerance is below 1e-4, else 1e-6). The same RNG state is
replayed before every loss evaluation, so dropout draws the same mask each time.

- **How many coordinates** (``coords_per_tensor=None``, the default): about
  :data:`AUTO_COMPARED` comparisons spread over the tensors, at least :data:`AUTO_MIN_COORDS`
  and at most :data:`AUTO_MAX_COORDS` coordinates per tensor (a model of up to three tensors
  gets ten each, a CNN of twelve three), then one more coordinate per tensor in turn (up to
  :data:`AUTO_MAX_COORDS`) while fewer than :data:`AUTO_JUDGED` comparisons are judged. The
  direction covers every coordinate of its tensor at once: a bug in any of them moves
  ``grad . v``, so the coordinates need not find it by chance.

- **Set aside, not judged**: a coordinate whose analytic and numeric values are both below the
  resolution of float64 differences at this tolerance (``4 ulp(loss) / (2 h) / tolerance``) is
  counted as "both zero": roundoff alone could give it any relative error. A coordinate over
  tolerance whose error is explained by the gap between its forward and backward slopes
  (:func:`~lightning_diag.functional.checks.kink_gap`) crossed a kink within ``h`` and is
  counted as "kink crossed" rather than failed.
- **A function of the weights**: the same point is evaluated twice first. Attributes that
  ``training_step`` changes between calls (a recurrent state kept in ``self.hidden``) are put
  back to the live module's value before every evaluation, and the finding says so; a loss that
  still differs between the two (randomness outside the global RNG streams, nondeterministic
  kernels) leaves nothing to compare: ``gradient_check.inconclusive`` (WARN).
- **True float64** (recipe step 2.3): the step's own casts to a lower precision
  (``labels.float()``, ``.to(torch.float32)``, ``dtype=torch.float32``) are evaluated in float64
  and the finding names them (:mod:`lightning_diag.checks.float64`); a step that still computes
  below float64 (an ``autocast`` region of its own) cannot be judged by finite differences:
  ``gradient_check.inconclusive`` (INFO), naming the operations.

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

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import (
    UserCodeError,
    call_user,
    default_batch_to_input,
    map_floats,
    select_samples,
    step_loss,
)
from lightning_diag.checks.float64 import Float64Step
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
from lightning_diag.isolation import RNGState, StepState, side_experiment
from lightning_diag.validation import check_callable, check_flag, check_int, check_number

__all__ = ["TensorGradientError", "check_gradients", "error_table", "validate_arguments"]

CHECK = "GradientCheck"
ADVICE = (
    "The analytic gradient disagrees with the numeric one (recipe step 2): look for a custom "
    "autograd.Function with a wrong backward, a `.detach()`/`.data`/`torch.no_grad` cutting the "
    "graph, or an in-place operation in the layers named."
)
NOT_REPRODUCIBLE_ADVICE = (
    "Make `training_step` a function of the weights for the check: draw its randomness from the "
    "global torch/NumPy/Python streams (the check replays them), or pass `reset=` to the check, "
    "a function called on the copy before every evaluation (e.g. `lambda m: "
    "m.noise.manual_seed(0)` for a generator of your own, or clearing a cache)."
)
#: Roundoff of one float64 loss evaluation is about one ulp; this margin covers a few more. Two
#: evaluations of the same point closer than this are the same loss.
_ROUNDOFF_ULPS = 4.0
#: "ok" needs at least this many comparisons judged (not set aside as both near zero or across a
#: kink). A bug that corrupts a third of the coordinates checked escapes 10 random comparisons
#: with probability 0.67^10 = 2 %; the default (10 coordinates and a direction per tensor) makes
#: 11 per tensor, so a model with one parameter tensor reaches it.
MIN_JUDGED = 10
#: ``coords_per_tensor=None``: about this many comparisons in all, spread over the tensors, with
#: between these many coordinates per tensor (at most: the fixed default before, so that a model
#: of one to three tensors is checked as before; the direction covers the rest of each tensor),
#: one more per tensor in turn while fewer than twice :data:`MIN_JUDGED` are judged (many both
#: near zero, as in an embedding's unused rows).
AUTO_COMPARED, AUTO_MIN_COORDS, AUTO_MAX_COORDS = 36, 3, 10
AUTO_JUDGED = 2 * MIN_JUDGED
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
    coords_per_tensor: int | None = None,
    direction: bool = True,
    h: float | None = None,
    tolerance: float | None = None,
    kinks: bool | None = None,
    seed: int = 0,
    reset: Callable[[pl.LightningModule], Any] | None = None,
) -> list[Finding]:
    """Gradient check of ``module.training_step`` on the first ``num_samples`` of ``batch``
    (how it judges: see the module docstring).

    Args:
        module: The LightningModule, as initialized.
        batch: One training batch; its first ``num_samples`` samples are used.
        num_samples: Samples kept (the cost grows with them).
        coords_per_tensor: Random coordinates checked per parameter tensor; None (default):
            spread over the tensors (see the module docstring).
        direction: Also check one random unit direction per tensor.
        h: The centered-difference step (default: 1e-5 below a 1e-4 tolerance, else 1e-6).
        tolerance: Overrides the recipe's tolerance.
        kinks: Overrides the detection of kink layers.
        seed: Seed of the coordinate and direction sampling (a generator of its own).
        reset: Called on the copy before every loss evaluation, to put back state the check
            cannot see (reseed a generator of your own, clear a cache).

    Raises:
        UserCodeError: ``training_step`` or ``reset`` raised.

    Returns:
        ``gradient_check.mismatch`` (FAIL) naming the tensors over tolerance; else
        ``gradient_check.ok`` (INFO) when at least :data:`MIN_JUDGED` comparisons were judged,
        or ``gradient_check.inconclusive`` (WARN) when fewer were or the loss is not
        reproducible, (INFO) when the step computes below float64;
        ``gradient_check.non_finite`` (FAIL) for a NaN/Inf loss. The counts (compared, judged,
        set aside as both near zero or across a kink) are in the message and ``details``; the
        per-tensor table in ``details["table"]`` (a list of :class:`TensorGradientError`).
    """
    validate_arguments(num_samples=num_samples, coords_per_tensor=coords_per_tensor,
                       direction=direction, h=h, tolerance=tolerance, kinks=kinks, seed=seed,
                       reset=reset)
    with side_experiment(module) as clone:
        clone.double().train()
        run = _Evaluator(clone, batch, num_samples, reset)
        refused = run.settle()
        if refused is not None:
            return [refused]
        value = run.backward()
        if not math.isfinite(value):
            return [Finding(CHECK, "gradient_check.non_finite", Severity.FAIL,
                            f"The training loss is {value} on the first samples; gradients "
                            "cannot be checked.", advice="Fix the NaN/Inf loss first (inputs, "
                            "log of zero, division by zero).", value=value)]
        kinky = has_kinks(clone) if kinks is None else kinks
        probe = _Probe.of(clone, value, run.loss_at(), kinky, h, tolerance)
        table = _check_tensors(clone, run, probe, coords_per_tensor, direction, seed)
    return [_summarize(table, probe.tol, kinky, run.samples, run.restored, run.float64)]


class _Evaluator:
    """The loss of the copy's ``training_step`` on the float64 sample, as a function of the
    weights: the RNG streams replayed, the carried state put back (once found to matter), the
    user's ``reset`` called, and the step run in true float64 (:class:`Float64Step`)."""

    def __init__(self, clone: pl.LightningModule, batch: Any, num_samples: int,
                 reset: Callable[[pl.LightningModule], Any] | None) -> None:
        self.clone, self.reset = clone, reset
        self.state = StepState(clone, torch.float64)  # the live module's carried state
        self.state.restore()
        size = _first_dim(batch)
        index = torch.arange(min(num_samples, size)) if size else torch.arange(0)
        self.samples = len(index) if size else None
        self.sample = map_floats(select_samples(batch, index) if size else batch,
                                 lambda t: t.double())
        self.rng = RNGState.capture()
        self.float64 = Float64Step()
        self.restored: list[str] = []
        #: The analytic gradients, by parameter name (:meth:`backward`).
        self.gradients: dict[str, torch.Tensor] = {}

    def _prepare(self, restore: bool) -> None:
        self.rng.restore()
        if restore:
            self.state.restore()
        if self.reset is not None:
            call_user("`reset`", self.reset, self.clone)

    def _loss(self) -> torch.Tensor:
        loss = step_loss(self.clone, self.sample)
        self.float64.check_loss(loss)
        return loss

    def value(self, restore: bool, graph: bool = False) -> float:
        self._prepare(restore)
        with torch.set_grad_enabled(graph), self.float64.evaluation():
            return float(self._loss().detach())

    def settle(self) -> Finding | None:
        """Evaluate the same point twice (putting back the carried state if the two differ):
        a finding when the check cannot judge (precision lost, a loss that is not
        reproducible), else None. The first evaluation, watched for lost precision, builds the
        graph: a tensor's history tells what depends on the weights."""
        first = self.value(False, graph=True)
        if self.float64.lost:
            return _lost_precision(self.float64)
        if self.float64.deciding:  # whether the step's casts lower what the loss is made of
            with contextlib.suppress(UserCodeError):  # it needs them: they will be rewritten
                self.value(False, graph=True)
        second = self.value(False)
        carried = self.state.changed()
        self.restored = carried if not _same_loss(first, second) else []
        if self.restored:
            first, second = self.value(True), self.value(True)
        if not _same_loss(first, second):
            return _not_reproducible(first, second, self.restored)
        return None

    def backward(self) -> float:
        """The analytic gradients at the unperturbed weights (into :attr:`gradients`); the loss.

        They are kept apart and ``.grad`` is cleared: every later evaluation runs the user's
        step again, and a step that edits ``.grad`` after its backward (``clip_gradients``,
        ``clip_grad_norm_``, ``self.zero_grad()``, under manual optimization) would otherwise
        clip or clear the very gradients being compared. Such edits act on the update, not on
        the gradient of the loss, which is what the check compares.
        """
        self._prepare(True)
        params = [(name, p) for name, p in self.clone.named_parameters() if p.requires_grad]
        for _, p in params:
            p.grad = None
        with self.float64.evaluation():
            loss = self._loss()
            if loss.requires_grad:
                loss.backward()
        for name, p in params:
            self.gradients[name] = (p.grad.detach().clone() if p.grad is not None
                                    else torch.zeros_like(p))
            p.grad = None
        return float(loss.detach())

    def loss_at(self) -> float:
        return self.value(True)


def _same_loss(a: float, b: float) -> bool:
    """Equal up to the roundoff the numeric gradient already allows for (NaN equals NaN: the
    non-finite loss is reported as such)."""
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= _ROUNDOFF_ULPS * math.ulp(max(abs(a), abs(b), 1.0))


def _not_reproducible(first: float, second: float, restored: list[str]) -> Finding:
    also = (f" and `{'`, `'.join(restored)}` put back (state `training_step` carries between "
            "calls)" if restored else "")
    return Finding(CHECK, "gradient_check.inconclusive", Severity.WARN,
                   f"Gradient check inconclusive: the loss is not reproducible, {first!r} then "
                   f"{second!r} at the same weights, with every global RNG stream replayed"
                   f"{also}. Finite differences of a loss that moves by itself measure nothing; "
                   "likely cause: randomness outside the global streams (a torch.Generator or "
                   "NumPy Generator of your own, OS entropy) or nondeterministic kernels.",
                   advice=NOT_REPRODUCIBLE_ADVICE, value=abs(first - second),
                   details={"cause": "not_reproducible", "losses": [first, second],
                            "restored_state": restored})


def _lost_precision(float64: Float64Step) -> Finding:
    lost = float64.describe_lost()
    return Finding(CHECK, "gradient_check.inconclusive", Severity.INFO,
                   f"Gradient check inconclusive: part of the step still runs below float64 in "
                   f"the float64 copy ({lost}), after its casts were turned to float64. Centered "
                   "differences of a loss computed in float32 or lower measure roundoff, not "
                   "the gradient (recipe step 2.3: compute the numeric gradient in double "
                   "precision), so the gradients are not judged.",
                   advice="Compute the loss in the dtype of the model's output (`.to(out.dtype)` "
                   "or `.type_as(out)` rather than `.float()`), and leave mixed precision to "
                   "the Trainer's `precision=` rather than an `autocast` inside the step.",
                   details={"cause": "lost_precision", "lost": dict(float64.lost),
                            "casts": dict(float64.casts)})


def validate_arguments(*, num_samples: Any, coords_per_tensor: Any, direction: Any, h: Any,
                       tolerance: Any, kinks: Any, seed: Any, reset: Any = None) -> None:
    """Check the arguments of :func:`check_gradients` (see :mod:`lightning_diag.validation`).

    Example:
        >>> validate_arguments(num_samples=4, coords_per_tensor=10, direction=True, h=1.0,
        ...                    tolerance=None, kinks=None, seed=0)
        Traceback (most recent call last):
        ...
        ValueError: `h` must be a number in (0, 1) or None, got 1.0.
    """
    check_int("num_samples", num_samples)
    check_int("coords_per_tensor", coords_per_tensor, optional=True)
    check_flag("direction", direction)
    check_number("h", h, low=0, high=1, low_open=True, high_open=True, optional=True)
    check_number("tolerance", tolerance, low=0, low_open=True, optional=True)
    check_flag("kinks", kinks, optional=True)
    check_int("seed", seed, low=None)
    check_callable("reset", reset, optional=True)


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

    @classmethod
    def of(cls, clone: torch.nn.Module, value: float, f_zero: float, kinky: bool,
           h: float | None, tolerance: float | None) -> _Probe:
        """The recipe's tolerance (or ``tolerance``), the step for it (or ``h``), and the
        both-zero threshold at a loss of ``value``."""
        tol = tolerance if tolerance is not None else gradient_tolerance(
            kinky, count_param_layers(clone))
        step = h if h is not None else (_KINK_STEP if tol >= 1e-4 else _SMOOTH_STEP)
        eps = _ROUNDOFF_ULPS * math.ulp(max(abs(value), 1.0)) / (2 * step) / tol
        return cls(step, eps, tol, f_zero)


def _check_tensors(clone: torch.nn.Module, run: _Evaluator, probe: _Probe,
                   coords_per_tensor: int | None, direction: bool,
                   seed: int) -> list[TensorGradientError]:
    """Every trainable tensor's comparisons (how many: see the module docstring)."""
    params = [(name, p) for name, p in clone.named_parameters() if p.requires_grad]
    if coords_per_tensor is None:
        per_tensor = math.ceil(AUTO_COMPARED / max(len(params), 1)) - int(direction)
        coords = min(max(per_tensor, AUTO_MIN_COORDS), AUTO_MAX_COORDS)
        most = AUTO_MAX_COORDS
    else:
        coords = most = coords_per_tensor
    gen = torch.Generator().manual_seed(seed)
    tensors = [_TensorProbes(name, p, run.gradients[name], most, direction, gen)
               for name, p in params]
    for t in tensors:
        t.run(run.loss_at, probe, coords)
    if coords_per_tensor is None:
        while (left := [t for t in tensors if t.done < len(t.picks)]) and sum(
                t.judged for t in tensors) < AUTO_JUDGED:
            for t in left:
                t.run(run.loss_at, probe, 1)
    return [t.result(probe) for t in tensors]


class _TensorProbes:
    """The comparisons of one tensor: its coordinates (drawn up front, up to ``most``, run a
    few at a time) and its direction (run with the first coordinates)."""

    def __init__(self, name: str, p: torch.Tensor, grad: torch.Tensor, most: int,
                 direction: bool, gen: torch.Generator) -> None:
        self.name, self.p, self.grad = name, p, grad
        numel = p.numel()
        self.drawn = numel > 100 * most  # drawn with replacement (a big tensor)
        if not self.drawn:
            self.picks = torch.randperm(numel, generator=gen)[:most].tolist()
        else:  # distinct draws, in the order drawn (the first few are as random as all)
            self.picks = list(dict.fromkeys(torch.randint(numel, (most,), generator=gen).tolist()))
        self.direction: torch.Tensor | None = None
        if direction:
            v = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)  # CPU generator
            self.direction = v / v.norm()
        self.done = 0  # coordinates run
        self.rows: list[tuple[float, float, bool]] = []
        self.judged = 0  # comparisons neither both near zero nor across a kink

    def run(self, loss_at: Callable[[], float], probe: _Probe, count: int) -> None:
        """Run the next ``count`` coordinates (the direction with the first ones)."""
        basis = torch.zeros(self.p.shape, dtype=self.p.dtype, device=self.p.device)
        flat_grad = self.grad.reshape(-1)
        chosen = self.picks[self.done:self.done + count]
        for i in sorted(chosen) if self.drawn else chosen:  # drawn ones in index order
            basis.view(-1)[i] = 1.0
            self._add(_probe(loss_at, self.p.data, basis, float(flat_grad[i]), probe), probe)
            basis.view(-1)[i] = 0.0
        self.done = min(self.done + count, len(self.picks))
        if self.direction is not None:
            v, self.direction = self.direction, None
            self._add(_probe(loss_at, self.p.data, v, float((self.grad * v).sum()), probe),
                      probe)

    def _add(self, row: tuple[float, float, bool], probe: _Probe) -> None:
        self.rows.append(row)
        a, n, kink = row
        both_zero = relative_error(torch.tensor([a], dtype=torch.float64),
                                   torch.tensor([n], dtype=torch.float64), probe.eps)[1]
        self.judged += not (kink or bool(both_zero))

    def result(self, probe: _Probe) -> TensorGradientError:
        a, n, kink = (torch.tensor(col, dtype=torch.float64)
                      for col in zip(*self.rows, strict=True))
        err, both_zero = relative_error(a, n, probe.eps)
        err = torch.where(kink.bool(), torch.zeros_like(err), err)
        worst = int(err.argmax())
        return TensorGradientError(self.name, self.p.numel(), len(self.rows),
                                   int(both_zero.sum()), int(kink.sum()), float(err[worst]),
                                   float(a[worst]), float(n[worst]))


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
               samples: int | None, restored: list[str], float64: Float64Step) -> Finding:
    worst = max((t.worst_error for t in table), default=0.0)
    bad = sorted((t for t in table if t.worst_error > tol), key=lambda t: -t.worst_error)
    checked = sum(t.checked for t in table)
    zeros = sum(t.both_zero for t in table)
    kinks = sum(t.kinks for t in table)
    judged = checked - zeros - kinks
    basis = f"tolerance {tol:.0e} ({'with' if kinky else 'no'} kinks; ~1e-7 is good)"
    counts = (f"{judged} of {checked} comparisons judged in {len(table)} tensors ({zeros} set "
              f"aside as both near zero, {kinks} as across a kink)")
    state = (f" `training_step` carries `{'`, `'.join(restored)}` between calls: put back to the "
             "live module's value before every evaluation." if restored else "")
    state += float64.describe_casts()
    details = {"table": table, "tolerance": tol, "samples": samples, "compared": checked,
               "judged": judged, "both_zero": zeros, "kinks": kinks, "min_judged": MIN_JUDGED,
               "restored_state": restored, "float64_casts": dict(float64.casts)}
    if bad:
        named = ", ".join(f"{t.name} ({t.worst_error:.2e})" for t in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        return Finding(CHECK, "gradient_check.mismatch", Severity.FAIL,
                       f"Relative gradient error above {basis} in {len(bad)} of {len(table)} "
                       f"tensors: {named}{more}; {counts}.{state}", advice=ADVICE, value=worst,
                       expected=tol, details=details)
    if judged < MIN_JUDGED:
        return Finding(CHECK, "gradient_check.inconclusive", Severity.WARN,
                       f"Gradient check inconclusive: only {counts}, fewer than {MIN_JUDGED}; "
                       f"the worst judged error {worst:.2e} is within {basis}, but over too few "
                       f"comparisons to call the gradients right.{state}",
                       advice="Raise `coords_per_tensor` (and keep `direction=True`); if most "
                       "values are both near zero, the gradients vanish on these samples: give "
                       "more `num_samples`, or check why (dead units, saturation).",
                       value=worst, expected=tol,
                       details={**details, "cause": "too_few_comparisons"})
    return Finding(CHECK, "gradient_check.ok", Severity.INFO,
                   f"Worst relative gradient error {worst:.2e} over {counts}, within "
                   f"{basis}.{state}", value=worst, expected=tol, details=details)


def error_table(table: list[TensorGradientError]) -> str:
    """The per-tensor errors as a markdown table (what goes to TensorBoard)."""
    head = ("| tensor | numel | checked | both zero | kink crossed | worst rel. error | analytic "
            "| numeric |\n|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(t.row() for t in table)

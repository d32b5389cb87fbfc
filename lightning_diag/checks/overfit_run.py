"""The overfit test's copy on its fixed batches: one pass at a time, and the loss's references
measured through the user's own step (the loss at memorising outputs, :class:`LossFloor`; the
loss of the best constant output; an output squashed out of the targets' range).

Used by :func:`lightning_diag.checks.overfit.overfit_batches`, which trains through
:meth:`OverfitRun.one_pass`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import (
    BatchFn,
    NoLossError,
    OutputCapture,
    UserCodeError,
    call_user,
    default_batch_to_input,
    step_loss,
)
from lightning_diag.checks.label_use import StepProbe, step_task
from lightning_diag.checks.overfit_result import FLOOR_FRACTION, MARGINS, LossFloor
from lightning_diag.checks.reference_outputs import (
    Prediction,
    PredictionTap,
    Replay,
    ReplayMiss,
    Substitution,
    main_prediction,
    record_predictions,
)
from lightning_diag.functional.output_form import memorising_output
from lightning_diag.functional.task import Task, correct_counts, select_output
from lightning_diag.isolation import (
    OptimizationSettings,
    RNGState,
    SideTraining,
    StepState,
    preserved_rng,
)

__all__ = ["CONSTANT_ITERATIONS", "OverfitRun"]

#: L-BFGS iterations fitting the best constant output (:meth:`OverfitRun.constant_loss`).
CONSTANT_ITERATIONS = 30


class OverfitRun:
    """The copy, its fixed batches and how it steps: one pass at a time."""

    def __init__(self, clone: pl.LightningModule, batches: list[Any], to_target: BatchFn,
                 settings: OptimizationSettings, training: SideTraining,
                 state: StepState) -> None:
        self.clone, self.batches = clone, batches
        self.settings, self.training, self.state = settings, training, state
        self.targets = [call_user("`batch_to_target`", to_target, b) for b in batches]
        self.task: Task | None = None
        self.predictions: list[Prediction] = []
        self.main: int | None = None
        self.saw_batch_input = True
        self.tap: PredictionTap | None = None
        self.replay: Replay | None = None
        self._replay_tried = False
        self.last_outputs: list[torch.Tensor] = []

    @property
    def probabilities(self) -> bool:
        """The model's prediction itself is probabilities (a softmax or a sigmoid in it)."""
        return (self.main is not None
                and self.predictions[self.main].form.activation in ("softmax", "sigmoid"))

    @contextmanager
    def record(self, capture: OutputCapture) -> Iterator[None]:
        """Record the predictions of the step (on the first batch, RNG streams and carried
        state put back), whether the model saw the batch's own input, and, inside, tap the
        main prediction of every step (the output the task is read from)."""
        batch = self.batches[0]
        with preserved_rng() as rng:
            capture.clear()
            with self.settings.forward_context(self.clone.device):
                _, self.predictions, tensors = record_predictions(self.clone, batch, 0)
            output = select_output(capture.output)
            self.state.restore()
            self.main = main_prediction(self.predictions, tensors, output)
            # the task the shapes say, unless the loss ignores the labels it reads as classes
            probe = StepProbe(self.clone, rng, self.state,
                              lambda: self.settings.forward_context(self.clone.device))
            self.task = step_task(probe, batch, output if self.main is None
                                  else tensors[self.main], self.targets[0], tensors)
        self.state.restore()
        if self.main is None:
            yield
            return
        try:
            given = default_batch_to_input(batch)
        except ValueError:  # a batch the default cannot read: nothing to compare
            given = None
        if isinstance(given, torch.Tensor):
            self.saw_batch_input = any(_same_values(t, given)
                                       for t in self.predictions[self.main].inputs)
        with PredictionTap(self.predictions[self.main]) as tap:
            self.tap = tap
            try:
                yield
            finally:
                self.tap = None

    def _mean_loss(self, replace: Callable[[int, torch.Tensor], torch.Tensor | None],
                   batch_replace: Callable[[int], None] | None = None) -> torch.Tensor:
        """The mean step loss over the batches with the predictions replaced, from the carried
        state and the same RNG state for each batch; the network's outputs replayed where that
        gives the real losses (:meth:`_prepare_replay`)."""
        self._prepare_replay()
        try:
            return self._pass(replace, batch_replace, self.replay)
        except UserCodeError as err:
            if self.replay is None or not isinstance(err.error, ReplayMiss):
                raise
            self.replay = None  # the replaced output changed what the step calls
            return self._pass(replace, batch_replace, None)

    def _pass(self, replace: Callable[[int, torch.Tensor], torch.Tensor | None],
              batch_replace: Callable[[int], None] | None,
              replay: Replay | None) -> torch.Tensor:
        rng = RNGState.capture()
        self.state.restore()
        losses = []
        try:
            with Substitution(self.predictions, replace) as sub, (
                    replay.replaying() if replay is not None else nullcontext()):
                for i, batch in enumerate(self.batches):
                    if batch_replace is not None:
                        batch_replace(i)
                    if replay is not None:
                        replay.step(i)
                    rng.restore()
                    with self.settings.forward_context(self.clone.device):
                        losses.append(sub.step(self.clone, batch, i).float())
        finally:
            rng.restore()
            self.state.restore()
        return torch.stack(losses).mean()

    def _prepare_replay(self) -> None:
        """Record the prediction modules' outputs on every batch once, and keep them for the
        reference passes when replaying them (nothing replaced) gives the real losses: the
        loss then depends on the network through them alone, and the many evaluations of the
        floor and of the constant output cost no forward pass of the network."""
        if self._replay_tried or not self.predictions:
            return
        self._replay_tried = True
        replay = Replay(self.predictions)
        rng = RNGState.capture()
        self.state.restore()
        try:
            with preserved_rng(), torch.no_grad():
                with replay.recording():
                    for i, batch in enumerate(self.batches):
                        replay.step(i)
                        rng.restore()
                        with self.settings.forward_context(self.clone.device):
                            replay.losses[i] = float(step_loss(self.clone, batch, i))
                replayed = {}
                with replay.replaying():
                    self.state.restore()
                    for i, batch in enumerate(self.batches):
                        replay.step(i)
                        rng.restore()
                        with self.settings.forward_context(self.clone.device):
                            replayed[i] = float(step_loss(self.clone, batch, i))
            self.replay = replay if replay.matches(replayed) else None
        except (UserCodeError, NoLossError):  # not replayable: the network runs each time
            self.replay = None
        finally:
            rng.restore()
            self.state.restore()

    def loss_floor(self) -> LossFloor | None:
        """The user's loss at memorising outputs (:class:`LossFloor`) where the prediction is
        one tensor of a classification task; None elsewhere, when the step fails on it, or
        when the loss does not judge the output against the target the way the task says (a
        confidently wrong output must be worse than a know-nothing one). Where two class
        layouts fit the output (``(N, T, V)`` with ``T = V``), the one the loss confirms is
        kept, and becomes the task."""
        task = self.task
        if (task is None or not task.is_classification or len(self.predictions) != 1
                or self.main != 0 or not all(isinstance(t, torch.Tensor) for t in self.targets)):
            return None
        found = []
        for layout in _layouts(task, self.predictions[0].shape, self.targets[0]):
            try:
                path = [self._memorised(layout, m) for m in MARGINS]
                best = MARGINS[min(range(len(path)), key=path.__getitem__)]
                wrong = self._memorised(layout, best, wrong=True)
            except (UserCodeError, NoLossError, RuntimeError):  # a step refusing the output
                continue
            if all(map(math.isfinite, path)) and wrong > path[0]:
                found.append((min(path), layout, LossFloor(MARGINS, path)))
        if not found:
            return None
        _, self.task, floor = min(found, key=lambda f: f[0])
        return floor

    def _memorised(self, task: Task, margin: float, wrong: bool = False) -> float:
        """The mean loss at the memorising output of ``margin`` (on the next class when
        ``wrong``)."""
        current = [0]

        def set_batch(i: int) -> None:
            current[0] = i

        def replace(_: int, out: torch.Tensor) -> torch.Tensor | None:
            target = self.targets[current[0]]
            if wrong:
                classes = int(task.num_classes or 2)
                target = (1 - target if task.kind == "multilabel"
                          else torch.where(target >= 0, (target + 1) % classes, target))
            return memorising_output(task, out, target, margin)

        with preserved_rng(), torch.no_grad():
            return float(self._mean_loss(replace, set_batch))

    def constant_loss(self) -> float | None:
        """The loss of the best output shared by every sample (one value per position, fitted
        by L-BFGS through the user's step); None where it cannot be fitted."""
        if not self.predictions:
            return None
        device = self.clone.device
        params = [torch.zeros(p.shape[1:], device=device, requires_grad=True)
                  for p in self.predictions]

        def replace(j: int, actual: torch.Tensor) -> torch.Tensor:
            if tuple(actual.shape[1:]) != tuple(params[j].shape):
                raise _ShapeChanged
            z = params[j].to(actual.dtype).expand_as(actual)
            return self.predictions[j].form.activate(z)

        optimizer = torch.optim.LBFGS(params, max_iter=CONSTANT_ITERATIONS,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = self._mean_loss(replace)
            loss.backward()
            return loss

        try:
            with preserved_rng(), torch.enable_grad():
                optimizer.step(closure)
                with torch.no_grad():
                    value = float(self._mean_loss(replace))
        except (_ShapeChanged, UserCodeError, NoLossError, RuntimeError):
            return None
        return value if math.isfinite(value) else None

    @property
    def per_position(self) -> bool:
        """Classes scored per pixel or token: targets beyond ``(N,)``."""
        target = self.targets[0]
        return (self.task is not None and self.task.kind == "multiclass"
                and isinstance(target, torch.Tensor) and target.dim() > 1)

    def one_pass(self, capture: OutputCapture, count: int,
                 train: bool) -> tuple[float, float | None, int]:
        """Mean loss, pooled accuracy (None unless classification) and optimizer steps taken
        over the first ``count`` batches."""
        losses, correct, counted, steps = [], 0, 0, 0
        outputs = []
        # Every pass starts from the live module's carried state (self.hidden), as the first
        # did: the batches keep the context they were read in.
        self.state.restore()
        for i, batch in enumerate(self.batches[:count]):
            capture.clear()
            if self.tap is not None:
                self.tap.reset()
            with self.settings.forward_context(self.clone.device):
                loss = step_loss(self.clone, batch, i)
            if train and self.training.backward(loss, last=i == count - 1):
                steps += 1
            losses.append(float(loss.detach()))
            tapped = self.tap.value if self.tap is not None else None
            output = tapped if tapped is not None else select_output(capture.output)
            counts = (correct_counts(self.task, output, self.targets[i])
                      if self.task is not None and self.task.is_classification
                      and isinstance(output, torch.Tensor) else None)
            if counts is not None:
                correct, counted = correct + counts[0], counted + counts[1]
            if isinstance(output, torch.Tensor):
                outputs.append(output.detach())
        self.last_outputs = outputs
        return sum(losses) / len(losses), (correct / counted if counted else None), steps

    def range_squash(self) -> str:
        """Why the last pass's output is squashed, when it is shown (else ``""``): a bounded
        activation (a sigmoid, an exponential) whose range leaves out at least
        :data:`FLOOR_FRACTION` of the targets, with at least that share of the outputs pinned
        at its bound."""
        task = self.task
        if (task is None or task.kind != "regression" or self.main is None
                or len(self.last_outputs) != len(self.targets)):
            return ""
        form = self.predictions[self.main].form
        try:
            outputs = torch.cat([o.reshape(-1) for o in self.last_outputs])
            targets = torch.cat([t.reshape(-1) for t in self.targets]).to(outputs.device)
        except (RuntimeError, AttributeError):  # targets of another structure
            return ""
        if outputs.numel() != targets.numel():
            return ""
        outside, pinned = form.out_of_range(outputs, targets)
        if outside < FLOOR_FRACTION or pinned < FLOOR_FRACTION:
            return ""
        low, high = form.range or (0.0, 0.0)
        return (f"the output comes out of a {form.activation}, in ({low:g}, {high:g}), yet "
                f"{outside:.0%} of the targets lie outside it (from {float(targets.min()):.3g} "
                f"to {float(targets.max()):.3g}) and {pinned:.0%} of the outputs are pinned at "
                f"its bound (>= {FLOOR_FRACTION:.0%} each): something squashes the output.")


def _layouts(task: Task, shape: tuple[int, ...], target: torch.Tensor) -> list[Task]:
    """``task``, and the other class layout where the output's shape fits both (a class
    dimension 1 or last: ``(N, T, V)`` with ``T = V``)."""
    if task.kind != "multiclass" or task.flattened or len(shape) < 3:
        return [task]
    other = -1 if task.class_dim == 1 else 1
    fits = (tuple(shape[:-1]) == tuple(target.shape) if other == -1
            else tuple(shape[2:]) == tuple(target.shape[1:]))
    return [task, dataclasses.replace(task, class_dim=other)] if fits else [task]


class _ShapeChanged(Exception):
    """The prediction's shape changes between batches: no single constant output fits."""


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, whatever the shape (a flattening view of the batch's input)."""
    return (a.numel() == b.numel() and a.dtype.is_floating_point == b.dtype.is_floating_point
            and torch.equal(a.reshape(-1), b.detach().reshape(-1).to(a.device, a.dtype)))

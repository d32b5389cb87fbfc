"""Recipe step 4: overfit a few fixed batches with regularization off, on a copy.

Example:
    >>> from lightning_diag.examples.digits import DigitsClassifier, load_digits_tensors
    >>> from lightning_diag.checks.overfit import overfit_small_batch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> x, y = load_digits_tensors()
    >>> loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    >>> result = overfit_small_batch(DigitsClassifier(arch="mlp", lr=1e-2), loader, num_batches=2)
    >>> result.reached, result.best_accuracy
    (True, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_diag.batch import (
    BatchFn,
    default_batch_to_input,
    default_batch_to_target,
    forward_output,
    step_loss,
)
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.checks import is_classification
from lightning_diag.isolation import (
    disable_regularization,
    first_batches,
    fresh_optimizer,
    preserved_rng,
    side_experiment,
)
from lightning_diag.validation import check_callable, check_int, check_number, check_str

__all__ = ["OverfitResult", "overfit_batches", "overfit_small_batch", "validate_arguments"]

CHECK = "OverfitSmallBatch"
ADVICE = (
    "With regularization off the network must memorize 5-10 batches (recipe step 4): check the "
    "loss (no softmax before cross-entropy), the labels and the data pipeline, then try other "
    "learning rates, architectures and weight initializations (step 4.2)."
)
#: Called after each pass over the batches with ``(step, mean loss, accuracy or None)``.
PassHook = Callable[[int, float, "float | None"], None]


@dataclass
class OverfitResult:
    """The outcome of :func:`overfit_small_batch`.

    ``reached`` is True when, in one pass over the batches, every prediction was right
    (classification only) and the mean loss was at most ``loss_fraction`` (default 5 %) times
    the initial loss. Measured on digits: healthy MLPs and CNNs reach 100 % accuracy and 5 % of
    the initial loss in the same pass, while a softmax applied before cross-entropy reaches
    100 % accuracy but floors near ``log(1 + 9/e) = 1.46``, 63 % of ``log 10``: accuracy alone
    would call it a success.
    """

    reached: bool
    steps: int
    initial_loss: float
    best_loss: float
    best_accuracy: float | None
    loss_fraction: float
    num_batches: int
    turned_off: list[str] = field(default_factory=list)
    curve: list[tuple[int, float, float | None]] = field(default_factory=list)

    @property
    def classification(self) -> bool:
        return self.best_accuracy is not None

    def findings(self) -> list[Finding]:
        """``overfit.reached`` (INFO), ``overfit.not_reached`` or ``overfit.non_finite`` (FAIL)."""
        target = self.loss_fraction * self.initial_loss
        off = ", ".join(self.turned_off) or "nothing to turn off"
        acc = (f"best accuracy {self.best_accuracy:.1%}, " if self.best_accuracy is not None
               else "")
        if not math.isfinite(self.initial_loss) or not math.isfinite(self.best_loss):
            return [Finding(CHECK, "overfit.non_finite", Severity.FAIL,
                            f"The loss became NaN/Inf within {self.steps} steps on "
                            f"{self.num_batches} batches (initial {self.initial_loss:.4g}).",
                            advice="Lower the learning rate; look for log(0) or division by "
                            "zero in the loss.", value=self.best_loss)]
        text = (f"{acc}best loss {self.best_loss:.4g} (initial {self.initial_loss:.4g}, target "
                f"<= {target:.4g}) on {self.num_batches} batches after {self.steps} steps; "
                f"regularization off: {off}.")
        if self.reached:
            return [Finding(CHECK, "overfit.reached", Severity.INFO, f"Overfit reached: {text}",
                            value=self.best_loss, expected=target)]
        return [Finding(CHECK, "overfit.not_reached", Severity.FAIL,
                        f"Could not overfit: {text}", advice=ADVICE, value=self.best_loss,
                        expected=target)]


def validate_arguments(*, max_steps: Any, loss_fraction: Any, reg_attr: Any,
                       batch_to_input: Any, batch_to_target: Any) -> None:
    """Check the arguments of :func:`overfit_batches` (see :mod:`lightning_diag.validation`).

    Example:
        >>> validate_arguments(max_steps=100, loss_fraction=1.0, reg_attr=None,
        ...                    batch_to_input=print, batch_to_target=print)
        Traceback (most recent call last):
        ...
        ValueError: `loss_fraction` must be a number in (0, 1), got 1.0.
    """
    check_int("max_steps", max_steps)
    check_number("loss_fraction", loss_fraction, low=0, high=1, low_open=True, high_open=True)
    check_str("reg_attr", reg_attr, optional=True)
    check_callable("batch_to_input", batch_to_input)
    check_callable("batch_to_target", batch_to_target)


def overfit_small_batch(
    module: pl.LightningModule, dataloader: DataLoader, *, num_batches: int = 5, **kwargs: Any
) -> OverfitResult:
    """Overfit a copy of ``module`` on the first ``num_batches`` batches of ``dataloader``.

    The batches are read in dataset order without touching the dataloader's sampler; the other
    keyword arguments are those of :func:`overfit_batches`.

    Raises:
        ValueError: an empty dataloader, manual optimization or no optimizer.
        UserCodeError: the dataset, ``configure_optimizers`` or ``forward`` raised.
    """
    check_int("num_batches", num_batches)
    with preserved_rng():
        batches = first_batches(dataloader, num_batches, module.device)
    return overfit_batches(module, batches, **kwargs)


def overfit_batches(
    module: pl.LightningModule,
    batches: list[Any],
    *,
    max_steps: int = 1000,
    loss_fraction: float = 0.05,
    reg_attr: str | None = None,
    batch_to_input: BatchFn = default_batch_to_input,
    batch_to_target: BatchFn = default_batch_to_target,
    progress_bar: bool = False,
    on_pass: PassHook | None = None,
) -> OverfitResult:
    """Train a copy of ``module`` on the fixed ``batches`` until it has overfit them.

    Regularization is off (dropout in eval mode, optimizer weight decay 0, ``reg_attr`` 0;
    BatchNorm stays in train mode) and the optimizer is a fresh one from the copy's
    ``configure_optimizers``. Training cycles over the batches for up to ``max_steps`` steps and
    stops at the first pass that meets the rule of :class:`OverfitResult`. The loss and accuracy
    of a pass are those of each batch just before its update. ``module`` and every RNG stream
    are left untouched.

    Args:
        module: The LightningModule, as initialized.
        batches: The fixed batches (recipe: 5-10).
        max_steps: Optimizer steps before giving up.
        loss_fraction: Success needs the pass loss at most this fraction of the initial loss.
        reg_attr: Attribute or hparam scaling a regularization term in the loss; set to 0.
        batch_to_input: Extracts the model input (used only when ``training_step`` does not
            call ``self(...)``, to read the logits).
        batch_to_target: Extracts the target, for the accuracy.
        progress_bar: Show a tqdm bar.
        on_pass: Called after each pass with ``(step, loss, accuracy or None)``.

    Raises:
        ValueError: manual optimization, no batches, or no optimizer.
        UserCodeError: ``configure_optimizers``, ``forward`` or ``batch_to_input`` raised
            (``training_step``'s own exceptions pass through unchanged).
    """
    validate_arguments(max_steps=max_steps, loss_fraction=loss_fraction, reg_attr=reg_attr,
                       batch_to_input=batch_to_input, batch_to_target=batch_to_target)
    if not batches:
        raise ValueError("`batches` is empty: give at least one training batch.")
    if not module.automatic_optimization:
        raise ValueError(f"{type(module).__name__} uses manual optimization: its training_step "
                         "steps the optimizers itself, so it cannot be overfit by lightning_diag.")
    with side_experiment(module) as clone:
        clone.train()
        optimizer = fresh_optimizer(clone)
        turned_off = disable_regularization(clone, optimizer, reg_attr)
        outputs: list[Any] = []
        handle = clone.register_forward_hook(lambda m, i, o: outputs.append(o))
        try:
            result = OverfitResult(False, 0, math.nan, math.inf, None, loss_fraction,
                                   len(batches), turned_off)
            with torch.no_grad():
                result.initial_loss = _pass(clone, batches, outputs, None, batch_to_input,
                                            batch_to_target)[0]
            _train(clone, batches, optimizer, outputs, result, max_steps, batch_to_input,
                   batch_to_target, progress_bar, on_pass)
        finally:
            handle.remove()
    return result


def _train(clone: pl.LightningModule, batches: list[Any], optimizer: torch.optim.Optimizer,
           outputs: list[Any], result: OverfitResult, max_steps: int, to_input: BatchFn,
           to_target: BatchFn, progress_bar: bool, on_pass: PassHook | None) -> None:
    from tqdm.auto import tqdm

    if not math.isfinite(result.initial_loss):
        result.best_loss = result.initial_loss
        return
    target = result.loss_fraction * result.initial_loss
    with tqdm(total=max_steps, desc=CHECK, disable=not progress_bar, leave=False) as bar:
        while result.steps < max_steps:
            budget = min(len(batches), max_steps - result.steps)
            loss, acc = _pass(clone, batches[:budget], outputs, optimizer, to_input, to_target)
            result.steps += budget
            bar.update(budget)
            bar.set_postfix(loss=f"{loss:.4g}", acc="-" if acc is None else f"{acc:.1%}")
            result.curve.append((result.steps, loss, acc))
            if on_pass is not None:
                on_pass(result.steps, loss, acc)
            if not math.isfinite(loss):
                result.best_loss = loss
                return
            result.best_loss = min(result.best_loss, loss)
            if acc is not None:
                result.best_accuracy = max(result.best_accuracy or 0.0, acc)
            if loss <= target and (acc is None or acc >= 1.0):
                result.reached = True
                return


def _pass(clone: pl.LightningModule, batches: list[Any], outputs: list[Any],
          optimizer: torch.optim.Optimizer | None, to_input: BatchFn,
          to_target: BatchFn) -> tuple[float, float | None]:
    """One pass: mean loss and accuracy (None unless classification) over ``batches``."""
    losses, correct, total, classified = [], 0, 0, True
    for i, batch in enumerate(batches):
        outputs.clear()
        loss = step_loss(clone, batch, i)
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
        target = to_target(batch)
        # the forward hook saw nothing when training_step does not call forward()
        logits = outputs[-1] if outputs else forward_output(clone, batch, to_input)
        classified = classified and is_classification(logits, target)
        if classified:
            correct += int((logits.detach().argmax(1) == target).sum())
            total += int(target.shape[0])
    return sum(losses) / len(losses), (correct / total if classified and total else None)

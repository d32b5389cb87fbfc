"""The training invariant about a target leak: the input holds the target where the model
predicts it from, and the loss collapsed in the first epochs (``invariants.target_leak``).
The callback (:class:`~lightning_diag.callbacks.invariants.TrainingInvariants`) reads the first
batches and the losses.

Example:
    >>> import torch
    >>> seq = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
    >>> strongest_leak(leak_counts((seq[:, 1:], seq[:, 1:]))).lag  # fed x[t + 1]
    0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_diag.batch import TARGET_KEYS
from lightning_diag.checks.invariants import CHECK, invariant_code
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.invariants import collision_rate, target_matches

__all__ = ["LEAK_CHANCE", "LEAK_SHARE", "LeakEvidence", "check_target_leak", "leak_counts",
           "strongest_leak"]

@dataclass
class LeakEvidence:
    """Where a batch's input holds the target itself.

    Attributes:
        input: Which input (``"batch[0]"``, ``"input_ids"``).
        lag: 0: at the target's own position; 1: one position earlier.
        matches: Target positions equal to the input there.
        compared: Target positions compared.
        chance: The share an unrelated input drawn alike would match
            (:func:`~lightning_diag.functional.invariants.collision_rate`).
    """

    input: str
    lag: int
    matches: int
    compared: int
    chance: float
    batches: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.matches / self.compared if self.compared else 0.0


def check_target_leak(evidence: LeakEvidence | None, initial: float, reached: float,
                      source: str, epoch: int, fraction: float) -> Finding | None:
    """``invariants.target_leak`` (WARN): the input holds the target at the position the model
    predicts it from, and the loss collapsed in the first epochs.

    Both are required. The first alone also describes a model that reconstructs its input
    (an autoencoder, a copy task); the second alone describes an easy task (digits reach 0.97
    accuracy in one epoch) or a memorizable dataset. Together: the output predicts the target
    far better than a model that has to learn it could so early.

    Args:
        evidence: Every target position equal to the input at lag 0 or 1, where chance would
            match few; None when the inputs do not hold the target.
        initial: The loss of the first steps.
        reached: The loss at the end of epoch ``epoch`` (``source`` says which).
        fraction: ``reached / initial`` at or below which the loss collapsed.

    Example:
        >>> e = LeakEvidence("batch[0]", 0, 640, 640, 0.06)
        >>> check_target_leak(e, 2.77, 0.004, "val_loss", 0, 0.05).code
        'invariants.target_leak'
        >>> check_target_leak(e, 2.77, 1.9, "val_loss", 0, 0.05) is None  # not exploited
        True
    """
    if evidence is None or not (initial > 0 and math.isfinite(reached)):
        return None
    ratio = reached / initial
    if ratio > fraction:
        return None
    where = ("at the position of the target itself" if evidence.lag == 0
             else "one position before the target, which a causal model sees")
    return Finding(
        CHECK, invariant_code("target_leak"), Severity.WARN,
        f"The input holds the target: {evidence.matches} of {evidence.compared} target values "
        f"equal `{evidence.input}` {where} (chance: {evidence.chance:.0%}), and the loss fell "
        f"to {ratio:.2%} of its initial value ({reached:.3g} by `{source}` at epoch {epoch}, "
        f"from {initial:.3g}; a model that learns the task is not expected below "
        f"{fraction:.0%} this early): the output predicts the target far better than the "
        "data allows.",
        advice="Feed the model what precedes the target: for next-token prediction the input "
               "is `x[:, :-1]` and the target `x[:, 1:]`; check the shift in the dataset or "
               "the collate function. If reconstructing the input is the task (an autoencoder), "
               "ignore this finding.",
        value=ratio, expected=(fraction, 1.0), epoch=epoch,
        details={"input": evidence.input, "lag": evidence.lag, "share": evidence.share,
                 "chance": evidence.chance, "initial_loss": initial, "loss": reached,
                 "source": source, "batches": evidence.batches})


#: The input holds the target when at least this share of target values equals it...
LEAK_SHARE = 0.99
#: ...where an unrelated input drawn alike would match at most this share.
LEAK_CHANCE = 0.5


def _integer(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and not value.is_floating_point()
            and not value.is_complex() and value.dtype != torch.bool)


def _candidates(batch: Any) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]],
                                     tuple[int, ...]]:
    """The target of ``batch``, its other integer tensors, and the lags at which one of them
    holding the target is a leak."""
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            return None, [], ()
        others = [(str(k), v) for k, v in batch.items() if k != key and _integer(v)]
        # Hugging Face's causal-LM convention: `labels` is a copy of `input_ids` and the model
        # shifts inside, so lag 0 is the honest pairing; one position earlier still leaks.
        hf = key == "labels" and "input_ids" in batch
        return batch[key], others, (1,) if hf else (0, 1)
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        others = [(f"batch[{i}]", v) for i, v in enumerate(batch) if i != 1 and _integer(v)]
        return batch[1], others, (0, 1)
    return None, [], ()


def leak_counts(batch: Any) -> list[LeakEvidence]:
    """For each integer input of ``batch`` shaped like its integer target, and each lag at
    which the input holding the target leaks it: how many target values it holds.

    Lag 1 only for sequences (two dimensions or more); an index or a label id among the inputs
    of a 1-D target is compared at lag 0.

    Example:
        >>> seq = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
        >>> [(e.input, e.lag, e.matches, e.compared) for e in leak_counts((seq[:, 1:], seq[:, 1:]))]
        [('batch[0]', 0, 10, 10), ('batch[0]', 1, 0, 8)]
    """
    target, others, lags = _candidates(batch)
    if not isinstance(target, torch.Tensor) or not _integer(target):
        return []
    usable = lags if target.dim() >= 2 else tuple(lag for lag in lags if lag == 0)
    out = []
    for name, tensor in others:
        if tensor is target or tensor.shape != target.shape:
            continue
        chance = collision_rate(target)
        for lag in usable:
            matches, compared = target_matches(tensor, target, lag)
            if compared:
                out.append(LeakEvidence(name, lag, matches, compared, chance))
    return out


def strongest_leak(evidence: Iterable[LeakEvidence]) -> LeakEvidence | None:
    """The input and lag holding the target in at least :data:`LEAK_SHARE` of its values where
    chance matches at most :data:`LEAK_CHANCE`, or None.

    Example:
        >>> found = [LeakEvidence("x", 0, 99, 100, 0.1), LeakEvidence("x", 1, 3, 100, 0.1)]
        >>> strongest_leak(found).lag
        0
        >>> strongest_leak([LeakEvidence("x", 0, 100, 100, 0.9)]) is None  # one class: chance
        True
    """
    strong = [e for e in evidence if e.share >= LEAK_SHARE and e.chance <= LEAK_CHANCE]
    return max(strong, key=lambda e: e.share, default=None)

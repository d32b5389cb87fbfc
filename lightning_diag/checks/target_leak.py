"""The training invariant about a target leak: the input holds the target where the model
predicts it from, and the loss collapsed in the first epochs (``invariants.target_leak``).
The callback (:class:`~lightning_diag.callbacks.invariants.TrainingInvariants`) hands the first
batches to a :class:`LeakWatch` and the losses to its :meth:`LeakWatch.judge`.

Where the target is sought: an integer input shaped like an integer target, at the target's
own position (lag 0: a sequence model fed ``x[t + 1]``) and one position earlier (lag 1); a
float input holding a scalar float target at some position, within float rounding (a window
that ends with its own target, a feature that is the target). Hugging Face's causal-LM batches
(``input_ids`` and ``labels``) pair ``labels == input_ids`` honestly when the model shifts
inside: their lag 0 is a leak only when the loss also fell far below what next-token
prediction on those batches allows (:func:`~lightning_diag.functional.invariants.
conditional_entropy`): the run, not the batch's names, tells the two apart.

Example:
    >>> import torch
    >>> seq = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
    >>> [e.lag for e in strong_leaks(leak_counts((seq[:, 1:], seq[:, 1:])))]  # fed x[t + 1]
    [0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_diag.batch import TARGET_KEYS
from lightning_diag.checks.invariants import CHECK, invariant_code
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.invariants import (
    collision_rate,
    conditional_entropy,
    float_position,
    prefix_keys,
    repeat_share,
    target_matches,
)

__all__ = ["FLOOR_SHARE", "LEAK_CHANCE", "LEAK_SHARE", "LeakEvidence", "LeakWatch",
           "check_target_leak", "leak_counts", "strong_leaks"]

#: The input holds the target when at least this share of target values equals it...
LEAK_SHARE = 0.99
#: ...where an unrelated input drawn alike would match at most this share.
LEAK_CHANCE = 0.5
#: A batch that follows Hugging Face's causal-LM convention leaks at lag 0 when its loss is
#: below this share of the least loss next-token prediction on its first batches allows.
FLOOR_SHARE = 0.5


@dataclass
class LeakEvidence:
    """Where a batch's input holds the target itself.

    Attributes:
        input: Which input (``"batch[0]"``, ``"input_ids"``).
        lag: 0: at the target's own position; 1: one position earlier.
        matches: Target positions equal to the input there.
        compared: Target positions compared.
        chance: The share an unrelated input drawn alike would match
            (:func:`~lightning_diag.functional.invariants.collision_rate`; for a float input,
            at least the share its own repetition explains:
            :func:`~lightning_diag.functional.invariants.repeat_share`).
        batches: Batches read.
        position: For a float input, the position (per sample) that holds the target.
        shifted_inside: A Hugging Face causal-LM batch at lag 0, the honest pairing when the
            model shifts inside; ``prefixes`` then holds, per batch, the key of every label's
            prefix of ``input_ids`` and the label (for :meth:`next_token_floor`).
    """

    input: str
    lag: int
    matches: int
    compared: int
    chance: float
    batches: int = 1
    position: tuple[int, ...] | None = None
    shifted_inside: bool = False
    prefixes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def share(self) -> float:
        return self.matches / self.compared if self.compared else 0.0

    @property
    def any_epoch(self) -> bool:
        """Judged at every epoch, not only the first ones: a Hugging Face batch (by its own
        bound, however long the model trains) and a float input holding a scalar float target
        within float rounding (no honest window or feature holds it exactly: once the loss
        collapses, the model found it, however late)."""
        return self.shifted_inside or self.position is not None

    @property
    def key(self) -> tuple[str, int, tuple[int, ...] | None]:
        return self.input, self.lag, self.position

    def merged(self, other: LeakEvidence) -> LeakEvidence:
        """This evidence and ``other`` (same input, lag and position) of a later batch."""
        return replace(self, matches=self.matches + other.matches,
                       compared=self.compared + other.compared,
                       chance=max(self.chance, other.chance), batches=self.batches + 1,
                       prefixes=self.prefixes + other.prefixes)

    def next_token_floor(self) -> float | None:
        """The least mean cross-entropy (nats) with which any model that sees only the tokens
        before a label can predict the labels of the batches read (the empirical entropy of
        each label given its whole prefix; below the data's true entropy, as a sample's
        estimate is); None without prefixes."""
        if not self.prefixes:
            return None
        keys = torch.cat([k for k, _ in self.prefixes])
        values = torch.cat([v for _, v in self.prefixes])
        return conditional_entropy(keys, values)


def check_target_leak(evidence: LeakEvidence | None, initial: float, reached: float,
                      source: str, epoch: int, fraction: float) -> Finding | None:
    """``invariants.target_leak`` (WARN): the input holds the target at the position the model
    predicts it from, and the loss collapsed in the first epochs.

    Both are required. The first alone also describes a model that reconstructs its input
    (an autoencoder, a copy task); the second alone describes an easy task (digits reach 0.97
    accuracy in one epoch) or a memorizable dataset. Together: the output predicts the target
    far better than a model that has to learn it could so early. A Hugging Face causal-LM
    batch at lag 0 (``evidence.shifted_inside``) is judged by a bound of its own data instead
    of ``fraction``: the loss below :data:`FLOOR_SHARE` of
    :meth:`LeakEvidence.next_token_floor`, at any epoch (a model that shifts inside cannot go
    below it however long it trains, one scored on the token it reads can). The callback
    judges only the first epochs, but for :attr:`LeakEvidence.any_epoch` evidence.

    Args:
        evidence: Every target position equal to the input at lag 0 or 1 (or a float input
            at one position), where chance would match few; None when the inputs do not hold
            the target.
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
    floor = evidence.next_token_floor() if evidence.shifted_inside else None
    if evidence.shifted_inside:
        if floor is None or reached >= FLOOR_SHARE * floor:
            return None
    elif ratio > fraction:
        return None
    details = {"input": evidence.input, "lag": evidence.lag, "share": evidence.share,
               "chance": evidence.chance, "initial_loss": initial, "loss": reached,
               "source": source, "batches": evidence.batches}
    if evidence.position is not None:
        details["position"] = list(evidence.position)
    if floor is not None:
        details["next_token_floor"] = floor
    return Finding(
        CHECK, invariant_code("target_leak"), Severity.WARN,
        f"The input holds the target: {_where(evidence)}, and the loss fell to {ratio:.2%} of "
        f"its initial value ({reached:.3g} by `{source}` at epoch {epoch}, from {initial:.3g}; "
        + (f"a model that shifts inside is not expected below half of {floor:.3g}, the least "
           f"cross-entropy with which any model predicts each label of the first "
           f"{evidence.batches} batch(es) from the tokens before it (their entropy given "
           "those tokens)" if floor is not None else
           f"a model that learns the task is not expected below {fraction:.0%}"
           + ("" if evidence.any_epoch else " this early"))
        + "): the output predicts the target far better than the data allows.",
        advice=_advice(evidence), value=ratio,
        expected=(FLOOR_SHARE * floor / initial if floor is not None else fraction, 1.0),
        epoch=epoch, details=details)


def _where(e: LeakEvidence) -> str:
    counts = f"{e.matches} of {e.compared}"
    if e.position is not None:
        at = ", ".join(map(str, e.position))
        return (f"{counts} targets equal `{e.input}` at position [{at}] of each sample, within "
                f"float rounding (chance: {e.chance:.0%})")
    if e.shifted_inside:
        return (f"{counts} labels equal `{e.input}` at their own position (Hugging Face's "
                f"convention, honest only when the model shifts the labels inside; chance: "
                f"{e.chance:.0%})")
    where = ("at the position of the target itself" if e.lag == 0
             else "one position before the target, which a causal model sees")
    return f"{counts} target values equal `{e.input}` {where} (chance: {e.chance:.0%})"


def _advice(e: LeakEvidence) -> str:
    if e.position is not None:
        return ("Give the model only what precedes the target: a window that ends at step t "
                "predicts step t + 1 (`x = series[i : i + w]`, `y = series[i + w]`); check "
                "the indices in the dataset. A feature that is the target itself (a column "
                "left in the inputs) must go. If reconstructing the input is the task, ignore "
                "this finding.")
    if e.shifted_inside:
        return ("Score each position on the next token: `logits[:, :-1]` against "
                "`labels[:, 1:]` (a Hugging Face `...ForCausalLM` does it inside when given "
                "`labels`; a model or a loss of your own must do it).")
    return ("Feed the model what precedes the target: for next-token prediction the input "
            "is `x[:, :-1]` and the target `x[:, 1:]`; check the shift in the dataset or "
            "the collate function. If reconstructing the input is the task (an autoencoder), "
            "ignore this finding.")


def _integer(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and not value.is_floating_point()
            and not value.is_complex() and value.dtype != torch.bool)


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _candidates(batch: Any) -> tuple[Any, list[tuple[str, torch.Tensor]], bool]:
    """The target of ``batch``, its other tensors, and whether the batch follows Hugging
    Face's causal-LM convention (``labels`` a copy of ``input_ids``, the model may shift)."""
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            return None, [], False
        others = [(str(k), v) for k, v in batch.items()
                  if k != key and isinstance(v, torch.Tensor)]
        return batch[key], others, key == "labels" and "input_ids" in batch
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        others = [(f"batch[{i}]", v) for i, v in enumerate(batch)
                  if i != 1 and isinstance(v, torch.Tensor)]
        return batch[1], others, False
    return None, [], False


def leak_counts(batch: Any) -> list[LeakEvidence]:
    """Where the inputs of ``batch`` may hold its target, with how many target values they
    hold: each integer input shaped like an integer target at lags 0 and 1 (lag 1 only for
    sequences; an index or a label id among the inputs of a 1-D target at lag 0); each float
    input at the position holding a scalar float target most often.

    Example:
        >>> seq = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
        >>> [(e.input, e.lag, e.matches, e.compared) for e in leak_counts((seq[:, 1:], seq[:, 1:]))]
        [('batch[0]', 0, 10, 10), ('batch[0]', 1, 0, 8)]
    """
    target, others, hf = _candidates(batch)
    if not isinstance(target, torch.Tensor) or target.dim() == 0:
        return []
    if _floating(target):
        return [e for name, x in others if _floating(x) and x is not target
                and (e := _float_evidence(name, x, target)) is not None]
    if not _integer(target):
        return []
    lags = (0, 1) if target.dim() >= 2 else (0,)
    out = []
    for name, tensor in others:
        if not _integer(tensor) or tensor is target or tensor.shape != target.shape:
            continue
        chance = collision_rate(target)
        for lag in lags:
            matches, compared = target_matches(tensor, target, lag)
            if not compared:
                continue
            e = LeakEvidence(name, lag, matches, compared, chance)
            if hf and lag == 0 and name == "input_ids":
                e.shifted_inside = True
                if e.share >= LEAK_SHARE:  # the prefixes matter only then
                    e.prefixes = [_prefixes(tensor, target)]
            out.append(e)
    return out


def _prefixes(ids: torch.Tensor, labels: torch.Tensor,
              ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The key of ``ids[:, :t]`` and ``labels[:, t]`` for every label from position 1 on
    (what a model that shifts inside predicts, from what it sees)."""
    keys = prefix_keys(ids)[:, :-1]
    wanted = labels[:, 1:]
    keep = wanted != ignore_index
    return keys[keep].cpu(), wanted[keep].cpu()


def _float_evidence(name: str, x: torch.Tensor, target: torch.Tensor) -> LeakEvidence | None:
    """A float input holding a scalar float target at one position (per sample)."""
    if x.dim() == 0 or x.shape[0] != target.shape[0] or target[0].numel() != 1:
        return None
    found = float_position(x.detach(), target.detach())
    if found is None:
        return None
    flat, matches, compared = found
    shape = tuple(x.shape[1:])
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)) \
        if shape else ()
    chance = max(collision_rate(target.detach().flatten()), repeat_share(x.detach(), flat))
    return LeakEvidence(name, 0, matches, compared, chance, position=position)


def strong_leaks(evidence: Iterable[LeakEvidence]) -> list[LeakEvidence]:
    """The inputs, lags and positions holding the target in at least :data:`LEAK_SHARE` of
    its values where chance matches at most :data:`LEAK_CHANCE`, the strongest first.

    Example:
        >>> found = [LeakEvidence("x", 0, 99, 100, 0.1), LeakEvidence("x", 1, 3, 100, 0.1)]
        >>> [e.lag for e in strong_leaks(found)]
        [0]
        >>> strong_leaks([LeakEvidence("x", 0, 100, 100, 0.9)])  # one class: chance
        []
    """
    strong = [e for e in evidence if e.share >= LEAK_SHARE and e.chance <= LEAK_CHANCE]
    return sorted(strong, key=lambda e: -e.share)


class LeakWatch:
    """The evidence of the first batches of a fit, merged per input, lag and position, and
    judged against the losses.

    Example:
        >>> seq = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
        >>> watch = LeakWatch()
        >>> watch.add((seq[:, 1:], seq[:, 1:]))
        >>> watch.judge(2.5, 0.01, "val_loss", 0, 0.05).code
        'invariants.target_leak'
    """

    def __init__(self) -> None:
        self.evidence: dict[tuple[str, int, tuple[int, ...] | None], LeakEvidence] = {}
        self.batches = 0

    def add(self, batch: Any) -> None:
        self.batches += 1
        for e in leak_counts(batch):
            old = self.evidence.get(e.key)
            self.evidence[e.key] = e if old is None else old.merged(e)

    def strong(self, early: bool = True) -> list[LeakEvidence]:
        """The strong evidence (:func:`strong_leaks`); after the first epochs (``early``
        False) only that judged at any epoch (:attr:`LeakEvidence.any_epoch`)."""
        return [e for e in strong_leaks(self.evidence.values()) if early or e.any_epoch]

    def judge(self, initial: float, reached: float, source: str, epoch: int,
              fraction: float, early: bool = True) -> Finding | None:
        """The finding of the strongest evidence the losses confirm, or None."""
        for e in self.strong(early):
            found = check_target_leak(e, initial, reached, source, epoch, fraction)
            if found is not None:
                return found
        return None

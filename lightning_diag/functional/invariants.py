"""The tensor maths of the training invariants: did a weight move, could its step have moved
it, is a gradient the previous step's gradient carried over, does the input hold the target.

Example:
    >>> import torch
    >>> before = [torch.ones(3), torch.ones(2)]
    >>> after = [torch.tensor([1.0, 1.5, 1.0]), torch.ones(2)]
    >>> moved(before, after).tolist()
    [True, False]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["carried_over", "collision_rate", "movable", "moved", "target_matches"]


def moved(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per tensor, whether any element changed (a bool tensor, one entry per pair).

    The largest absolute difference, not a norm: squaring differences of 1e-25 underflows
    to a norm of 0 in float32, and a weight that moved that little still moved. Tensors must
    not be empty.

    Example:
        >>> moved([torch.tensor([1.0])], [torch.tensor([1.0 + 1e-7])]).tolist()
        [True]
    """
    if not before:
        return torch.zeros(0, dtype=torch.bool)
    diffs = torch._foreach_sub(list(after), list(before))
    torch._foreach_abs_(diffs)
    return _largest(diffs) > 0


def _largest(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The largest element of each tensor, as one float tensor (foreach: one kernel launch
    where the device allows; the infinity norm is several times slower on CPU)."""
    return torch.stack([m.float() for m in torch._foreach_max(list(tensors))])


def movable(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            lrs: Sequence[float], margin: float = 4.0) -> torch.Tensor:
    """Per tensor, whether a step of plain SGD (``lr * |g|``) would change at least one element.

    An element moves when its step exceeds ``margin`` times the float resolution at its value
    (``eps * |w|``, the smallest change a float of that size can hold). Adaptive optimizers
    (Adam's step is about ``lr``) and momentum take larger steps than plain SGD when gradients
    are small, so a False here means no common optimizer is expected to move the tensor: a
    zero learning rate, or a step too small for float precision, not a skipped update.

    Example:
        >>> w, g = [torch.ones(2), torch.ones(2)], [torch.ones(2), torch.ones(2)]
        >>> movable(w, g, [1e-3, 0.0]).tolist()  # lr 0 cannot move anything
        [True, False]
        >>> movable([torch.ones(1)], [torch.ones(1)], [1e-9]).tolist()  # below float32's 1.2e-7
        [False]
    """
    if not params:
        return torch.zeros(0, dtype=torch.bool)
    steps = torch._foreach_abs(list(grads))
    torch._foreach_mul_(steps, _one_or_each([float(lr) for lr in lrs]))
    floors = torch._foreach_abs(list(params))
    torch._foreach_mul_(floors, _one_or_each([margin * torch.finfo(p.dtype).eps for p in params]))
    torch._foreach_sub_(steps, floors)
    return _largest(steps) > 0


def _one_or_each(values: list[float]) -> float | list[float]:
    """One scalar when every value is the same (the faster foreach kernel), else the list."""
    return values[0] if all(v == values[0] for v in values) else values


def carried_over(found: torch.Tensor, previous: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether ``found`` (a gradient found before a backward pass added to it) is ``previous``
    (the gradient of the last optimizer step), unchanged or scaled down by clipping.

    ``found = c * previous`` with ``0 < c <= 1``, within ``rtol`` of ``found``'s norm: the
    last step's gradient was never cleared. Gradient-norm clipping scales it after the hook
    that saw it, hence a factor of at most 1.

    Example:
        >>> g = torch.tensor([0.3, -1.0, 2.0])
        >>> carried_over(g, g), carried_over(0.5 * g, g), carried_over(g + 0.1, g)
        (True, True, False)
        >>> carried_over(torch.zeros(3), g)  # cleared
        False
    """
    a, b = found.detach().double().flatten(), previous.detach().double().flatten()
    if a.shape != b.shape:
        return False
    bb = float(b @ b)
    if bb == 0.0:
        return False
    c = float(a @ b) / bb
    if not 0.0 < c <= 1.0 + rtol:
        return False
    return float((a - c * b).norm()) <= rtol * float(a.norm())


def target_matches(inputs: torch.Tensor, target: torch.Tensor, lag: int,
                   ignore_index: int = -100) -> tuple[int, int]:
    """How many target positions hold the same value as the input ``lag`` positions earlier
    (along the last dimension), out of how many compared; ``ignore_index`` targets are skipped.

    ``lag=0``: the input at the target's own position (a sequence model fed ``x[t+1]`` to
    predict ``x[t+1]``); ``lag=1``: one position earlier, where a causal model also sees it.

    Example:
        >>> seq = torch.tensor([[3, 1, 4, 1, 5, 9]])
        >>> target_matches(seq[:, 1:], seq[:, 1:], lag=0)  # the shifted-input leak
        (5, 5)
        >>> target_matches(seq[:, :-1], seq[:, 1:], lag=0)  # the honest next-token pairing
        (0, 5)
    """
    if inputs.shape != target.shape or inputs.shape[-1] <= lag:
        return 0, 0
    length = inputs.shape[-1]
    seen = inputs[..., : length - lag]
    wanted = target[..., lag:]
    keep = wanted != ignore_index
    return int((seen == wanted)[keep].sum()), int(keep.sum())


def collision_rate(target: torch.Tensor, ignore_index: int = -100) -> float:
    """The chance that two target values drawn at random are equal, ``sum_k p_k ** 2``: the
    share of positions an input unrelated to the target (but drawn alike) would match.

    Example:
        >>> collision_rate(torch.tensor([0, 1, 2, 3]))
        0.25
        >>> collision_rate(torch.tensor([5, 5, 5, -100]))
        1.0
    """
    values = target[target != ignore_index].flatten()
    if values.numel() == 0:
        return 1.0
    _, counts = torch.unique(values, return_counts=True)
    p = counts.double() / values.numel()
    return float((p * p).sum())

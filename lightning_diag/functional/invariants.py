"""The tensor maths of the training invariants: did a weight move, could its step have moved
it, is a gradient the previous step's gradient carried over, does the input hold the target
(integer sequences at a lag, a float input at some position), how well can the next token of
a sequence be predicted from the tokens before it at all.

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

__all__ = ["carried_over", "collision_rate", "conditional_entropy", "float_position",
           "movable", "moved", "prefix_keys", "repeat_share", "rounding", "target_matches"]


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


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> torch.Tensor:
    """Elementwise ``|a - b| <= rtol * max(|a|, |b|)`` in float64 (equal zeros included)."""
    a, b = a.double(), b.double()
    return (a - b).abs() <= rtol * torch.maximum(a.abs(), b.abs())


def rounding(*tensors: torch.Tensor) -> float:
    """The relative tolerance of "equal within float rounding" for these tensors: twice the
    resolution of the coarsest float dtype among them (a float64 target copied into a float32
    input differs by at most half float32's resolution)."""
    return 2.0 * max(torch.finfo(t.dtype).eps for t in tensors if t.is_floating_point())


def float_position(inputs: torch.Tensor, target: torch.Tensor,
                   probe_rows: int = 8) -> tuple[int, int, int] | None:
    """The position of a float input (per sample, flattened) that holds a scalar target most
    often, within float rounding: ``(position, matches, compared)``, or None when no position
    holds it in all but one of the first ``probe_rows`` samples (the candidates: the full
    comparison runs on them only, so an image costs little).

    Example:
        >>> x = torch.tensor([[0.1, 0.7, 0.3], [0.9, 0.2, 0.5], [0.4, 0.6, 0.8]])
        >>> float_position(x, x[:, 2].double())  # the last column is the target
        (2, 3, 3)
        >>> float_position(x, torch.tensor([0.5, 0.5, 0.5])) is None
        True
    """
    n = inputs.shape[0]
    if n == 0 or target.shape[0] != n or target[0].numel() != 1:
        return None
    x = inputs.reshape(n, -1)
    y = target.reshape(n, 1)
    rtol = rounding(inputs, target)
    rows = min(n, probe_rows)
    candidates = (_close(x[:rows], y[:rows], rtol).sum(0) >= rows - 1).nonzero().flatten()
    if candidates.numel() == 0:
        return None
    counts = _close(x[:, candidates], y, rtol).sum(0)
    best = int(counts.flip(0).argmax())  # ties: the last position (the most recent)
    index = len(counts) - 1 - best
    return int(candidates[index]), int(counts[index]), n


def repeat_share(inputs: torch.Tensor, position: int) -> float:
    """How often a float input repeats itself at the distance from ``position`` to the value
    after its last one, within float rounding: the share of a target found at ``position``
    that the input's own repetition explains (a window of a periodic series holds the value
    one period back; a piecewise-constant one holds the last value).

    ``inputs`` is read as windows ``(N, W, C)`` (3 dimensions) or ``(N, W)`` (other shapes,
    flattened): ``position`` is step ``w`` of channel ``c``, the distance ``p = W - w``, and
    the share is that of ``x[:, t, c] == x[:, t + p, c]``; 0.0 when the window is not longer
    than ``p``.

    Example:
        >>> t = torch.arange(24.0)
        >>> periodic = torch.stack([(t[i:i + 6] % 3) for i in range(10)])  # period 3
        >>> repeat_share(periodic, 3)  # y = x[t + 6] = x[t + 3]: the period explains it
        1.0
        >>> repeat_share(torch.rand(10, 6, generator=torch.Generator().manual_seed(0)), 5)
        0.0
    """
    n = inputs.shape[0]
    x = inputs.reshape(n, inputs.shape[1], inputs.shape[2]) if inputs.dim() == 3 else \
        inputs.reshape(n, -1, 1)
    steps, channels = x.shape[1], x.shape[2]
    step, channel = divmod(position, channels)
    p = steps - step
    if p >= steps:
        return 0.0
    series = x[:, :, channel]
    same = _close(series[:, : steps - p], series[:, p:], rounding(inputs))
    return float(same.double().mean())


_HASH = ((1_000_003, 2_147_483_647), (1_000_033, 1_000_000_007))  # (multiplier, prime)


def prefix_keys(ids: torch.Tensor) -> torch.Tensor:
    """One int64 key per prefix of each row: ``keys[:, t]`` identifies ``ids[:, : t + 1]``
    (two rolling hashes modulo primes below 2**31, combined; a collision would merge two
    prefixes, with odds near 1e-18 per pair).

    Example:
        >>> ids = torch.tensor([[1, 2, 3], [1, 2, 4], [5, 2, 3]])
        >>> keys = prefix_keys(ids)
        >>> bool(keys[0, 1] == keys[1, 1]), bool(keys[0, 2] == keys[1, 2])
        (True, False)
    """
    ids = ids.long()
    h = [torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device) for _ in _HASH]
    out = torch.empty_like(ids)
    for t in range(ids.shape[1]):
        for i, (mult, prime) in enumerate(_HASH):
            h[i] = torch.remainder(h[i] * mult + ids[:, t] + 1, prime)
        out[:, t] = h[0] * _HASH[1][1] + h[1]
    return out


def conditional_entropy(keys: torch.Tensor, values: torch.Tensor) -> float:
    """The empirical entropy of ``values`` given ``keys`` (nats per value), the mean of
    ``log(n_key / n_key,value)``: the least mean cross-entropy any predictor that sees only the
    key can reach on these very pairs (it could learn every pair by heart, and no more).

    Example:
        >>> keys = torch.tensor([0, 0, 1, 1])
        >>> round(conditional_entropy(keys, torch.tensor([5, 6, 7, 7])), 4)  # log(2) / 2
        0.3466
        >>> conditional_entropy(keys, torch.tensor([5, 5, 7, 7]))
        0.0
    """
    if keys.numel() == 0:
        return 0.0
    pairs, pair_counts = torch.unique(torch.stack([keys.flatten(), values.flatten()]), dim=1,
                                      return_counts=True)
    unique_keys, key_counts = torch.unique(keys.flatten(), return_counts=True)
    totals = key_counts[torch.searchsorted(unique_keys, pairs[0].contiguous())].double()
    n = pair_counts.double()
    return float((n * (totals / n).log()).sum() / keys.numel())

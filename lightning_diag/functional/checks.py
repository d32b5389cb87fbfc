"""The maths of the before-training checks (recipe steps 2 and 3), without a Trainer.

Example:
    >>> import torch
    >>> from lightning_diag.functional.checks import relative_error, expected_initial_loss
    >>> err, both_zero = relative_error(torch.tensor([1.0, 0.0]), torch.tensor([1.1, 0.0]))
    >>> [round(e, 4) for e in err.tolist()], both_zero.tolist()
    ([0.0909, 0.0], [False, True])
    >>> round(expected_initial_loss(10), 4)
    2.3026
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "KINK_MODULES",
    "centered_difference",
    "count_param_layers",
    "directional_difference",
    "evaluate_around",
    "expected_initial_loss",
    "gradient_tolerance",
    "has_kinks",
    "kink_gap",
    "relative_error",
]

#: Modules whose output is not differentiable everywhere (ReLU family, max, abs-like shrinkage).
KINK_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Threshold, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.L1Loss,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.LPPool1d,
    nn.LPPool2d,
)


def relative_error(
    analytic: torch.Tensor, numeric: torch.Tensor, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``|a - n| / max(|a|, |n|)`` and the mask of "both (near) zero" entries.

    Where ``max(|a|, |n|) <= eps`` the ratio is undefined (recipe step 2.2): those entries get
    error 0 and are flagged in the mask so that callers count them separately.

    Args:
        analytic: Analytic gradient values.
        numeric: Numeric (finite-difference) gradient values, same shape.
        eps: Magnitude at or below which a value counts as zero.

    Returns:
        ``(errors, both_zero)``: float tensor of relative errors, bool tensor.

    Example:
        >>> import torch
        >>> relative_error(torch.tensor([2.0]), torch.tensor([-2.0]))[0].item()
        2.0
    """
    if analytic.shape != numeric.shape:
        raise ValueError(f"shapes differ: analytic {tuple(analytic.shape)} vs numeric "
                         f"{tuple(numeric.shape)}.")
    if not eps >= 0:
        raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
    scale = torch.maximum(analytic.abs(), numeric.abs())
    both_zero = scale <= eps
    err = (analytic - numeric).abs() / torch.where(both_zero, torch.ones_like(scale), scale)
    return torch.where(both_zero, torch.zeros_like(err), err), both_zero


def centered_difference(f_plus: float, f_minus: float, h: float) -> float:
    """Recipe step 2.1: ``(f(x + h) - f(x - h)) / 2h``.

    Example:
        >>> centered_difference(4.0, 0.0, 1.0)
        2.0
    """
    if not h > 0:
        raise ValueError(f"`h` must be positive, got {h!r}.")
    return (f_plus - f_minus) / (2.0 * h)


def evaluate_around(
    f: Callable[[], float], param: torch.Tensor, direction: torch.Tensor, h: float
) -> tuple[float, float]:
    """``(f(param + h v), f(param - h v))``, moving ``param`` in place and restoring it bit-exactly.

    Pass a one-hot ``direction`` ``v`` for a single coordinate.

    Example:
        >>> import torch
        >>> w = torch.tensor([3.0], dtype=torch.float64)
        >>> evaluate_around(lambda: float(w[0] ** 2), w, torch.ones(1), 1.0), w.item()
        ((16.0, 4.0), 3.0)
    """
    if not h > 0:
        raise ValueError(f"`h` must be positive, got {h!r}.")
    with torch.no_grad():
        original = param.detach().clone()
        try:
            param.add_(direction, alpha=h)
            f_plus = f()
            param.copy_(original).sub_(direction, alpha=h)
            f_minus = f()
        finally:
            param.copy_(original)
    return f_plus, f_minus


def directional_difference(
    f: Callable[[], float], param: torch.Tensor, direction: torch.Tensor, h: float
) -> float:
    """Centered difference of ``f`` along ``direction`` at the current value of ``param``.

    Example:
        >>> import torch
        >>> w = torch.tensor([3.0], dtype=torch.float64)
        >>> round(directional_difference(lambda: float(w[0] ** 2), w, torch.ones(1), 1e-4), 6)
        6.0
    """
    return centered_difference(*evaluate_around(f, param, direction, h), h)


def kink_gap(f_plus: float, f_zero: float, f_minus: float, h: float) -> float:
    """Half the gap between the forward and backward slopes: ``|f+ - 2 f0 + f-| / 2h``.

    A kink (ReLU, max switching) crossed within ``h`` makes the centered difference wrong by
    exactly this amount; on a smooth function it is only ``|f''| h / 2`` while the centered
    difference is accurate to O(h^2). So an error of the size of the gap is explained by a kink.

    Example:
        >>> h = 0.1  # |x| at 0.02: the kink lies within h
        >>> f = abs
        >>> round(kink_gap(f(0.02 + h), f(0.02), f(0.02 - h), h), 6)
        0.8
        >>> round(abs(centered_difference(f(0.02 + h), f(0.02 - h), h) - 1.0), 6)  # true slope 1
        0.8
    """
    if not h > 0:
        raise ValueError(f"`h` must be positive, got {h!r}.")
    return abs(f_plus - 2.0 * f_zero + f_minus) / (2.0 * h)


def expected_initial_loss(num_classes: int) -> float:
    """Recipe step 3.1: a C-class softmax classifier with small weights starts at ``log C``.

    Example:
        >>> round(expected_initial_loss(2), 4)
        0.6931
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
    return math.log(num_classes)


def has_kinks(module: nn.Module) -> bool:
    """True when ``module`` contains a layer with kinks (ReLU family, max-pooling, shrinkage).

    Only ``nn.Module`` layers are seen; a ``F.relu`` call inside ``forward`` is not.

    Example:
        >>> from torch import nn
        >>> has_kinks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())), has_kinks(nn.Tanh())
        (True, False)
    """
    return any(isinstance(m, KINK_MODULES) for m in module.modules())


def count_param_layers(module: nn.Module) -> int:
    """Number of submodules that own parameters directly (a depth proxy for recipe step 2.5).

    Example:
        >>> from torch import nn
        >>> count_param_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
        2
    """
    return sum(1 for m in module.modules() if next(m.parameters(recurse=False), None) is not None)


def gradient_tolerance(kinks: bool, depth: int) -> float:
    """The largest acceptable relative gradient error, from recipe steps 2.4 and 2.5.

    ``1e-2`` for 10+ parametrized layers (errors accumulate with depth), else ``1e-4`` with kinks,
    else ``1e-6`` (without kinks 1e-4 is already too high; ~1e-7 is good).

    Example:
        >>> gradient_tolerance(False, 3), gradient_tolerance(True, 3), gradient_tolerance(True, 12)
        (1e-06, 0.0001, 0.01)
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"`depth` must be an int >= 0, got {depth!r}.")
    if depth >= 10:
        return 1e-2
    return 1e-4 if kinks else 1e-6


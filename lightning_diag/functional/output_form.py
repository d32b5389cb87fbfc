"""What an output looks like before its loss: its last activation, and the outputs of a
network that knows nothing and of one that memorized its targets.

A network with small weights puts about 0 before its last activation ``f``, so its output is
``f(0)`` (:meth:`OutputForm.know_nothing`); one that memorized its sample puts a large margin on
each target (:func:`memorising_output`). The initial-loss and overfit checks run the user's own
loss on these outputs (:mod:`lightning_diag.checks.reference_outputs`); the last activation is
read from the output's values and autograd history (:func:`output_form`).

Example:
    >>> import torch
    >>> z = torch.randn(4, 3, requires_grad=True)
    >>> form = output_form(z.log_softmax(1))
    >>> form.activation, [round(p, 4) for p in form.know_nothing(z).exp()[0].tolist()]
    ('log_softmax', [0.3333, 0.3333, 0.3333])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_diag.functional.task import IGNORE_INDEX, NORMALIZED_TOL, Task, is_normalized

__all__ = ["Activation", "OutputForm", "memorising_output", "output_form"]

Activation = Literal["softmax", "log_softmax", "sigmoid", "exp", "softplus", "none"]

#: Autograd nodes that only move, slice or cast values: the activation lies behind them.
_PASS_THROUGH = ("View", "Reshape", "UnsafeView", "Transpose", "TBackward", "Permute", "Squeeze",
                 "Unsqueeze", "Clone", "Expand", "Alias", "ToCopy", "Slice", "Select", "Split",
                 "Unbind", "Contiguous")
#: The last elementwise activations whose value at a zero input is known (``f(0)``).
_ELEMENTWISE: dict[str, Activation] = {"SigmoidBackward": "sigmoid", "ExpBackward": "exp",
                                       "SoftplusBackward": "softplus"}


@dataclass(frozen=True)
class OutputForm:
    """The last activation of an output, as far as its reference values depend on it.

    A network that knows nothing (small weights) puts about 0 before its last activation ``f``,
    so its output is ``f(0)``: uniform probabilities for a softmax, ``-log C`` for a
    log-softmax, 0.5 for a sigmoid, 1 for an exponential, ``log 2`` for a softplus, 0 for
    logits and plain values.

    Attributes:
        activation: ``"softmax"``, ``"log_softmax"``, ``"sigmoid"``, ``"exp"``, ``"softplus"``
            or ``"none"`` (logits, values, or an activation whose ``f(0)`` is 0 or unknown).
        dim: The dimension a softmax or log-softmax normalizes, else None.
    """

    activation: Activation = "none"
    dim: int | None = None

    @property
    def bounded(self) -> bool:
        """Probabilities or log-probabilities: the output cannot grow without limit."""
        return self.activation in ("softmax", "log_softmax", "sigmoid")

    def know_nothing(self, like: torch.Tensor) -> torch.Tensor:
        """The output of a network with zero weights, shaped and typed as ``like``.

        Example:
            >>> OutputForm("log_softmax", 1).know_nothing(torch.randn(2, 4)).exp().tolist()
            [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]
            >>> OutputForm("sigmoid").know_nothing(torch.randn(3)).tolist()
            [0.5, 0.5, 0.5]
        """
        size = int(like.shape[self.dim]) if self.dim is not None else 1
        value = {"softmax": 1.0 / size, "log_softmax": -math.log(size), "sigmoid": 0.5,
                 "exp": 1.0, "softplus": math.log(2.0), "none": 0.0}[self.activation]
        return torch.full_like(like.detach(), value)

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """``f(z)``: the output that the pre-activation ``z`` gives, ``z``'s shape.

        Example:
            >>> OutputForm("softmax", 1).activate(torch.zeros(1, 4)).tolist()
            [[0.25, 0.25, 0.25, 0.25]]
        """
        if self.activation == "softmax":
            return z.softmax(self.dim if self.dim is not None else -1)
        if self.activation == "log_softmax":
            return z.log_softmax(self.dim if self.dim is not None else -1)
        if self.activation == "sigmoid":
            return z.sigmoid()
        if self.activation == "exp":
            return z.exp()
        if self.activation == "softplus":
            return torch.nn.functional.softplus(z)
        return z

    @property
    def range(self) -> tuple[float, float] | None:
        """The values an elementwise activation can output (None for logits, values, and the
        normalized softmax and log-softmax).

        Example:
            >>> OutputForm("sigmoid").range, OutputForm("none").range
            ((0.0, 1.0), None)
        """
        return {"sigmoid": (0.0, 1.0), "exp": (0.0, math.inf),
                "softplus": (0.0, math.inf)}.get(self.activation)

    def out_of_range(self, outputs: torch.Tensor, targets: torch.Tensor,
                     tol: float = 1e-3) -> tuple[float, float]:
        """``(outside, pinned)``: the share of ``targets`` outside :attr:`range`, and the share
        of ``outputs`` within ``tol`` of one of its bounds; ``(0, 0)`` without a range. Both
        high: the targets lie where the activation cannot go, and the network pushes its
        output against the bound trying.

        Example:
            >>> form = OutputForm("sigmoid")
            >>> form.out_of_range(torch.tensor([0.9999, 0.5]), torch.tensor([2.0, 0.5]))
            (0.5, 0.5)
        """
        bounds = self.range
        if bounds is None or outputs.numel() == 0 or targets.numel() == 0:
            return 0.0, 0.0
        low, high = bounds
        y, out = targets.detach().double(), outputs.detach().double()
        outside = float(((y < low - 1e-6) | (y > high + 1e-6)).double().mean())
        at_bound = (out - low).abs() <= tol
        if math.isfinite(high):
            at_bound |= (out - high).abs() <= tol
        pinned = float(at_bound.double().mean())
        return outside, pinned

    def describe(self) -> str:
        """The know-nothing output in words, for messages.

        Example:
            >>> OutputForm("softmax", 1).describe()
            'uniform probabilities'
        """
        return {"softmax": "uniform probabilities", "log_softmax": "uniform log-probabilities",
                "sigmoid": "0.5 (sigmoid of 0)", "exp": "1 (exp of 0)",
                "softplus": "log 2 (softplus of 0)", "none": "zeros"}[self.activation]


def output_form(output: torch.Tensor) -> OutputForm:
    """The last activation of ``output``, from its values and its autograd history.

    Probabilities and log-probabilities are told by their values (summing to 1, or
    ``logsumexp = 0``, along dimension 1 or the last, of size 2 or more), as
    :func:`infer_task` tells them; a sigmoid, exponential or softplus by the autograd node that
    made the output (behind any reshape, slice or cast), so ``output`` must come from a pass
    with gradients enabled for those. Anything else is ``"none"``.

    Example:
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> output_form(z.softmax(1)), output_form(z.sigmoid().reshape(-1)).activation
        (OutputForm(activation='softmax', dim=1), 'sigmoid')
        >>> output_form(z.tanh()).activation
        'none'
    """
    x = output.detach().float()
    if output.dim() >= 2 and bool(torch.isfinite(x).all()):
        for dim in dict.fromkeys((1, output.dim() - 1)):
            if output.shape[dim] < 2:
                continue
            if bool((x <= NORMALIZED_TOL).all()) and is_normalized(x.logsumexp(dim), 0.0):
                return OutputForm("log_softmax", dim)
            if bool(((x >= 0) & (x <= 1)).all()) and is_normalized(x.sum(dim), 1.0):
                return OutputForm("softmax", dim)
    node = output.grad_fn
    for _ in range(8):
        if node is None:
            break
        name = type(node).__name__
        for prefix, activation in _ELEMENTWISE.items():
            if name.startswith(prefix):
                return OutputForm(activation)
        if not name.startswith(_PASS_THROUGH) or not node.next_functions:
            break
        node = node.next_functions[0][0]
    return OutputForm()


def memorising_output(task: Task, like: torch.Tensor, target: torch.Tensor,
                      margin: float) -> torch.Tensor | None:
    """An output that has memorized ``target``, in the form of ``like``; None for a task
    without one.

    Classes: logits ``margin`` on the target class and 0 elsewhere (in log-probabilities or
    probabilities where ``like`` holds those); labels: logits ``+margin`` / ``-margin`` (or
    their sigmoid); regression: the target itself (``margin`` unused). The user's loss on it,
    over growing margins, is the loss a network that memorized its sample reaches: 0 for a
    plain cross-entropy, a floor where the loss regularizes confidence (label smoothing) or
    where something squashes the output before it.

    Example:
        >>> from lightning_diag.functional.task import infer_task
        >>> task = infer_task(torch.zeros(2, 3), torch.tensor([2, 0]))
        >>> memorising_output(task, torch.zeros(2, 3), torch.tensor([2, 0]), 5.0).tolist()
        [[0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]
    """
    if task.kind == "multiclass":
        dim = task.class_dim if task.class_dim is not None else 1
        index = target.reshape(-1) if task.flattened else target
        index = torch.where(index == IGNORE_INDEX, torch.zeros_like(index), index)
        index = index.to(like.device).unsqueeze(dim if dim >= 0 else index.dim())
        z = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        z = z.scatter(dim, index.long(), margin)
        if task.scores == "log_probs":
            return z.log_softmax(dim)
        return z.softmax(dim) if task.scores == "probs" else z
    if task.kind == "multilabel":
        z = ((2 * target.float() - 1) * margin).reshape(like.shape).to(like)
        return z.sigmoid() if task.scores == "probs" else z
    if task.kind == "regression":
        return target.detach().reshape(like.shape).to(like)
    return None

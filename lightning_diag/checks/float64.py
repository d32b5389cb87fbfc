"""Steps of a float64 copy evaluated in true float64, for the gradient check (recipe step 2.3).

Converting the copy and the batch to float64 is not enough when the step casts: a step that
writes ``labels.float()`` or ``logits.to(torch.float32)`` computes its loss in float32 inside the
float64 copy, and centered differences of a float32 loss at ``h = 1e-5`` measure roundoff (every
numeric derivative rounds to about 0), so correct gradients read as a mismatch.

:class:`Float64Step` evaluates the step under a :class:`~torch.overrides.TorchFunctionMode`
that turns every cast to a lower float precision into a cast to float64 (``Tensor.float``,
``half``, ``bfloat16``, ``to``, ``type``, ``type_as``, and ``dtype=`` arguments of any torch
function: ``torch.tensor(..., dtype=torch.float32)``, ``softmax(dtype=...)``), with float64 as
the default dtype (factories such as ``torch.zeros(3)``), as Lightning's ``"64-true"`` precision
does. What still runs in lower precision (an operation returning a lower precision from float64
inputs, or receiving a lower-precision tensor that depends on the weights: a NumPy or C kernel
in float32 inside an autograd Function) is recorded: :attr:`Float64Step.lost` names it, and the
check says it cannot judge rather than report a mismatch. Only the first evaluation is
watched; later ones run under the mode only if it rewrote a cast that reaches the loss, so a
step without casts runs at full speed.

Example:
    >>> import torch
    >>> w = torch.ones(3, dtype=torch.float64)
    >>> step = Float64Step()
    >>> with step.evaluation():
    ...     loss = (w.float() * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)).sum()
    >>> loss.dtype, dict(step.casts), dict(step.lost)
    (torch.float64, {'Tensor.float': 1, 'torch.tensor(dtype=)': 1}, {})
    >>> with step.evaluation():  # the deciding one: the same step, casts kept
    ...     loss = (w.float() * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)).sum()
    >>> loss.dtype, step.rewrite  # they lower the loss: every later evaluation rewrites them
    (torch.float32, True)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, resolve_name

__all__ = ["LOWER_FLOATS", "Float64Step"]

#: Float dtypes below float64: a cast to one of them loses what the gradient check measures.
LOWER_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_LOWER_TYPE_NAMES = frozenset({"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor",
                               "torch.cuda.FloatTensor", "torch.cuda.HalfTensor",
                               "torch.cuda.BFloat16Tensor"})
_TO_DOUBLE = {torch.Tensor.float: "Tensor.float", torch.Tensor.half: "Tensor.half",
              torch.Tensor.bfloat16: "Tensor.bfloat16"}


class Float64Step:
    """Evaluations of a step in true float64 (see the module docstring).

    The first evaluation is watched with every cast rewritten. When it found casts, the
    second (:attr:`deciding`) is watched without rewriting them: if nothing then runs below
    float64 and its loss is the first one bit for bit (a cast of a comparison for an accuracy,
    ``(pred == y).float()``), the casts do not touch the loss and later evaluations run plain,
    at full speed; else (or when the step raises without them: a ``x.float()`` fed to a
    float64 layer) every later evaluation rewrites them, so that every evaluation compared
    computes alike. A cast can reach the loss with nothing running below float64 on float64
    inputs: mixup's ``lam * F.one_hot(y).float()`` rounds the Python float ``lam`` to float32,
    and the float32 targets then meet float64 logits in a float64 loss. The deciding
    evaluation's value (or error) is to be discarded.

    Attributes:
        casts: Casts to a lower precision turned into float64, by name, counted over the
            first evaluation.
        lost: What still ran below float64 in the first evaluation, by name and dtype:
            operations returning a lower float precision from float64 inputs
            (``"F.linear -> float32"``) or receiving one that depends on the weights
            (``"F.linear <- float32 input that depends on the weights"``), and the loss itself
            when it is not float64 (``"the loss -> float32"``).
        rewrite: Whether evaluations after the second rewrite the casts.
    """

    def __init__(self) -> None:
        self.casts: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.rewrite = False
        self._plain: Counter[str] = Counter()  # what runs below float64 when not rewritten
        self._count = 0
        self._record: Counter[str] | None = None
        self._first: float | None = None  # the first evaluation's loss
        self._differs = False  # the deciding evaluation's loss is not the first's

    @property
    def deciding(self) -> bool:
        """Whether the next evaluation is the deciding one (its value is to be discarded)."""
        return self._count == 1 and bool(self.casts)

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """One evaluation of the step, float64 by default (see the class docstring)."""
        mode: Any = nullcontext()
        if self._count == 0:
            self._record = self.lost
            mode = _Float64Mode(self, rewrite=True, lost=self.lost)
        elif self.deciding:
            self._record = self._plain
            mode = _Float64Mode(self, rewrite=False, lost=self._plain)
        elif self.rewrite:
            mode = _Float64Mode(self, rewrite=True, lost=None)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        failed = True
        try:
            with mode:
                yield
            failed = False
        finally:
            torch.set_default_dtype(previous)
            if self._record is self._plain:  # a step that fails without them needs them too
                self.rewrite = failed or bool(self._plain) or self._differs
            self._count += 1
            self._record = None

    def check_loss(self, loss: torch.Tensor) -> None:
        """Record a loss that is not float64, and in the deciding evaluation one that is not
        the first evaluation's (inside :meth:`evaluation`)."""
        if self._record is None:
            return
        if loss.is_floating_point() and loss.dtype != torch.float64:
            self._record[f"the loss -> {_short(loss.dtype)}"] += 1
        if loss.numel() != 1:
            return
        value = float(loss.detach())
        if self._count == 0:
            self._first = value
        elif self._record is self._plain and self._first is not None:
            # NaN is not equal to itself: a NaN loss rewrites, as a loss that moved would
            self._differs = value != self._first

    def describe_casts(self) -> str:
        """The casts that mattered, in words, for findings (empty when none did)."""
        if not self.rewrite:
            return ""
        named = ", ".join(f"`{name}` x{count}" for name, count in sorted(self.casts.items()))
        return f" The step's casts to a lower precision ({named}) were evaluated in float64."

    def describe_lost(self) -> str:
        return ", ".join(f"`{name}` x{count}" for name, count in sorted(self.lost.items()))


class _Float64Mode(TorchFunctionMode):
    """With ``rewrite``, casts to a lower float precision become float64 (counted in
    ``step.casts`` when watched); with ``lost`` (watched), what still runs below float64 is
    counted there."""

    def __init__(self, step: Float64Step, rewrite: bool, lost: Counter[str] | None) -> None:
        super().__init__()
        self.step, self.rewrite, self.lost = step, rewrite, lost

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if self.rewrite:
            func, args, note = _to_float64(func, args, kwargs)
            if note and self.lost is not None:
                self.step.casts[note] += 1
        if self.lost is None:
            return func(*args, **kwargs)
        if (tracked := _tracked_lower(args, kwargs)) is not None:
            self.lost[f"{_name(func)} <- {_short(tracked)} input that depends on the "
                      "weights"] += 1
        out = func(*args, **kwargs)
        lowered = _lowered(out)
        if lowered is not None and _has_float64(args, kwargs):
            self.lost[f"{_name(func)} -> {_short(lowered)}"] += 1
        return out


def _to_float64(func: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], str]:
    """``func`` and its arguments with every lower float precision replaced by float64, and the
    name of the cast replaced ("" when none). ``kwargs`` is changed in place."""
    if func in _TO_DOUBLE:
        return torch.Tensor.double, args, _TO_DOUBLE[func]
    note = ""
    if kwargs.get("dtype") in LOWER_FLOATS:
        kwargs["dtype"] = torch.float64
        note = f"{_name(func)}(dtype=)"
    if func is torch.Tensor.to or func is torch.Tensor.type:
        new = tuple(_lower_to_double(a) for a in args[1:])
        if any(a is not b for a, b in zip(new, args[1:], strict=True)):
            args, note = (args[0], *new), f"Tensor.{func.__name__}"
    elif func is torch.Tensor.type_as and len(args) > 1 and _is_lower(args[1]):
        return torch.Tensor.double, args[:1], "Tensor.type_as"
    return func, args, note


def _lower_to_double(arg: Any) -> Any:
    """float64 for a lower float dtype, its type name or tensor type (``to``/``type`` arguments);
    ``(device, float64)`` for a tensor of a lower float dtype (``x.to(other)``)."""
    if arg in LOWER_FLOATS:
        return torch.float64
    if isinstance(arg, str) and arg in _LOWER_TYPE_NAMES:
        return arg.replace("Float", "Double").replace("Half", "Double").replace("BFloat16",
                                                                              "Double")
    if isinstance(arg, type) and getattr(arg, "dtype", None) in LOWER_FLOATS:
        return torch.float64
    if _is_lower(arg):
        return arg.new_empty(0, dtype=torch.float64)
    return arg


def _is_lower(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in LOWER_FLOATS


def _lowered(out: Any) -> torch.dtype | None:
    """The lower float dtype of an output (a tensor, or the first in a tuple/list), else None."""
    if isinstance(out, (tuple, list)):
        return next((d for o in out if (d := _lowered(o)) is not None), None)
    return out.dtype if _is_lower(out) else None


def _tracked_lower(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype | None:
    """The lower float dtype of an input that carries autograd history (it depends on the
    weights: computed below float64 by code the mode does not see, such as a NumPy or C kernel
    inside an autograd Function), else None."""
    for value in (*args, *kwargs.values()):
        if _is_lower(value) and value.requires_grad:
            return value.dtype  # type: ignore[no-any-return]
    return None


def _has_float64(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            return True
        if isinstance(value, (tuple, list)) and any(
                isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in value):
            return True
    return False


def _name(func: Any) -> str:
    """``F.linear``, ``Tensor.to``, ``torch.tensor``: how people write the call."""
    name = resolve_name(func) or getattr(func, "__name__", repr(func))
    for long, short in (("torch.nn.functional.", "F."), ("torch.Tensor.", "Tensor.")):
        if name.startswith(long):
            return short + name.removeprefix(long)
    return name


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

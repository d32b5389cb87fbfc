"""Reading inputs, targets and the loss out of a user's batches and ``training_step``.

The defaults understand tuples/lists ``(x, y, ...)`` and dicts with common key names; every
callback that needs them takes ``batch_to_input`` / ``batch_to_target`` arguments to override.

Example:
    >>> import torch
    >>> from lightning_diag.batch import default_batch_to_input, default_batch_to_target
    >>> batch = {"image": torch.zeros(2, 3), "label": torch.tensor([0, 1])}
    >>> default_batch_to_input(batch).shape, default_batch_to_target(batch).tolist()
    (torch.Size([2, 3]), [0, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch

__all__ = [
    "BatchFn",
    "INPUT_KEYS",
    "NoLossError",
    "OutputCapture",
    "RefusedOnACopy",
    "TARGET_KEYS",
    "UserCodeError",
    "call_user",
    "default_batch_to_input",
    "default_batch_to_target",
    "loss_from_output",
    "map_floats",
    "refusal_in",
    "select_samples",
    "step_loss",
]

BatchFn = Callable[[Any], Any]
T = TypeVar("T")


class NoLossError(ValueError):
    """``training_step`` returned no loss (None, or no ``"loss"`` entry): nothing to measure."""


class RefusedOnACopy(NoLossError):
    """The user's code asked a copy's stand-in Trainer for something that could act on the real
    run (``self.trainer.save_checkpoint``, ``self.trainer.fit_loop``...): the side experiment
    steps aside (``<slug>.skipped``, naming the attribute) rather than act on it.

    Raised by :class:`~lightning_diag.isolation.TrainerView`; :func:`step_loss` takes it out of
    the :class:`UserCodeError` that :func:`call_user` wraps it in, so that it reads as a skip.
    """


class UserCodeError(Exception):
    """The user's code raised where a diagnostic called it outside training (not a skip).

    Raised by :func:`call_user` around ``training_step`` and ``validation_step`` on a copy,
    ``forward``, ``configure_optimizers``, a dataset's ``__getitem__``/``__iter__``, a
    ``collate_fn`` or a ``batch_to_*`` function; the message names the function, the
    exception type and its message. Deliberately not a ValueError, so that no
    ``except ValueError`` meant for a skip takes it.

    Attributes:
        where: The function, e.g. ``"`MyData.__getitem__`"``.
        error: The exception it raised (also the ``__cause__``, with its traceback).

    Example:
        >>> str(UserCodeError("`Net.forward`", RuntimeError("boom")))
        '`Net.forward` raised RuntimeError: boom'
    """

    def __init__(self, where: str, error: Exception) -> None:
        self.where, self.error = where, error
        super().__init__(f"{where} raised {type(error).__name__}: {error}")


def refusal_in(err: BaseException) -> RefusedOnACopy | None:
    """The :class:`RefusedOnACopy` behind ``err``, through nested :class:`UserCodeError`
    wrappings (a ``configure_optimizers`` that ``self.optimizers()`` calls inside the step);
    else None.

    Example:
        >>> refusal = RefusedOnACopy("`self.trainer.save_checkpoint`")
        >>> refusal_in(UserCodeError("`step`", UserCodeError("`configure`", refusal))) is refusal
        True
    """
    while isinstance(err, UserCodeError):
        err = err.error
    return err if isinstance(err, RefusedOnACopy) else None


def call_user(where: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, where ``fn`` is the user's code: any exception becomes a UserCodeError.

    The user's code may raise anything, so this is the one place that catches every
    ``Exception``; it names it and never swallows it. ``KeyboardInterrupt`` passes through.

    Example:
        >>> call_user("`parse`", int, "12")
        12
        >>> call_user("`lookup`", {}.__getitem__, "x")
        Traceback (most recent call last):
        ...
        lightning_diag.batch.UserCodeError: `lookup` raised KeyError: 'x'
    """
    try:
        return fn(*args)
    except Exception as err:
        raise UserCodeError(where, err) from err


#: Dict keys read as the input, first match wins: Hugging Face model inputs (vision, text,
#: audio) before generic names, so that a batch holding ``input_ids`` and ``text`` gives the
#: tensor. ``attention_mask``, ``pixel_mask`` and ``token_type_ids`` go with an input, never
#: stand for it, and are deliberately absent.
INPUT_KEYS = ("pixel_values", "input_ids", "inputs_embeds", "input_values", "input_features",
              "x", "input", "inputs", "image", "images", "img", "data", "features", "tokens",
              "text", "audio")
#: Dict keys read as the target (``labels`` as in Hugging Face, ``label`` as in its datasets).
TARGET_KEYS = ("y", "target", "targets", "label", "labels", "label_ids", "class", "classes")


def _from_mapping(batch: Mapping[str, Any], keys: Sequence[str], what: str) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    raise ValueError(
        f"Cannot find the {what} in a dict batch with keys {sorted(batch)}; expected one of "
        f"{list(keys)}. Pass `batch_to_{what}=` to the callback."
    )


def default_batch_to_input(batch: Any) -> Any:
    """The model input of a batch: ``batch[0]`` for tuples/lists, a known key for dicts."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return _from_mapping(batch, INPUT_KEYS, "input")
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise ValueError(
        f"Cannot find the input in a batch of type {type(batch).__name__}; pass `batch_to_input=`."
    )


def default_batch_to_target(batch: Any) -> Any:
    """The target of a batch: ``batch[1]`` for tuples/lists, a known key for dicts, else None."""
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
        return None
    if isinstance(batch, (list, tuple)) and len(batch) > 1:
        return batch[1]
    return None


def loss_from_output(output: Any) -> torch.Tensor:
    """The loss tensor of a ``training_step`` output (a tensor, or a dict with ``"loss"``).

    Raises:
        NoLossError: (a ValueError) the step returned None or something without a loss, naming
            what it returned.
    """
    if type(output) is dict:  # what Lightning hands `on_train_batch_end`: read on every step
        loss = output.get("loss")  # without the abstract `Mapping` check (~1-10 us cold)
        if isinstance(loss, torch.Tensor):
            return loss
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise NoLossError(
        "`training_step` must return the loss as a tensor or a dict with a 'loss' tensor for this "
        f"diagnostic, but it returned {type(output).__name__}. Return the loss (or, under manual "
        "optimization, pass it to `self.manual_backward`)."
    )


def step_loss(module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> torch.Tensor:
    """Run the module's own ``training_step`` on ``batch`` and return the loss tensor.

    Side experiments call it on a copy, so that the user's step failing there is the user's
    error to report (the check steps aside), not a crash of the run nor an internal error. On a
    copy (whose ``self.trainer`` is a
    :class:`~lightning_diag.isolation.trainer_view.TrainerView`) under manual optimization, the
    loss is the one the step passed to ``manual_backward``, when it returned none.

    Raises:
        UserCodeError: ``training_step`` raised.
        NoLossError: it returned no loss, or (manual optimization) the step has several
            optimizers or several ``manual_backward`` calls: no one loss to judge.
    """
    view = getattr(module, "_trainer", None)
    begin = getattr(view, "begin_step", None)  # only a copy's TrainerView has these two
    if begin is not None:
        begin()
    try:
        step = call_user(f"`{type(module).__name__}.training_step`", module.training_step,
                         batch, batch_idx)
    except UserCodeError as err:
        refused = refusal_in(err)
        if refused is None:
            raise
        raise refused from err
    if begin is not None:
        return view.step_loss(step)  # type: ignore[union-attr]
    return loss_from_output(step)


class OutputCapture:
    """Records what the model computed inside the user's own step, through forward hooks.

    The prediction is the output of the module's own ``forward`` when the step calls it
    (``self(x)``), else that of the outermost submodule the step called last (``self.net(x)``):
    the step is never replaced by a call on a guessed input. Use as a context manager around
    one or many steps; the hooks are removed on exit, also when the step raises.

    Example:
        >>> import torch, lightning.pytorch as pl
        >>> class M(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        ...     def training_step(self, batch, batch_idx):
        ...         return self.net(batch[0]).sum()
        >>> m = M()
        >>> with OutputCapture(m) as capture:
        ...     loss = m.training_step((torch.zeros(2, 3),), 0)
        >>> capture.output.shape, len(m.net._forward_hooks)
        (torch.Size([2, 4]), 0)
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._handles: list[Any] = []
        self._calls: list[tuple[int, Any]] = []
        self._depth = {id(m): name.count(".") + 1 if name else 0
                       for name, m in module.named_modules()}

    def __enter__(self) -> OutputCapture:
        for m in self.module.modules():
            self._handles.append(m.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _record(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._calls.append((self._depth.get(id(module), 1 << 30), output))

    def clear(self) -> None:
        """Forget what was recorded (call between steps)."""
        self._calls.clear()

    @property
    def output(self) -> Any:
        """The step's prediction (see the class docstring), or None when no module ran."""
        if not self._calls:
            return None
        top = min(depth for depth, _ in self._calls)
        return next(out for depth, out in reversed(self._calls) if depth == top)


def map_floats(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every floating-point tensor in a nested batch, keeping its structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return type(obj)({k: map_floats(v, fn) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_floats(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_floats(v, fn) for v in obj)
    return obj


def select_samples(batch: Any, index: torch.Tensor) -> Any:
    """Keep the samples ``index`` of every tensor in a batch whose first dimension is the batch."""
    size = _batch_size(batch)

    def pick(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj[index.to(obj.device)] if obj.dim() > 0 and obj.shape[0] == size else obj
        if isinstance(obj, Mapping):
            return type(obj)({k: pick(v) for k, v in obj.items()})  # type: ignore[call-arg]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(pick(v) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(pick(v) for v in obj)
        return obj

    return pick(batch)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (list, tuple)) or isinstance(batch, Mapping):
        for v in values:
            size = _batch_size(v)
            if size is not None:
                return size
    return None

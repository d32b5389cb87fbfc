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
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = [
    "BatchFn",
    "INPUT_KEYS",
    "NoLossError",
    "TARGET_KEYS",
    "default_batch_to_input",
    "default_batch_to_target",
    "loss_from_output",
    "map_floats",
    "select_samples",
    "step_loss",
]

BatchFn = Callable[[Any], Any]


class NoLossError(ValueError):
    """``training_step`` returned no loss (None, or no ``"loss"`` entry): nothing to measure."""

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "img", "data", "features")
TARGET_KEYS = ("y", "target", "targets", "label", "labels", "class", "classes")


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
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise NoLossError(
        "`training_step` must return the loss as a tensor or a dict with a 'loss' tensor for this "
        f"diagnostic, but it returned {type(output).__name__}. Return the loss, or use a model "
        "with automatic optimization."
    )


def step_loss(module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> torch.Tensor:
    """Run the module's own ``training_step`` on ``batch`` and return the loss tensor."""
    return loss_from_output(module.training_step(batch, batch_idx))


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

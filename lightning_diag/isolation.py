"""Side experiments that leave the main run bit-identical.

A side experiment (gradient check, overfit test, LR sweep) works on a deep copy of the module,
reads batches through its own sequential loader over the training *dataset* (the user's sampler
and its generator are never advanced), and restores every RNG stream in ``finally``. Anything the
copy's ``training_step`` logs with ``self.log`` is dropped.

Example:
    >>> import torch
    >>> from lightning_diag.isolation import preserved_rng
    >>> before = torch.get_rng_state()
    >>> with preserved_rng():
    ...     _ = torch.rand(3)
    >>> torch.equal(before, torch.get_rng_state())
    True
"""

from __future__ import annotations

import copy
import itertools
import pickle
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_diag.batch import call_user

__all__ = [
    "RNGState",
    "clone_module",
    "disable_regularization",
    "first_batches",
    "first_loader",
    "fresh_optimizer",
    "preserved_rng",
    "side_experiment",
    "train_dataloader_of",
]


@dataclass
class RNGState:
    """Every global random stream: Python, NumPy, torch CPU and every CUDA device."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)


@contextmanager
def preserved_rng() -> Iterator[RNGState]:
    """Restore every global RNG stream on exit, even when the body raises."""
    state = RNGState.capture()
    try:
        yield state
    finally:
        state.restore()


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log``/``self.log_dict`` on a copy: nothing reaches the real logs."""


def clone_module(module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy of ``module`` that shares its trainer reference but logs nothing.

    The trainer (and its dataloaders, loggers, callbacks) is not copied: the copy points at the
    same trainer so that ``self.trainer``-dependent code still runs.
    """
    memo: dict[int, Any] = {}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = trainer
    try:
        clone = copy.deepcopy(module, memo)
    # what deepcopy raises on an uncopyable attribute: TypeError (a lock, an open file),
    # RuntimeError (a non-leaf tensor), copy.Error and pickle.PicklingError (custom reducers)
    except (TypeError, RuntimeError, copy.Error, pickle.PicklingError) as err:
        raise RuntimeError(
            f"lightning_diag could not copy {type(module).__name__} for a side experiment "
            f"({type(err).__name__}: {err}). Make the module deep-copyable or remove this callback."
        ) from err
    clone.log = _no_log  # type: ignore[method-assign]
    clone.log_dict = _no_log  # type: ignore[method-assign]
    return clone


@contextmanager
def side_experiment(module: pl.LightningModule) -> Iterator[pl.LightningModule]:
    """Yield an isolated copy of ``module``; every RNG stream is restored afterwards."""
    with preserved_rng(), torch.enable_grad():
        clone = clone_module(module)
        try:
            yield clone
        finally:
            del clone


def train_dataloader_of(trainer: pl.Trainer) -> DataLoader:
    """The user's training DataLoader (the first one when there are several), not iterated.

    Raises:
        ValueError: no training dataloader, or one that is not a ``torch.utils.data.DataLoader``.
    """
    loader: Any = getattr(trainer, "train_dataloader", None)
    if loader is None:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.is_defined():
            loader = source.dataloader()
    loader = first_loader(loader)
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "lightning_diag needs a torch DataLoader for training (from `train_dataloaders=`, "
            f"`train_dataloader()` or a datamodule), got {type(loader).__name__}."
        )
    return loader


def first_loader(obj: Any) -> Any:
    """The first DataLoader inside a loader, a CombinedLoader, a list or a dict of loaders."""
    inner = getattr(obj, "iterables", None)  # CombinedLoader
    if inner is not None:
        obj = inner
    if isinstance(obj, Mapping):
        return first_loader(next(iter(obj.values()), None))
    if isinstance(obj, Sequence) and not isinstance(obj, (DataLoader, str)):
        return first_loader(obj[0] if obj else None)
    return obj


def first_batches(loader: DataLoader, num_batches: int, device: torch.device) -> list[Any]:
    """The first ``num_batches`` batches in dataset order, without touching ``loader``'s sampler.

    Map-style datasets are read sequentially by index (through ``__getitems__`` when the dataset
    has it, as a DataLoader does) with the loader's batch size and collate function; iterable
    datasets through a fresh iterator, in the main process. Call it inside
    :func:`preserved_rng`: the dataset's own code may draw random numbers.

    Raises:
        ValueError: the dataset yields no batch.
        UserCodeError: the dataset's ``__getitem__``/``__getitems__``/``__iter__`` or the
            loader's ``collate_fn`` raised (named, with the exception type and message).
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    dataset: Dataset = loader.dataset
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 32
    collate = getattr(loader.collate_fn, "__name__", type(loader.collate_fn).__name__)
    batches: list[Any] = []
    for samples in itertools.islice(_sample_lists(dataset, batch_size), num_batches):
        batch = call_user(f"the training loader's `collate_fn` ({collate})", loader.collate_fn,
                          samples)
        batches.append(move_data_to_device(batch, device))
    if not batches:
        raise ValueError(
            "The training dataloader yielded no batch (empty dataset?). Give the Trainer training "
            "data before running lightning_diag checks."
        )
    return batches


def _sample_lists(dataset: Dataset, batch_size: int) -> Iterator[list[Any]]:
    """Lists of ``batch_size`` samples in dataset order (the last may be shorter), not collated."""
    name = type(dataset).__name__
    if isinstance(dataset, IterableDataset):
        samples = call_user(f"`{name}.__iter__`", iter, dataset)
        while chunk := call_user(f"`{name}.__iter__`", _take, samples, batch_size):
            yield chunk
        return
    getitems = getattr(dataset, "__getitems__", None)
    for start in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
        index = list(range(start, min(start + batch_size, len(dataset))))  # type: ignore[arg-type]
        if getitems:
            yield call_user(f"`{name}.__getitems__`", getitems, index)
        else:
            yield [call_user(f"`{name}.__getitem__` (index {i})", dataset.__getitem__, i)
                   for i in index]


def _take(iterator: Iterator[Any], n: int) -> list[Any]:
    return list(itertools.islice(iterator, n))


def fresh_optimizer(module: pl.LightningModule) -> torch.optim.Optimizer:
    """The first optimizer of ``module.configure_optimizers()``, whatever shape it returns.

    Raises:
        UserCodeError: ``configure_optimizers`` raised.
        ValueError: it returned no torch optimizer.
    """
    out: Any = call_user(f"`{type(module).__name__}.configure_optimizers`",
                         module.configure_optimizers)
    for _ in range(4):
        if isinstance(out, torch.optim.Optimizer):
            return out
        if isinstance(out, Mapping):
            out = out.get("optimizer")
        elif isinstance(out, (list, tuple)) and out:
            out = out[0]
        else:
            break
    raise ValueError(
        "`configure_optimizers()` returned no torch optimizer "
        f"(got {type(out).__name__}); lightning_diag needs one for this side experiment."
    )


_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def disable_regularization(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, reg_attr: str | None
) -> list[str]:
    """Turn regularization off on a copy: dropout, optimizer weight decay and ``reg_attr``.

    BatchNorm stays in train mode. Returns a description of what was turned off.
    """
    changed: list[str] = []
    dropouts = [m for m in module.modules() if isinstance(m, _DROPOUT)]
    for m in dropouts:
        m.eval()
    if dropouts:
        changed.append(f"{len(dropouts)} dropout layer(s)")
    if optimizer is not None:
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0):
                group["weight_decay"] = 0.0
                changed.append("optimizer weight decay")
    if reg_attr:
        set_reg_strength(module, reg_attr, 0.0)
        changed.append(f"`{reg_attr}`")
    return sorted(set(changed))


def get_reg_strength(module: torch.nn.Module, reg_attr: str) -> float:
    """Read a regularization strength from an attribute or ``hparams`` entry of ``module``."""
    if hasattr(module, reg_attr):
        return float(getattr(module, reg_attr))
    hparams = getattr(module, "hparams", None)
    if hparams is not None and reg_attr in hparams:
        return float(hparams[reg_attr])
    raise AttributeError(
        f"`reg_attr={reg_attr!r}`: {type(module).__name__} has no attribute or hparam of that name."
    )


def set_reg_strength(module: torch.nn.Module, reg_attr: str, value: float) -> None:
    """Set a regularization strength where :func:`get_reg_strength` found it."""
    if hasattr(module, reg_attr):
        setattr(module, reg_attr, value)
        return
    hparams = getattr(module, "hparams", None)
    if hparams is not None and reg_attr in hparams:
        hparams[reg_attr] = value
        return
    raise AttributeError(
        f"`reg_attr={reg_attr!r}`: {type(module).__name__} has no attribute or hparam of that name."
    )

"""The first training batches of a run, read without touching the user's loader.

A side experiment reads batches through its own sequential reading of the training *dataset*:
the user's sampler and its generator are never advanced.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_diag.batch import call_user
from lightning_diag.isolation.rng import preserved_generators

__all__ = ["first_batches", "first_loader", "train_dataloader_of"]


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
    datasets through a fresh iterator, in the main process. A loader with ``batch_size=None``
    (no automatic batching: each item already is a batch) gives ``collate_fn(item)`` per item,
    as it does. The batches are copies (a step editing its batch in place leaves the dataset
    alone), and the generators the dataset keeps as its own are put back afterwards
    (:func:`~lightning_diag.isolation.rng.preserved_generators`). Call it inside
    :func:`preserved_rng`: the dataset's own code may draw from the global streams too.

    Raises:
        ValueError: the dataset yields no batch.
        UserCodeError: the dataset's ``__getitem__``/``__getitems__``/``__iter__`` or the
            loader's ``collate_fn`` raised (named, with the exception type and message).
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning_utilities.core.apply_func import apply_to_collection

    dataset: Dataset = loader.dataset
    batched = loader.batch_sampler is not None  # DataLoader's own test of automatic batching
    batch_size = (loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 32
                  if batched else 1)
    collate = getattr(loader.collate_fn, "__name__", type(loader.collate_fn).__name__)
    batches: list[Any] = []
    with preserved_generators(dataset, loader.collate_fn):
        for samples in itertools.islice(_sample_lists(dataset, batch_size), num_batches):
            batch = call_user(f"the training loader's `collate_fn` ({collate})",
                              loader.collate_fn, samples if batched else samples[0])
            # copies: without automatic batching (or with a collate that stacks nothing) the
            # batch holds the dataset's own tensors, which a step editing its batch in place
            # (`x /= 255`) would change under the run
            batches.append(apply_to_collection(move_data_to_device(batch, device),
                                               torch.Tensor, torch.Tensor.clone))
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

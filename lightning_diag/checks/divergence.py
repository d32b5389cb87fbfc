"""Where a diverging training step happened: its dataset indices, a saved copy of its batch,
and whether the batch holds samples the data inspection flagged (recipe 6.4.4: a divergence
points either at the model or at abnormal samples).

Used by :class:`~lightning_diag.callbacks.lr_advisor.LRPlateauAdvisor`, whose module exports
:func:`batch_indices` and :func:`save_batch`.

Example:
    >>> import torch
    >>> batch_indices(None, (torch.zeros(2, 4), torch.zeros(2), torch.tensor([7, 3])), 0)
    ((7, 3), 'carried by the batch')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import BatchSampler, SequentialSampler

from lightning_diag.findings import Finding, Severity
from lightning_diag.isolation import train_dataloader_of
from lightning_diag.tensorboard.writer import log_dir

__all__ = ["ABNORMAL_SAMPLE_CODES", "INDEX_KEYS", "batch_indices", "data_link",
           "describe_divergence", "save_batch"]

INDEX_KEYS = ("index", "indices", "idx")
#: Data findings about samples that can make a loss diverge (recipe 6.4.4: abnormal samples).
ABNORMAL_SAMPLE_CODES = ("data.non_finite", "data.unreadable", "data.constant_input",
                         "data.conflicting_labels", "data.label_out_of_range")
#: The data inspection's summary: present when it ran on the training set.
_INSPECTED = "data.summary"
_MODEL_ADVICE = ("The batch holds no abnormal sample, so the model or the learning rate is the "
                 "likely cause (recipe 6.4.4): lower the learning rate (see the update ratio, "
                 "recipe 5.5), look for vanishing or exploding gradients, clip gradients; "
                 "reproduce the step with the saved batch.")
_DATA_ADVICE = ("Remove or repair these samples (recipe 6.4.4: abnormal samples make the loss "
                "diverge suddenly), then train again; reproduce the step with the saved batch.")
_UNKNOWN_ADVICE = ("The model may be wrong (e.g. vanishing gradients) or the batch holds abnormal "
                   "samples (corrupted data): inspect the saved batch; make the batch's dataset "
                   "indices known to match it with the data inspection.")


def batch_indices(trainer: pl.Trainer, batch: Any, batch_idx: int) -> tuple[tuple[int, ...], str]:
    """Dataset indices of a training batch, and how they were found (``""`` when unknown).

    Supported: a batch that carries them (third element of a tuple/list, or an ``index``,
    ``indices`` or ``idx`` key of a dict, as a 1-D integer tensor), or a single-process loader
    whose sampler is a ``SequentialSampler`` over a map-style dataset (``shuffle=False``), where
    batch ``i`` holds ``range(i * batch_size, ...)``. Shuffled loaders draw their order from a
    generator that cannot be replayed without advancing it, so their indices stay unknown.
    """
    carried: Any = None
    if isinstance(batch, Mapping):
        carried = next((batch[k] for k in INDEX_KEYS if k in batch), None)
    elif isinstance(batch, (list, tuple)) and len(batch) > 2:
        carried = batch[2]
    if (isinstance(carried, torch.Tensor) and carried.dim() == 1
            and not carried.is_floating_point()):
        return tuple(int(i) for i in carried.tolist()), "carried by the batch"
    if trainer.world_size != 1:
        return (), ""
    try:
        loader = train_dataloader_of(trainer)
    except ValueError:
        return (), ""
    sampler = loader.batch_sampler
    if isinstance(sampler, BatchSampler) and isinstance(sampler.sampler, SequentialSampler):
        start = batch_idx * sampler.batch_size
        stop = min(start + sampler.batch_size, len(sampler.sampler))
        return tuple(range(start, stop)), "sequential sampler"
    return (), ""


def save_batch(trainer: pl.Trainer, batch: Any, name: str) -> Path | None:
    """``torch.save`` a batch (moved to CPU) as ``name`` in the run's log directory (rank 0)."""
    directory = log_dir(trainer) if trainer.is_global_zero else None
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    torch.save(move_data_to_device(batch, "cpu"), path)
    return path


def _jump_text(loss: float, median: float) -> str:
    """How far a finite ``loss`` jumped above ``median``, in words that hold for a median of 0.

    Example:
        >>> _jump_text(5.0, 0.5)
        'jumped to 5, 10.0x the running median 0.5'
        >>> _jump_text(5.0, 0.0)
        'jumped to 5 from a running median of 0'
    """
    if median > 0:
        return f"jumped to {loss:.4g}, {loss / median:.1f}x the running median {median:.4g}"
    return f"jumped to {loss:.4g} from a running median of {median:.4g}"  # no ratio to 0


def describe_divergence(trainer: pl.Trainer, loss: float, median: float,
                        group: list[tuple[Any, int]], step: int, save: bool,
                        pooled: tuple[int, int]) -> tuple[str, tuple[int, ...], dict[str, Any]]:
    """The finding's message, the batches' dataset indices and details of a diverging step.

    Args:
        trainer: The trainer running the step.
        loss: The step loss (non-finite or a jump), or the mean loss of a group of small
            batches judged together.
        median: Running median of the step losses (or group means) before it (NaN when none).
        group: The offending batch and its index in the epoch, ``(batch, batch_idx)``; several
            when small batches were judged together (the last one is the step's).
        step: Global step of the (last) batch.
        save: Also save the batch (the list of batches of a group) with :func:`save_batch`.
        pooled: The samples and batches the loss was judged over.
    """
    samples, batches = pooled
    found = [batch_indices(trainer, batch, i) for batch, i in group]
    indices = tuple(i for idx, _ in found for i in idx) if all(idx for idx, _ in found) else ()
    source = found[-1][1] if indices else ""
    what = _jump_text(loss, median) if math.isfinite(loss) else f"is {loss}"
    where = f"global step {step}, batch {group[-1][1]} of epoch {trainer.current_epoch}"
    idx_text = (f"dataset indices {list(indices[:16])}{'...' if len(indices) > 16 else ''} "
                f"({source})" if indices else "dataset indices unknown (make the dataset "
                "return its index as a third element, or use a sequential loader)")
    kept: Any = group[0][0] if len(group) == 1 else [batch for batch, _ in group]
    path = save_batch(trainer, kept, f"advisor_divergence_step{step}.pt") if save else None
    saved = f" {'Batch' if len(group) == 1 else 'Batches'} saved to {path}." if path else ""
    head = ("Step loss" if batches <= 1 else
            f"Mean loss of the last {batches} batches ({samples} samples, judged together: "
            "one small batch is too few to judge a jump)")
    return (f"{head} {what} at {where}; {idx_text}.{saved}", indices,
            {"batch_idx": group[-1][1], "indices_source": source,
             "batch_path": str(path) if path else None, "samples": samples,
             "batches": batches, "batch_indices": [i for _, i in group]})


def data_link(indices: tuple[int, ...], found: list[Finding]
              ) -> tuple[str, str, dict[str, Any]]:
    """What the data inspection says about a diverging batch: a sentence, the advice, details.

    ``found`` are the run's findings so far; those of the training set with a code of
    :data:`ABNORMAL_SAMPLE_CODES` name the flagged samples (their ``indices``). The batch's
    ``indices`` holding any of them points at the data; holding none, at the model and the
    learning rate. ``details["flagged_in_batch"]`` maps each code to the batch's samples it
    flagged; ``details["data_checked"]`` says whether a data inspection ran.

    Example:
        >>> flagged = Finding("DataInspection", "data.non_finite", Severity.FAIL,
        ...                   "1 input(s) hold NaN or Inf.", indices=(37,),
        ...                   details={"split": "train"})
        >>> summary = Finding("DataInspection", "data.summary", Severity.INFO, "inspected")
        >>> data_link((32, 37, 40), [summary, flagged])[0]
        'The batch holds 1 sample(s) the data inspection flagged: 37 (data.non_finite).'
        >>> data_link((0, 1), [summary, flagged])[2]
        {'flagged_in_batch': {}, 'data_checked': True}
    """
    checked = any(f.code == _INSPECTED for f in found)
    hits: dict[str, list[int]] = {}
    batch = set(indices)
    for f in found:
        if (f.code in ABNORMAL_SAMPLE_CODES and f.severity >= Severity.WARN
                and f.details.get("split", "train") == "train"):
            hit = sorted(batch.intersection(f.indices))
            if hit:
                hits.setdefault(f.code, []).extend(hit)
    details: dict[str, Any] = {"flagged_in_batch": hits, "data_checked": checked}
    flagged = sum(len(f.indices) for f in found if f.code in ABNORMAL_SAMPLE_CODES)
    if not indices:
        what = (f"the {flagged} sample(s) the data inspection flagged" if checked
                else "a data inspection's findings (none ran in this fit)")
        return (f"Without its indices the batch cannot be matched with {what}.",
                _UNKNOWN_ADVICE, details)
    if hits:
        named = "; ".join(f"{_listed(v)} ({code})" for code, v in hits.items())
        count = len({i for v in hits.values() for i in v})
        return (f"The batch holds {count} sample(s) the data inspection flagged: {named}.",
                _DATA_ADVICE, details)
    if not checked:
        return ("No data inspection ran in this fit (add `DataInspection`) to tell abnormal "
                "samples from a model problem.", _UNKNOWN_ADVICE, details)
    return ("None of its samples was flagged by the data inspection (non-finite, unreadable or "
            "constant inputs, conflicting or out-of-range labels).", _MODEL_ADVICE, details)


def _listed(indices: list[int], most: int = 8) -> str:
    shown = ", ".join(map(str, indices[:most]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > most else "")

"""Reading a dataset by index for :mod:`lightning_diag.checks.data.inspect`, and turning what was
found into findings.

A :class:`SplitScan` keeps, per inspected sample, only a 16-byte hash, a small reduced
representation and the label, so memory grows as ``N * (dim + a few)`` numbers whatever the input
size; inputs are re-read by index when a full one is needed (verification, image grids).

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lightning_diag.checks.data.config import InspectionConfig
    >>> scan = SplitScan.read(TensorDataset(torch.rand(4, 3), torch.arange(4)), "train",
    ...                       InspectionConfig())
    >>> scan.shape, scan.labels
    ((3,), [0, 1, 2, 3])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from lightning_diag.batch import (
    UserCodeError,
    call_user,
    default_batch_to_input,
    default_batch_to_target,
)
from lightning_diag.checks.data.at_once import read_at_once
from lightning_diag.checks.data.config import InspectionConfig
from lightning_diag.findings import Finding
from lightning_diag.functional.data import (
    class_counts,
    constant_mask,
    projection_matrix,
    reduce_samples,
    sample_hashes,
)
from lightning_diag.functional.tokens import (
    NUM_HASHES,
    distinct_counts,
    is_token_sequence,
    minhash,
    shingles,
)

__all__ = ["DataReport", "NotInspectable", "SplitScan", "as_tensor"]

_CHUNK = 1024  # samples read, hashed and reduced together
_INT_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_OTHER = object()  # a target that is not a class label (a float, a vector, ...)


def as_tensor(x: Any) -> torch.Tensor:
    """A sample's input as a CPU tensor (tensors, NumPy arrays, PIL images, numbers)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


class NotInspectable(ValueError):
    """A dataset the inspection cannot read: no ``len()``, or no numeric input in its first
    sample. The message says why and, for a sample, names its structure and the arguments that
    read it (``batch_to_input=`` / ``batch_to_target=``); the callback turns it into
    ``data.skipped``."""


def _structure(sample: Any) -> str:
    """A short description of a sample for messages: its type, and its keys for a dict."""
    if isinstance(sample, Mapping):
        return f"dicts with keys {sorted(map(str, sample))}"
    if isinstance(sample, (list, tuple)):
        return f"{type(sample).__name__}s of {[type(v).__name__ for v in sample]}"
    return f"{type(sample).__name__} objects"


def _label(target: Any) -> Any:
    """An int class label, None (no target), or ``_OTHER`` (regression or multi-label target)."""
    if target is None:
        return None
    if isinstance(target, torch.Tensor) and target.dim() == 0 and target.dtype in _INT_TYPES:
        return int(target)  # the common case, first
    if isinstance(target, (bool, np.bool_)):
        return _OTHER
    if isinstance(target, (int, np.integer)):
        return int(target)
    if isinstance(target, (torch.Tensor, np.ndarray)):
        t = as_tensor(target)
        if t.numel() == 1 and not t.dtype.is_floating_point and not t.dtype.is_complex \
                and t.dtype is not torch.bool:
            return int(t.reshape(()))
    return _OTHER


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _read_input(config: InspectionConfig, sample: Any) -> torch.Tensor:
    """The input of ``sample`` as a CPU tensor. Raises ValueError or TypeError for a structure
    the default reader does not know, UserCodeError when the user's ``batch_to_input`` fails."""
    fn = config.batch_to_input
    if fn is default_batch_to_input:  # our reader: a miss is a structure we do not know
        return as_tensor(fn(sample))
    return as_tensor(call_user("`batch_to_input`", fn, sample))


def _read_target(config: InspectionConfig, sample: Any) -> Any:
    fn = config.batch_to_target
    if fn is default_batch_to_target:  # never raises: None when there is no target
        return fn(sample)
    return call_user("`batch_to_target`", fn, sample)


@dataclass
class _Chunk:
    """What a block of samples gave, computed where they were read (here or in a loader worker):
    only hashes and reduced representations travel, never the inputs."""

    size: int
    labels: list[tuple[int, int]] = field(default_factory=list)  # (position, class label)
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # (index, why)
    non_finite: list[int] = field(default_factory=list)
    constant: list[int] = field(default_factory=list)
    other_shape: int = 0
    pos: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    reps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    hashes: list[bytes] = field(default_factory=list)
    ngrams: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    # where and what the user's `batch_to_input`/`batch_to_target` raised (an exception holding
    # another does not cross processes; these do)
    failed: tuple[str, Exception] | None = None


class _ChunkReader(TorchDataset):
    """Blocks of ``_CHUNK`` samples of ``dataset`` read by position from ``start`` on, each turned
    into a :class:`_Chunk`: a map-style dataset that a DataLoader's workers can read."""

    def __init__(self, dataset: Any, config: InspectionConfig, indices: list[int], start: int,
                 shape: tuple[int, ...], projection: torch.Tensor | None,
                 tokens: bool = False) -> None:
        self.dataset, self.config, self.indices = dataset, config, indices
        self.start, self.shape, self.projection = start, shape, projection
        self.tokens = tokens

    def __len__(self) -> int:
        return -(-(len(self.indices) - self.start) // _CHUNK)

    def __getitem__(self, c: int) -> _Chunk:
        lo = self.start + c * _CHUNK
        hi = min(lo + _CHUNK, len(self.indices))
        chunk = _Chunk(size=hi - lo)
        at_once = None if self.tokens else read_at_once(self.dataset, self.config,
                                                        self.indices[lo:hi], self.shape)
        if at_once is not None:
            self._read_tensors(chunk, *at_once, lo)
            return chunk
        same: list[tuple[int, torch.Tensor]] = []
        for pos in range(lo, hi):
            idx = self.indices[pos]
            try:
                sample = call_user("`__getitem__`", self.dataset.__getitem__, idx)
            except UserCodeError as err:  # a corrupt file: named in data.unreadable, read on
                chunk.unreadable.append((idx, _describe(err.error)))
                continue
            try:
                x = _read_input(self.config, sample)
                label = _label(_read_target(self.config, sample))
            except (ValueError, TypeError) as err:  # what the default reader cannot read
                chunk.unreadable.append((idx, f"input not readable, {_describe(err)}"))
                continue
            except UserCodeError as err:  # the user's reader: raised in the main process
                chunk.failed = (err.where, err.error)
                return chunk
            if isinstance(label, int):
                chunk.labels.append((pos, label))
            if self.tokens and is_token_sequence(x) and len(x):  # sequences of any length
                same.append((pos, x))
                continue
            if tuple(x.shape) != self.shape:
                chunk.other_shape += 1
                if not bool(torch.isfinite(x.float()).all()):
                    chunk.non_finite.append(idx)
                continue
            same.append((pos, x))
        if same and self.tokens:
            self._compare_tokens(chunk, same)
        elif same:
            self._compare_form(chunk, torch.tensor([p for p, _ in same]),
                               torch.stack([t for _, t in same]))
        return chunk

    def _read_tensors(self, chunk: _Chunk, x: torch.Tensor, y: torch.Tensor | None,
                      lo: int) -> None:
        """Positions ``lo`` on, read at once (:func:`read_at_once`): the labels and
        comparisons the loop of :meth:`__getitem__` makes one sample at a time."""
        if y is not None:
            labels = (y.tolist() if y.dim() == 1 and y.dtype in _INT_TYPES
                      else [_label(t) for t in y])
            chunk.labels = [(lo + k, label) for k, label in enumerate(labels)
                            if isinstance(label, int)]
        self._compare_form(chunk, torch.arange(lo, lo + len(x)), x)

    def _compare_form(self, chunk: _Chunk, pos: torch.Tensor, x: torch.Tensor) -> None:
        """Hashes and reduced representations of the finite samples (``x``, stacked, at
        positions ``pos``); the others named."""
        x = x.reshape(len(x), -1).float()
        finite = torch.isfinite(x).all(dim=1)
        chunk.non_finite.extend(self.indices[p] for p in pos[~finite].tolist())
        pos, x = pos[finite], x[finite]
        chunk.constant.extend(self.indices[p] for p in pos[constant_mask(x)].tolist())
        chunk.pos, chunk.hashes = pos, sample_hashes(x)
        chunk.reps = reduce_samples(x, self.projection)


    def _compare_tokens(self, chunk: _Chunk, same: list[tuple[int, torch.Tensor]]) -> None:
        """Hashes of the values and MinHash signatures of the token n-grams (never the values
        as intensities); a sequence of one repeated token (all padding) is constant."""
        lengths = torch.tensor([len(t) for _, t in same])
        padded = torch.zeros(len(same), int(lengths.max()), dtype=torch.int64)
        for row, (_, t) in enumerate(same):
            padded[row, : len(t)] = t
        chunk.pos = torch.tensor([p for p, _ in same])
        chunk.hashes = [_value_hash(t) for _, t in same]
        chunk.constant.extend(self.indices[p] for p, t in same if bool(t.min() == t.max()))
        grams = shingles(padded, lengths=lengths)
        chunk.reps = minhash(grams, seed=self.config.seed)
        chunk.ngrams = distinct_counts(grams)


def _value_hash(x: torch.Tensor) -> bytes:
    """A 16-byte digest of one sequence's values (as int64: the dtype does not matter)."""
    return sample_hashes(x.to(torch.int64)[None])[0]


def _as_is(chunk: _Chunk) -> _Chunk:
    """The loader's collate function: a chunk is already one batch."""
    return chunk


@dataclass
class SplitScan:
    """What was read from one dataset: per-position hashes, representations, labels, problems."""

    name: str
    dataset: Any
    config: InspectionConfig
    indices: torch.Tensor
    hashes: list[bytes | None] = field(default_factory=list)
    reps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    valid: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    labels: list[Any] = field(default_factory=list)
    label_kind: str = "none"
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    non_finite: list[int] = field(default_factory=list)
    constant: list[int] = field(default_factory=list)
    other_shape: int = 0
    shape: tuple[int, ...] | None = None
    size: int = 0
    projection: torch.Tensor | None = None
    #: Whether the inputs are token ids (:func:`~lightning_diag.functional.tokens.
    #: is_token_sequence`), compared as sequences: ``reps`` then holds MinHash signatures and
    #: ``ngrams`` each sequence's number of distinct n-grams.
    tokens: bool = False
    ngrams: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def features(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    @classmethod
    def read(cls, dataset: Any, name: str, config: InspectionConfig) -> SplitScan:
        """Read every sample of ``dataset`` (or a seeded subset of ``max_samples``) by index."""
        try:
            size = len(dataset)
        except TypeError as err:
            raise NotInspectable(f"The {name} dataset ({type(dataset).__name__}) has no len(): "
                                 "data inspection needs a map-style dataset.") from err
        indices = torch.arange(size)
        if size > config.max_samples:
            gen = torch.Generator().manual_seed(config.seed)
            indices = torch.randperm(size, generator=gen)[: config.max_samples].sort().values
        scan = cls(name, dataset, config, indices, hashes=[None] * len(indices),
                   labels=[None] * len(indices), size=size)
        scan._read_all()
        return scan

    def _read_all(self) -> None:
        from tqdm.auto import tqdm

        show = self.config.progress and len(self.indices) >= self.config.progress_min
        bar = tqdm(total=len(self.indices), desc=f"inspect {self.name}", disable=not show,
                   leave=False)
        first = self._read_first()  # here: it decides the shape and what the targets are
        bar.update(first)
        if self.shape is None:
            bar.close()
            return
        reader = _ChunkReader(self.dataset, self.config, self.indices.tolist(), first,
                              self.shape, self.projection, self.tokens)
        chunks: Iterable[_Chunk] = (reader[c] for c in range(len(reader)))
        if self.config.num_workers > 0 and len(reader) > 1:  # decoding in parallel processes
            chunks = DataLoader(reader, batch_size=None, num_workers=self.config.num_workers,
                                collate_fn=_as_is)  # type: ignore[arg-type]
        for chunk in chunks:
            self._merge(chunk)
            bar.update(chunk.size)
        bar.close()

    def _read_first(self) -> int:
        """Read up to the first sample with an input; returns its position (``len`` if none)."""
        for pos, idx in enumerate(self.indices.tolist()):
            try:
                sample = call_user("`__getitem__`", self.dataset.__getitem__, idx)
            except UserCodeError as err:  # a corrupt file: named in data.unreadable, read on
                self.unreadable.append((idx, _describe(err.error)))
                continue
            x = self._input(idx, sample)
            if x is None:
                continue
            self._take_label(pos, self._target(sample))
            self.tokens = is_token_sequence(x) and len(x) > 0
            self._start(tuple(x.shape))
            return pos
        return len(self.indices)

    def _input(self, idx: int, sample: Any) -> torch.Tensor | None:
        """The input of the first readable sample as a tensor: :class:`NotInspectable` when it
        holds none the readers find."""
        try:
            return _read_input(self.config, sample)
        # what a structure we cannot read raises: ValueError (no known key, a ragged list),
        # TypeError (a string, a nested dict)
        except (ValueError, TypeError) as err:
            raise NotInspectable(
                f"cannot read a numeric input from the {self.name} samples, which are "
                f"{_structure(sample)} ({type(err).__name__}: {err}). Pass "
                "`batch_to_input=` (a function from one sample to its input tensor) and "
                "`batch_to_target=` (to its label) to DataInspection or inspect_dataset."
            ) from err

    def _target(self, sample: Any) -> Any:
        return _read_target(self.config, sample)

    def _take_label(self, pos: int, target: Any) -> None:
        label = _label(target)
        if self.shape is None:  # the first readable sample decides what the targets are
            self.label_kind = "none" if label is None else "other" if label is _OTHER else "class"
        if self.label_kind == "class" and isinstance(label, int):
            self.labels[pos] = label

    def _start(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.valid = torch.zeros(len(self.indices), dtype=torch.bool)
        if self.tokens:
            self.reps = torch.zeros(len(self.indices), NUM_HASHES, dtype=torch.int32)
            self.ngrams = torch.zeros(len(self.indices), dtype=torch.int64)
            return
        self.projection = projection_matrix(self.features, self.config.dim, self.config.seed)
        width = self.features if self.projection is None else self.config.dim
        self.reps = torch.zeros(len(self.indices), width)

    def _merge(self, chunk: _Chunk) -> None:
        if chunk.failed is not None:
            raise UserCodeError(*chunk.failed)
        if self.label_kind == "class":
            for pos, label in chunk.labels:
                self.labels[pos] = label
        self.unreadable.extend(chunk.unreadable)
        self.non_finite.extend(chunk.non_finite)
        self.constant.extend(chunk.constant)
        self.other_shape += chunk.other_shape
        for p, key in zip(chunk.pos.tolist(), chunk.hashes, strict=True):
            self.hashes[p] = key
        self.reps[chunk.pos] = chunk.reps
        if self.tokens:
            self.ngrams[chunk.pos] = chunk.ngrams
        self.valid[chunk.pos] = True

    def keys(self) -> list[Any]:
        """Hashes by position; excluded positions get a unique key so they never group."""
        return [key if key is not None else ("excluded", p) for p, key in enumerate(self.hashes)]

    def valid_reps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations of the comparable samples and their positions."""
        pos = self.valid.nonzero().flatten()
        if len(pos) == len(self.reps):  # the usual case: no copy of a large array
            return self.reps, pos
        return self.reps[pos], pos

    def to_indices(self, positions: list[int]) -> list[int]:
        return [int(self.indices[p]) for p in positions]

    def exclude_all(self) -> None:
        self.valid[:] = False
        self.hashes = [None] * len(self.hashes)

    def full_input(self, pos: int) -> torch.Tensor:
        """The flattened float input at ``pos``, read again from the dataset."""
        return self.sample(int(self.indices[pos])).reshape(-1).float()

    def sample(self, index: int) -> torch.Tensor:
        """The input at dataset ``index``, read again from the dataset."""
        return as_tensor(self.config.batch_to_input(self.dataset[index]))

    def label_tensor(self) -> torch.Tensor:
        return torch.tensor([v for v in self.labels if v is not None], dtype=torch.long)


@dataclass
class DataReport:
    """Everything one inspection found; ``findings`` is what :func:`inspect_dataset` returns."""

    train: SplitScan
    val: SplitScan | None
    config: InspectionConfig
    exact: dict[str, list[list[int]]] = field(default_factory=dict)
    near: dict[str, list[list[int]]] = field(default_factory=dict)
    leaks: dict[str, Any] = field(default_factory=lambda: {"pairs": [], "exact": 0})
    #: Per split, why near duplicates were not searched ("" when they were).
    near_skipped: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def scans(self) -> list[SplitScan]:
        return [self.train] if self.val is None else [self.train, self.val]

    @property
    def num_classes(self) -> int | None:
        """``num_classes`` if given, else the model's output width if known, else the largest
        label of every split plus one (so that a class only validation holds is in range)."""
        if self.config.num_classes is not None:
            return self.config.num_classes
        if self.config.output_classes is not None:
            return self.config.output_classes
        tops = [int(t.max()) for s in self.scans() if s.label_kind == "class"
                and len(t := s.label_tensor())]
        top = max(tops, default=-1)
        return top + 1 if top >= 0 else None

    @property
    def labelled_classes(self) -> int:
        """The class count that the training labels alone give: ``num_classes`` when given,
        else the largest training label plus one (0 without one). A class below it that no
        split holds is a gap in the labels (``data.class_imbalance``); one above it only the
        model's output width allows, and that says nothing about the data."""
        if self.config.num_classes is not None:
            return self.config.num_classes
        labels = self.train.label_tensor() if self.train.label_kind == "class" else None
        return int(labels.max()) + 1 if labels is not None and len(labels) else 0

    @property
    def class_source(self) -> str:
        """Where :attr:`num_classes` comes from, in words."""
        if self.config.num_classes is not None:
            return "given"
        if self.config.output_classes is not None:
            return self.config.output_source
        return ("inferred from the labels of both splits" if self.val is not None
                else "inferred from the labels")

    def counts(self, scan: SplitScan) -> torch.Tensor | None:
        """Samples per class of ``scan`` (None without class labels)."""
        if scan.label_kind != "class" or self.num_classes is None:
            return None
        return class_counts(scan.label_tensor(), self.num_classes)

    def summary(self) -> dict[str, Any]:
        """Every count of the inspection, per set, for the summary finding and TensorBoard."""
        out: dict[str, Any] = {}
        for scan in self.scans():
            counts = self.counts(scan)
            out[scan.name] = {
                "samples": scan.size, "inspected": len(scan.indices),
                "unreadable": len(scan.unreadable), "non_finite": len(scan.non_finite),
                "constant": len(scan.constant), "other_shape": scan.other_shape,
                "exact_duplicate_groups": len(self.exact[scan.name]),
                "near_duplicate_groups": len(self.near[scan.name]),
                "class_counts": None if counts is None else counts.tolist(),
            }
        if self.val is not None:
            out["leak_pairs"] = len(self.leaks["pairs"])
        return out


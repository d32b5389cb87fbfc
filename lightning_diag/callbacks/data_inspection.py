"""DataInspection: look at the data first (step 1 of the recipe), at fit start.

Runs :func:`lightning_diag.checks.data.inspect.inspect_dataset` on the datasets behind the trainer's
training and validation dataloaders, reading samples by index (the user's dataloaders are never
iterated, so the batch order does not change), and draws what it found in TensorBoard under
``1_data/...``.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.data_inspection import DataInspection
    >>> from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
    >>> check = DataInspection()
    >>> trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, callbacks=[check],
    ...                      enable_progress_bar=False, enable_model_summary=False,
    ...                      enable_checkpointing=False)
    >>> trainer.fit(DigitsClassifier(arch="mlp"), datamodule=DigitsDataModule())
    >>> [f.code for f in check.findings if f.severity.value != "info"]
    []
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_diag.base import SHARDED_STRATEGIES, FitStartCheck
from lightning_diag.batch import (
    BatchFn,
    UserCodeError,
    call_user,
    default_batch_to_input,
    default_batch_to_target,
)
from lightning_diag.checks.data.inspect import InspectionConfig, run_inspection
from lightning_diag.checks.data.scan import DataReport, NotInspectable, SplitScan
from lightning_diag.checks.label_use import output_classes
from lightning_diag.findings import Finding, Severity
from lightning_diag.isolation import first_loader, preserved_rng, train_dataloader_of
from lightning_diag.tensorboard.figures import class_counts_figure
from lightning_diag.tensorboard.grids import Cell, annotated_grid
from lightning_diag.tensorboard.tags import DATA_CLASS_COUNTS, DATA_SUMMARY, data_grid
from lightning_diag.tensorboard.writer import (
    log_figure,
    log_image,
    tensorboard_writer,
)
from lightning_diag.validation import check_int

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["DataInspection"]

#: Classes in the per-class grid; a note counts those left out.
_MAX_CLASSES = 100
#: Samples per row of the grids of flagged samples (and per duplicate group): their captions
#: must fit TensorBoard's card side by side.
_PER_ROW = 4


class DataInspection(FitStartCheck):
    """Inspect the training and validation data once, before the first training step.

    Finds exact and near duplicates, train/validation leaks, unreadable, non-finite and blank
    samples, out-of-range labels and class imbalance (codes ``data.*``, see
    ``docs/callbacks/data_inspection.md``). Runs on rank zero; other ranks do nothing.

    Args:
        num_classes: Number of classes. When None: the width ``C`` of the model's output when
            its ``training_step`` scores ``(N, C)`` classes for ``(N,)`` integer targets (run
            once on a copy, on the first training batch, its output captured), else the
            largest label of the training and validation sets plus one.
        max_samples: Larger sets are inspected on a seeded random subset of this size.
        near_threshold: Centred-cosine similarity above which two inputs are near duplicates.
        token_threshold: For token sequences (1-D integer inputs such as ``input_ids``,
            compared as sequences, never as intensities): the Jaccard similarity of their
            3-token n-gram sets above which two are near duplicates.
        imbalance_ratio: Warn when the commonest class has this many times the rarest's samples.
        batch_to_input: Maps a dataset sample to its input (default: ``sample[0]``, or the
            first of ``lightning_diag.batch.INPUT_KEYS`` in a dict: ``pixel_values``,
            ``input_ids``, ``image``...). A sample it cannot read gives ``data.skipped``.
        batch_to_target: Maps a dataset sample to its target (default: ``sample[1]``, or the
            first of ``TARGET_KEYS``: ``labels``, ``label``, ``y``...; else no target).
        max_images: Samples per class in the per-class grid (one labelled row per class, up to
            100 classes, a note counting the rest), and rows (groups, pairs, 4 flagged samples)
            in the other grids, each captioned with its split, dataset index and label.
        seed: Seed of the subset and of the random projection (global RNG untouched).
        num_threads: torch threads during the inspection (restored after); None keeps them.
        num_workers: Processes reading the samples (a DataLoader's workers, for datasets that
            decode files); None: as many as the training dataloader has.
        strict: Raise :class:`~lightning_diag.findings.DiagnosticError` on a FAIL finding.
    """

    slug = "data"
    # reads the dataset (and, off sharded strategies, one step of a copy for the output width):
    # works whatever the strategy
    copies_module = False

    def __init__(
        self, num_classes: int | None = None, max_samples: int = 100_000,
        near_threshold: float = 0.997, imbalance_ratio: float = 10.0,
        batch_to_input: BatchFn = default_batch_to_input,
        batch_to_target: BatchFn = default_batch_to_target, max_images: int = 8, seed: int = 0,
        num_threads: int | None = 1, num_workers: int | None = None,
        token_threshold: float = 0.8, strict: bool = False,
    ) -> None:
        super().__init__(strict=strict)
        self.config = InspectionConfig(
            num_classes=num_classes, max_samples=max_samples, near_threshold=near_threshold,
            token_threshold=token_threshold, imbalance_ratio=imbalance_ratio, seed=seed,
            batch_to_input=batch_to_input, batch_to_target=batch_to_target,
            num_threads=num_threads,
        )
        check_int("num_workers", num_workers, low=0, optional=True)
        self.num_workers = num_workers
        check_int("max_images", max_images)
        self.max_images = max_images
        self.report: DataReport | None = None

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(
            num_classes=c.num_classes, max_samples=c.max_samples, near_threshold=c.near_threshold,
            token_threshold=c.token_threshold,
            imbalance_ratio=c.imbalance_ratio, seed=c.seed, batch_to_input=c.batch_to_input,
            batch_to_target=c.batch_to_target)

    @override
    def run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        # the data is read once, on rank 0; every rank reports rank 0's findings
        found = self._inspect(trainer) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)
        return found or []

    def _output_classes(self, trainer: pl.Trainer) -> tuple[int, str] | None:
        """The class count the model's output gives the first training batch's labels, from
        one step of a copy (:func:`lightning_diag.checks.label_use.output_classes`: the width
        ``C`` of ``(N, C)`` scores for ``(N,)`` integer labels the loss reads, 2 for one value
        per sample scored as a binary classifier), and how it was read; else None: the class
        count then comes from the labels of every split. A step that fails on the copy before
        its output leaves it to the labels too (the side experiments report such a failure)."""
        module = trainer.lightning_module
        if _sharded(trainer):
            return None
        try:  # a sample that fails to read is the inspection's to report (data.unreadable)
            batches, skipped = self.fit_start_batches(trainer, module, 1)
        except UserCodeError:
            return None
        if skipped:
            return None
        batch = batches[0]
        try:
            target = call_user("`batch_to_target`", self.config.batch_to_target, batch)
            return output_classes(module, batch, target)
        # the user's reader failing on a batch, or a module deepcopy refuses
        except (UserCodeError, RuntimeError):
            return None

    def _inspect(self, trainer: pl.Trainer) -> list[Finding]:
        with preserved_rng():  # the user's dataloader hooks and `__getitem__` may draw numbers
            try:
                train_loader = train_dataloader_of(trainer)
                train = _map_dataset(train_loader)
            except ValueError as err:
                return [self.skipped(trainer, str(err))]
            if _is_empty(train):
                return [self.skipped(trainer, "the training dataset is empty (0 samples).",
                                     advice="Give the Trainer training data.")]
            workers = self.num_workers
            if workers is None:  # the user's loader says how many processes decoding needs
                workers = getattr(train_loader, "num_workers", 0)
            read = None if self.config.num_classes is not None else self._output_classes(trainer)
            config = dataclasses.replace(
                self.config, progress=trainer.progress_bar_callback is not None,
                num_workers=workers, output_classes=None if read is None else read[0],
                output_source=self.config.output_source if read is None else read[1])

            def make(code: str, severity: Severity, message: str, **kw: Any) -> Finding:
                return self.finding(trainer, code, severity, message, **kw)

            try:
                self.report = run_inspection(train, _val_dataset(trainer), config, make)
            except NotInspectable as err:  # a structure the readers do not know: say so
                return [self.skipped(trainer, str(err))]
            writer = tensorboard_writer(trainer)
            if self.require_tensorboard(trainer, "data inspection images and counts") and writer:
                _TensorBoardView(trainer, writer, self.report, self.max_images).log()
        return self.report.findings


def _sharded(trainer: pl.Trainer) -> bool:
    return bool({c.__name__ for c in type(trainer.strategy).__mro__} & set(SHARDED_STRATEGIES))


def _map_dataset(loader: Any) -> Any:
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset):
        raise ValueError("data inspection reads samples by index and needs a map-style dataset "
                         f"behind the dataloader, got {type(dataset).__name__}.")
    return dataset


def _is_empty(dataset: Any) -> bool:
    try:
        return len(dataset) == 0
    except TypeError:  # a map-style dataset without __len__
        return False


def _val_dataset(trainer: pl.Trainer) -> Any:
    """The validation dataset, from the trainer or its data source (hook called, not iterated)."""
    loader: Any = getattr(trainer, "val_dataloaders", None)
    if loader is None:
        loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
        source = getattr(loop, "_data_source", None)
        if source is not None and source.instance is not None and source.is_defined():
            loader = source.dataloader()
    loader = first_loader(loader)
    if not isinstance(loader, DataLoader):
        return None
    try:
        return _map_dataset(loader)
    except ValueError:
        return None


def _as_image(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as an ``(H, W)`` or ``(C, H, W)`` image, a square vector reshaped; else None."""
    if x.dim() == 2 or (x.dim() == 3 and x.shape[0] in (1, 3)):
        return x
    side = math.isqrt(x.numel())
    return x.reshape(side, side) if x.dim() == 1 and side > 1 and side * side == x.numel() else None


class _TensorBoardView:
    """The summary text, class counts and image grids of one inspection, under ``1_data/``."""

    def __init__(
        self, trainer: pl.Trainer, writer: SummaryWriter, report: DataReport, rows: int
    ) -> None:
        self.trainer, self.writer, self.report, self.rows = trainer, writer, report, rows
        self.step = trainer.global_step

    def log(self) -> None:
        self._summary()
        self._class_counts()
        imageable = (self.report.train.shape is not None and not self.report.train.tokens
                     and _as_image(torch.zeros(self.report.train.shape)) is not None)
        if not imageable:
            return
        self._per_class()
        for scan in self.report.scans():
            self._groups(scan, "exact_duplicates", self.report.exact[scan.name], "identical")
            self._groups(scan, "near_duplicates", self.report.near[scan.name], "near-identical")
            self._samples(scan, "non_finite", scan.non_finite, "samples holding NaN or Inf")
            self._samples(scan, "constant", scan.constant, "constant (blank) inputs")
        self._leaks()

    def _summary(self) -> None:
        lines = ["| set | count | value |", "|---|---|---|"]
        for name, counts in self.report.summary().items():
            if not isinstance(counts, dict):
                lines.append(f"| both | {name} | {counts} |")
                continue
            lines += [f"| {name} | {key} | {value} |" for key, value in counts.items()]
        self.writer.add_text(DATA_SUMMARY, "\n".join(lines), global_step=self.step)

    def _class_counts(self) -> None:
        """The labels of each split as bars, one per class (a histogram of one step would head
        the Histograms dashboard and draw an empty chart in Distributions)."""
        known = {s.name: c for s in self.report.scans() if (c := self.report.counts(s)) is not None}
        if not known:
            return
        figure = class_counts_figure({name: c.tolist() for name, c in known.items()})
        log_figure(self.trainer, DATA_CLASS_COUNTS, figure, self.step)

    def _per_class(self) -> None:
        """One row per class, labelled, all classes up to ``_MAX_CLASSES`` (a note says the rest);
        a class without samples keeps its empty row."""
        scan, groups = self.report.train, dict[int, list[int]]()
        for index, label in zip(scan.indices.tolist(), scan.labels, strict=True):
            if isinstance(label, int) and len(groups.setdefault(label, [])) < self.rows:
                groups[label].append(index)
        if not groups:
            return
        classes = sorted(set(range(self.report.num_classes or 0)) | set(groups))
        shown = classes[:_MAX_CLASSES]
        notes = [f"classes {classes[len(shown)]} to {classes[-1]} not shown "
                 f"({len(classes) - len(shown)} of {len(classes)})"] if classes[len(shown):] else []
        if empty := [c for c in shown if c not in groups]:
            notes.append("no sample of class " + ", ".join(map(str, empty)))
        self._add(data_grid("samples_per_class"), [[self._cell(scan, i) for i in groups.get(c, [])]
                                                   for c in shown],
                  f"training samples per class: one row per class, up to {self.rows} samples",
                  notes, [f"class {c}" for c in shown])

    def _groups(self, scan: SplitScan, name: str, groups: list[list[int]], what: str) -> None:
        """Groups of duplicates, one per row, those whose labels differ first and in red."""
        if not groups:
            return
        labels = _labels(scan)

        def conflict(group: list[int]) -> bool:
            return len({labels[i] for i in group if isinstance(labels[i], int)}) > 1

        ordered = sorted(groups, key=lambda g: not conflict(g))  # stable: conflicts first
        shown = ordered[: self.rows]
        notes = [f"showing {len(shown)} of {len(groups)} groups"] if len(shown) < len(
            groups) else []
        if any(len(g) > _PER_ROW for g in shown):
            notes.append(f"at most {_PER_ROW} samples of each group")
        if conflicts := sum(map(conflict, groups)):
            notes.append(f"red: labels differ within the group ({conflicts} of {len(groups)} "
                         "groups)")
        self._add(data_grid(name, scan.name),
                  [[self._cell(scan, i, labels[i], conflict(g)) for i in g[:_PER_ROW]]
                   for g in shown],
                  f"{len(groups)} groups of {what} inputs in {scan.name}", notes)

    def _samples(self, scan: SplitScan, name: str, indices: list[int], what: str) -> None:
        if not indices:
            return
        labels, shown = _labels(scan), indices[: self.rows * _PER_ROW]
        notes = [f"showing {len(shown)} of {len(indices)}"] if len(shown) < len(indices) else []
        cells = [self._cell(scan, i, labels[i]) for i in shown]
        self._add(data_grid(name, scan.name),
                  [cells[k:k + _PER_ROW] for k in range(0, len(cells), _PER_ROW)],
                  f"{len(indices)} {what} in {scan.name}", notes)

    def _leaks(self) -> None:
        """Each training sample next to the validation sample repeating it, red if the labels
        differ."""
        train, val, pairs = self.report.train, self.report.val, self.report.leaks["pairs"]
        if val is None or not pairs:
            return
        left, right = _labels(train), _labels(val)

        def differ(pair: tuple[int, int]) -> bool:
            a, b = left[pair[0]], right[pair[1]]
            return isinstance(a, int) and isinstance(b, int) and a != b

        shown = sorted(pairs, key=lambda p: not differ(p))[: self.rows]
        notes = [f"showing {len(shown)} of {len(pairs)} pairs"] if len(shown) < len(pairs) else []
        if differing := sum(map(differ, pairs)):
            notes.append(f"red: the two labels differ ({differing} of {len(pairs)} pairs)")
        self._add(data_grid("leakage_train_vs_validation"),
                  [[self._cell(train, i, left[i], differ((i, j))),
                    self._cell(val, j, right[j], differ((i, j)))] for i, j in shown],
                  f"{len(pairs)} validation samples repeating training ones: train left, "
                  "validation right", notes)

    @staticmethod
    def _cell(scan: SplitScan, index: int, label: Any = None, alert: bool = False) -> Cell | None:
        """Sample ``index`` of ``scan`` captioned with its index and label (the grid's title
        names the split: short captions let the groups stand side by side); None when it is
        no image."""
        image = _as_image(scan.sample(index))
        if image is None:
            return None
        where = f"#{index}"
        caption = (where, f"label {label}") if isinstance(label, int) else (where,)
        return Cell(image, caption if label is not None else (), alert)

    def _add(self, tag: str, rows: list[list[Cell | None]], title: str, notes: list[str],
             row_labels: list[str] | None = None) -> None:
        first = next((c for row in rows for c in row if c is not None), None)
        if first is None:
            return
        # one grid holds one image size: other shapes (a dataset of mixed sizes) are left out
        same = [[c for c in row if c is not None and c.image.shape == first.image.shape]
                for row in rows]
        if row_labels is None:  # unlabelled rows emptied by the filter are dropped
            same = [row for row in same if row]
        image = annotated_grid(same, title, row_labels or (), notes)
        log_image(self.trainer, tag, image, self.step)


def _labels(scan: SplitScan) -> dict[int, Any]:
    """Dataset index -> label (an int, None, or a marker for a target that is no class)."""
    return dict(zip(scan.indices.tolist(), scan.labels, strict=True))

"""DataInspection: look at the data first (step 1 of the recipe), at fit start.

Runs :func:`lightning_diag.checks.data.inspect.inspect_dataset` on the datasets behind the trainer's
training and validation dataloaders, reading samples by index (the user's dataloaders are never
iterated, so the batch order does not change), and draws what it found in TensorBoard under
``diag/data/...``.

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

from lightning_diag.base import FitStartCheck
from lightning_diag.batch import BatchFn, default_batch_to_input, default_batch_to_target
from lightning_diag.checks.data.inspect import InspectionConfig, run_inspection
from lightning_diag.checks.data.scan import DataReport, NotInspectable, SplitScan
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.data import image_grid
from lightning_diag.isolation import first_loader, preserved_rng, train_dataloader_of
from lightning_diag.tensorboard.tags import DATA_CLASS_COUNTS, DATA_SUMMARY, data_grid, data_labels
from lightning_diag.tensorboard.writer import log_figure, log_histogram_counts, tensorboard_writer
from lightning_diag.validation import check_int

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["DataInspection"]


class DataInspection(FitStartCheck):
    """Inspect the training and validation data once, before the first training step.

    Finds exact and near duplicates, train/validation leaks, unreadable, non-finite and blank
    samples, out-of-range labels and class imbalance (codes ``data.*``, see
    ``docs/callbacks/data_inspection.md``). Runs on rank zero; other ranks do nothing.

    Args:
        num_classes: Number of classes; inferred as ``max(train label) + 1`` when None.
        max_samples: Larger sets are inspected on a seeded random subset of this size.
        near_threshold: Centred-cosine similarity above which two inputs are near duplicates.
        imbalance_ratio: Warn when the commonest class has this many times the rarest's samples.
        batch_to_input: Maps a dataset sample to its input (default: ``sample[0]``, or the
            first of ``lightning_diag.batch.INPUT_KEYS`` in a dict: ``pixel_values``,
            ``input_ids``, ``image``...). A sample it cannot read gives ``data.skipped``.
        batch_to_target: Maps a dataset sample to its target (default: ``sample[1]``, or the
            first of ``TARGET_KEYS``: ``labels``, ``label``, ``y``...; else no target).
        max_images: Rows in each TensorBoard image grid (samples per class, flagged samples).
        seed: Seed of the subset and of the random projection (global RNG untouched).
        num_threads: torch threads during the inspection (restored after); None keeps them.
        strict: Raise :class:`~lightning_diag.findings.DiagnosticError` on a FAIL finding.
    """

    slug = "data"
    copies_module = False  # reads the dataset only; works whatever the strategy

    def __init__(
        self, num_classes: int | None = None, max_samples: int = 100_000,
        near_threshold: float = 0.997, imbalance_ratio: float = 10.0,
        batch_to_input: BatchFn = default_batch_to_input,
        batch_to_target: BatchFn = default_batch_to_target, max_images: int = 8, seed: int = 0,
        num_threads: int | None = 1, strict: bool = False,
    ) -> None:
        super().__init__(strict=strict)
        self.config = InspectionConfig(
            num_classes=num_classes, max_samples=max_samples, near_threshold=near_threshold,
            imbalance_ratio=imbalance_ratio, seed=seed, batch_to_input=batch_to_input,
            batch_to_target=batch_to_target, num_threads=num_threads,
        )
        check_int("max_images", max_images)
        self.max_images = max_images
        self.report: DataReport | None = None

    @property
    @override
    def state_key(self) -> str:
        c = self.config
        return self._generate_state_key(
            num_classes=c.num_classes, max_samples=c.max_samples, near_threshold=c.near_threshold,
            imbalance_ratio=c.imbalance_ratio, seed=c.seed, batch_to_input=c.batch_to_input,
            batch_to_target=c.batch_to_target)

    @override
    def _skip_reason(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        reason = super()._skip_reason(trainer, pl_module)
        # the inspection reads no loss, so manual optimization is no reason to skip it
        return "" if reason.startswith("manual optimization") else reason

    @override
    def run_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Finding]:
        # the data is read once, on rank 0; every rank reports rank 0's findings
        found = self._inspect(trainer) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)
        return found or []

    def _inspect(self, trainer: pl.Trainer) -> list[Finding]:
        with preserved_rng():  # the user's dataloader hooks and `__getitem__` may draw numbers
            try:
                train = _map_dataset(train_dataloader_of(trainer))
            except ValueError as err:
                return [self.skipped(trainer, str(err))]
            if _is_empty(train):
                return [self.skipped(trainer, "the training dataset is empty (0 samples).",
                                     advice="Give the Trainer training data.")]
            config = dataclasses.replace(
                self.config, progress=trainer.progress_bar_callback is not None)

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
    """The summary text, class counts and image grids of one inspection, under ``diag/data/``."""

    def __init__(
        self, trainer: pl.Trainer, writer: SummaryWriter, report: DataReport, rows: int
    ) -> None:
        self.trainer, self.writer, self.report, self.rows = trainer, writer, report, rows
        self.step = trainer.global_step

    def log(self) -> None:
        self._summary()
        self._class_counts()
        imageable = self.report.train.shape is not None and _as_image(
            torch.zeros(self.report.train.shape)) is not None
        if not imageable:
            return
        train, val = self.report.train, self.report.val
        self._grid(data_grid("samples_per_class"), train, self._per_class())
        for scan in self.report.scans():
            self._grid(data_grid("exact_duplicates", scan.name), scan,
                       [g[:4] for g in self.report.exact[scan.name]])
            self._grid(data_grid("near_duplicates", scan.name), scan,
                       [g[:4] for g in self.report.near[scan.name]])
            self._grid(data_grid("non_finite", scan.name), scan, _rows_of(scan.non_finite))
            self._grid(data_grid("constant", scan.name), scan, _rows_of(scan.constant))
        if val is not None and self.report.leaks["pairs"]:
            pairs = self.report.leaks["pairs"][: self.rows]
            cells = [[train.sample(i), val.sample(j)] for i, j in pairs]
            self._add_image(data_grid("leakage_train_vs_validation"), cells)

    def _summary(self) -> None:
        lines = ["| set | count | value |", "|---|---|---|"]
        for name, counts in self.report.summary().items():
            if not isinstance(counts, dict):
                lines.append(f"| both | {name} | {counts} |")
                continue
            lines += [f"| {name} | {key} | {value} |" for key, value in counts.items()]
        self.writer.add_text(DATA_SUMMARY, "\n".join(lines), global_step=self.step)

    def _class_counts(self) -> None:
        import matplotlib.pyplot as plt

        counts = {s.name: self.report.counts(s) for s in self.report.scans()}
        known = {name: c for name, c in counts.items() if c is not None}
        if not known:
            return
        fig, ax = plt.subplots(figsize=(6, 3))
        width = 0.8 / len(known)
        for k, (name, c) in enumerate(known.items()):
            ax.bar(torch.arange(len(c)).float() + k * width, c.tolist(), width, label=name)
            scan = self.report.train if name == "train" else self.report.val
            assert scan is not None
            labels = scan.label_tensor().float()
            log_histogram_counts(self.writer, data_labels(name), labels, self.step,
                                 bins=len(c))
        ax.set_xlabel("class")
        ax.set_ylabel("samples")
        ax.legend()
        log_figure(self.trainer, DATA_CLASS_COUNTS, fig, self.step)

    def _per_class(self) -> list[list[int]]:
        scan, groups = self.report.train, dict[int, list[int]]()
        for index, label in zip(scan.indices.tolist(), scan.labels, strict=True):
            if label is not None and len(groups.setdefault(label, [])) < self.rows:
                groups[label].append(index)
        return [groups[c] for c in sorted(groups)][:32]

    def _grid(self, tag: str, scan: SplitScan, rows: list[list[int]]) -> None:
        cells = [[scan.sample(i) for i in row] for row in rows[: self.rows] if row]
        self._add_image(tag, cells)

    def _add_image(self, tag: str, cells: list[list[torch.Tensor]]) -> None:
        images = [[_as_image(x) for x in row] for row in cells]
        first = next((x for row in images for x in row if x is not None), None)
        if first is None:
            return
        same = [[x for x in row if x is not None and x.shape == first.shape] for row in images]
        if any(same):
            # small images (8x8 digits) enlarged to about 32 pixels to be seen
            grid = image_grid([row for row in same if row], scale=max(1, 32 // first.shape[-1]))
            self.writer.add_image(tag, grid, global_step=self.step)


def _rows_of(indices: list[int], per_row: int = 8) -> list[list[int]]:
    return [indices[k:k + per_row] for k in range(0, len(indices), per_row)]

"""Where diagnostics write: the trainer's TensorBoard writer, if any, and its log directory.

Every artifact goes through these helpers so that a run without a TensorBoard logger
(no logger, CSVLogger, ...) degrades to scalars through the generic logger API and skips
images, text and histograms instead of crashing. Each write is charged to the run's byte budget
(:func:`lightning_diag.budget.budget_of`): past it, the helpers write nothing more.

The tags themselves are built and declared in :mod:`lightning_diag.tensorboard.tags`.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_diag.budget import budget_of
from lightning_diag.functional.monitors import histogram_edges
from lightning_diag.markdown import markdown_table

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "EventWorker",
    "SiblingRuns",
    "encode_png",
    "figure_to_array",
    "log_dir",
    "log_figure",
    "log_image",
    "log_png",
    "log_scalars",
    "log_scalars_elsewhere",
    "log_step_summary",
    "markdown_table",
    "merge_custom_scalars",
    "run_start",
    "sibling_start",
    "tensorboard_writer",
    "write_step_summary",
]


def tensorboard_writer(trainer: pl.Trainer) -> SummaryWriter | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger on rank zero, else None."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            return writer if isinstance(writer, SummaryWriter) else None
    return None


def log_dir(trainer: pl.Trainer) -> Path | None:
    """The run's log directory (where PNGs and saved batches go), or None without one."""
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None)
        if directory:
            return Path(directory)
    root = trainer.default_root_dir
    return Path(root) if root and trainer.loggers else None


def _charge(trainer: pl.Trainer, nbytes: int) -> bool:
    """Charge ``nbytes`` to the budget of the trainer's run (none without a TensorBoard
    writer: nothing is counted)."""
    writer = tensorboard_writer(trainer)
    return writer is None or budget_of(writer).charge(nbytes)


def _scalar_bytes(metrics: dict[str, Any]) -> int:
    """About what a scalar event of each tag takes in an event file."""
    return sum(len(tag) + 24 for tag in metrics)


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log plain numbers through every logger (rank zero only); non-finite values are kept."""
    if not trainer.is_global_zero or not metrics or not _charge(trainer, _scalar_bytes(metrics)):
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


class SiblingRuns:
    """Scalars written to sibling runs: sub-directories ``<log_dir>/<name>`` of the trainer's
    TensorBoard run, which TensorBoard lists as runs of their own.

    The same tag written in two of them is drawn as two lines of one chart, each run in its own
    colour, on every dashboard (Keras' TensorBoard callback writes ``train/`` and
    ``validation/`` so); the names are :data:`~lightning_diag.tensorboard.tags.SIBLING_RUNS`.
    Rank zero only. Loggers other than that TensorBoard logger get each value as
    ``<tag>/<run>``. The owner closes it when done (a callback's ``_release``); a new log
    directory (another fit, another logger) opens new files.

    TensorBoard colours runs from a palette of 7 in the order it lists them, by the time of
    their first event (then by name). Each sibling run's file is dated just after the run
    itself, in the order of :data:`~lightning_diag.tensorboard.tags.SIBLING_RUNS` (see
    :func:`sibling_start`), whenever it is written: a run and its siblings come together, in
    one order, and two runs side by side get distinct colours on every chart.

    Example:
        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> d = tempfile.mkdtemp()
        >>> trainer = pl.Trainer(logger=TensorBoardLogger(d), enable_progress_bar=False)
        >>> runs = SiblingRuns()
        >>> runs.log(trainer, {"train": {"loss": 2.3}, "validation": {"loss": 2.4}}, step=0)
        >>> sorted(p.name for p in Path(trainer.logger.log_dir).iterdir() if p.is_dir())
        ['train', 'validation']
        >>> runs.close()
    """

    def __init__(self) -> None:
        self._files: dict[str, _EventFile] = {}
        self._root: Path | None = None

    def log(self, trainer: pl.Trainer, values: dict[str, dict[str, float]], step: int) -> None:
        """Write ``values`` (sibling run -> tag -> value) at ``step``, flushed at once."""
        from lightning.pytorch.loggers import TensorBoardLogger
        from tensorboard.compat.proto.summary_pb2 import Summary

        if not trainer.is_global_zero or not values:
            return
        main = tensorboard_writer(trainer)
        size = sum(_scalar_bytes(scalars) for scalars in values.values())
        if main is not None and not budget_of(main).charge(size):
            return
        if main is not None:
            root = Path(main.get_logdir())
            if root != self._root:
                self.close()
                self._root = root
            for run, scalars in values.items():
                if not scalars:
                    continue
                if run not in self._files:
                    self._files[run] = _EventFile(root / run, sibling_start(root, run))
                # flushed now: the report may be built right after fit, before any close
                self._files[run].write(Summary(value=[
                    Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]),
                    step)
        flat = {f"{tag}/{run}": float(v) for run, scalars in values.items()
                for tag, v in scalars.items()}
        for logger in trainer.loggers:
            if not (isinstance(logger, TensorBoardLogger) and logger.experiment is main):
                logger.log_metrics(flat, step=step)

    def close(self) -> None:
        """Close every file (idempotent)."""
        while self._files:
            self._files.popitem()[1].close()
        self._root = None


def run_start(directory: Path) -> float | None:
    """When TensorBoard says the run in ``directory`` started: the time of the first event of
    its earliest event file (None: no readable event file)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = []
    for path in sorted(directory.glob("*tfevents*")):
        if path.is_file():
            first = next(iter(EventFileLoader(str(path)).Load()), None)
            if first is not None:
                times.append(first.wall_time)
    return min(times, default=None)


def sibling_start(root: Path, run: str) -> float:
    """The time the sibling run ``run`` of the run in ``root`` is dated: the run's own start
    plus a millisecond per place in :data:`~lightning_diag.tensorboard.tags.SIBLING_RUNS` (so
    that TensorBoard lists it right after the run, in that order); now, for a run that has
    no event file yet or a name not among them."""
    from lightning_diag.tensorboard.families import SIBLING_RUNS

    start = run_start(root)
    if start is None or run not in SIBLING_RUNS:
        return time.time()
    return start + 1e-3 * (1 + SIBLING_RUNS.index(run))


class _EventFile:
    """One event file of a sibling run, its first event dated ``start`` (TensorBoard's start
    of the run); every write is flushed."""

    _count = itertools.count()

    def __init__(self, directory: Path, start: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        directory.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(start):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(self._count)}.lightning_diag")
        self._file = (directory / name).open("wb")
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=start, file_version="brain.Event:2"))

    def write(self, summary: Any, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure to an ``(H, W, 3)`` uint8 array and close it (its plain
    figure texts drawn by Pillow: :func:`~lightning_diag.tensorboard.raster.render`)."""
    import matplotlib.pyplot as plt

    from lightning_diag.tensorboard.raster import render

    image = render(fig)
    plt.close(fig)
    return image


def log_figure(
    trainer: pl.Trainer, tag: str, fig: Figure, step: int, png_name: str | None = None
) -> None:
    """Render a matplotlib figure once and log it like :func:`log_image` (TensorBoard + PNG)."""
    log_image(trainer, tag, figure_to_array(fig), step, png_name)


def log_image(trainer: pl.Trainer, tag: str, image: np.ndarray, step: int,
              png_name: str | None = None, text: dict[str, str] | None = None) -> None:
    """Log a uint8 ``(H, W)`` or ``(H, W, 3)`` image to TensorBoard and optionally as a PNG.

    The PNG is encoded once (Pillow, fast compression) for both, instead of once by
    ``SummaryWriter.add_image`` (which also converts to float and back) and once more by the
    file writer: ~10 ms instead of ~100-200 ms for a 500 x 500 image. ``text``: key-value
    pairs the PNG carries in text chunks (the numbers a card shows, for programs to read).
    """
    if tensorboard_writer(trainer) is None and not (png_name and trainer.is_global_zero):
        return
    log_png(trainer, tag, encode_png(image, text), image.shape, step, png_name)


def encode_png(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """``image`` (uint8 ``(H, W)`` or ``(H, W, 3)``) as PNG bytes (fast compression), with
    ``text`` as its text chunks."""
    from PIL import Image, PngImagePlugin

    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1, pnginfo=info)
    return buffer.getvalue()


def log_png(trainer: pl.Trainer, tag: str, png: bytes, shape: tuple[int, ...], step: int,
            png_name: str | None = None) -> None:
    """Log an encoded PNG of ``shape`` (``(H, W)`` or ``(H, W, 3)``) as :func:`log_image` does:
    for an image logged again unchanged, without encoding it again."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer = tensorboard_writer(trainer)
    directory = log_dir(trainer) if png_name and trainer.is_global_zero else None
    if writer is None and directory is None:
        return
    copies = (writer is not None) + (directory is not None and bool(png_name))
    if writer is not None and not budget_of(writer).charge(copies * len(png)):
        return
    if directory is not None and png_name:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / png_name).write_bytes(png)
    if writer is not None:
        proto = Summary.Image(height=shape[0], width=shape[1],
                              colorspace=1 if len(shape) == 2 else 3, encoded_image_string=png)
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=proto)]),
                                              step)


def merge_custom_scalars(writer: SummaryWriter, category: str,
                         charts: dict[str, list[str]]) -> None:
    """Add a custom-scalars category without dropping those other callbacks added.

    TensorBoard shows only the latest layout of a run, so the categories are remembered on the
    writer and the whole layout is written again when one is added.
    """
    layouts: dict[str, Any] = writer.__dict__.setdefault("_lightning_diag_layout", {})
    new = {title: ["Multiline", tags] for title, tags in charts.items()}
    if layouts.get(category) == new:
        return
    if not budget_of(writer).charge(len(repr(layouts)) + len(repr(new))):
        return
    layouts[category] = new
    writer.add_custom_scalars(dict(layouts))


def log_step_summary(trainer: pl.Trainer, scalars: dict[str, float],
                     histograms: dict[str, list[float]], step: int) -> None:
    """Scalars and raw histograms of one step as ONE TensorBoard event (rank zero only).

    Histogram rows are ``[min, max, num, sum, sum_squares, counts...]``
    (:func:`~lightning_diag.functional.monitors.histogram_row`); empty ones are skipped.
    Loggers other than that TensorBoard logger get the scalars as usual.
    """
    writer = tensorboard_writer(trainer)
    if writer is None:
        log_scalars(trainer, scalars, step)
        return
    write_step_summary(writer, scalars, histograms, step)
    log_scalars_elsewhere(trainer, writer, scalars, step)


def write_step_summary(writer: SummaryWriter, scalars: dict[str, float],
                       histograms: dict[str, list[float]], step: int) -> None:
    """Write scalars and histogram rows as one event of ``writer``; safe off the training thread.

    A ``Summary`` holds any number of tagged values and TensorBoard reads each as if it had its
    own event, so tags and charts are unchanged; writing one event instead of ~8 per layer is
    most of a logging step's cost saved. The file writer queues events under a lock.
    """
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
    for tag, (lo, hi, num, total, squares, *counts) in histograms.items():
        if num > 0:
            values.append(Summary.Value(tag=tag, histo=HistogramProto(
                min=lo, max=hi, num=num, sum=total, sum_squares=squares,
                bucket_limit=histogram_edges(lo, hi, len(counts)), bucket=counts)))
    summary = Summary(value=values)
    if not budget_of(writer).charge(summary.ByteSize()):
        return
    # The public add_* calls write one event per value; the file writer takes a whole Summary.
    writer._get_file_writer().add_summary(summary, step)


def log_scalars_elsewhere(trainer: pl.Trainer, writer: SummaryWriter, scalars: dict[str, float],
                          step: int) -> None:
    """``scalars`` to every logger of ``trainer`` but the TensorBoard one writing to ``writer``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if not (isinstance(logger, TensorBoardLogger) and logger.experiment is writer):
            logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)


class EventWorker:
    """One background thread that finishes a callback's logging work off the training thread.

    :meth:`submit` queues a job; while ``depth`` jobs are unfinished the next submit waits for
    the oldest, so the tensors the jobs hold stay bounded. :meth:`ready` returns the results of
    the jobs finished so far, in submission order, without waiting; :meth:`drain` waits for
    every job and returns the rest. Both re-raise the error of a failed job on the caller's
    thread, so that the callback's guard reports it. The thread ends whenever the queue is
    found empty (no idle thread outlives a logging step: a process forked for data loading
    then has none to inherit) and :meth:`close` ends it in any case; a later submit starts a
    new one. The thread and the queue are not copied or pickled.

    Example:
        >>> worker = EventWorker()
        >>> worker.submit(lambda: 2 + 2)
        >>> worker.drain()
        [4]
        >>> worker.close()
        []
    """

    def __init__(self, depth: int = 2) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"depth": self.depth}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["depth"])  # type: ignore[misc]

    def submit(self, job: Callable[[], Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor, wait

        unfinished = [f for f in self._pending if not f.done()]
        if len(unfinished) >= self.depth:
            wait(unfinished[:len(unfinished) - self.depth + 1])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_diag")
        self._pending.append(self._pool.submit(job))

    def ready(self) -> list[Any]:
        """The results of the leading finished jobs, in order; the others stay queued."""
        if not self._pending:  # called on every training step: nothing to do, nothing to make
            return []
        done = 0
        while done < len(self._pending) and self._pending[done].done():
            done += 1
        finished, self._pending = self._pending[:done], self._pending[done:]
        self._end_if_idle()
        return [f.result() for f in finished]

    def drain(self) -> list[Any]:
        """Wait for every queued job and return their results, in order."""
        finished, self._pending = self._pending, []
        try:
            return [f.result() for f in finished]
        finally:
            self._end_if_idle()

    def _end_if_idle(self) -> None:
        if not self._pending and self._pool is not None:
            self._pool.shutdown(wait=False)  # nothing queued: the thread exits now
            self._pool = None

    def close(self) -> list[Any]:
        """:meth:`drain`, then end the thread, even when a job failed."""
        try:
            return self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

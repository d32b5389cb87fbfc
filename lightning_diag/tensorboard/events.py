"""Read a run's TensorBoard event files into plain Python data (used by the HTML report).

A log directory may hold one run (a ``version_N`` folder) or several (``runs/demo`` with a clean
and an injected run); every folder that holds event files is one run, named by its path relative
to the log directory, except the sibling runs (:data:`~lightning_diag.tensorboard.tags.
SIBLING_RUNS`: ``train``, ``validation``, ...): their values are series of the folder above
them, named by :attr:`Series.series`. Each record keeps the run it came from.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> from lightning_diag.tensorboard.tags import curve
    >>> d = tempfile.mkdtemp()
    >>> for split, loss in (("train", 2.3), ("validation", 2.4)):
    ...     with SummaryWriter(f"{d}/version_0/{split}") as w:
    ...         w.add_scalar(curve("loss"), loss, 0)
    >>> data = load_runs(d)
    >>> data.runs, [(s.run, s.series, s.values) for s in data.scalars[curve("loss")]]
    (['version_0'], [('version_0', 'train', [2.299999952316284]), \
('version_0', 'validation', [2.4000000953674316])])
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lightning_diag.tensorboard.tags import SIBLING_RUNS

__all__ = ["Histogram", "Image", "RunData", "Series", "Text", "load_runs", "run_dirs"]

_TEXT_SUFFIX = "/text_summary"


@dataclass
class Series:
    """One scalar tag of one run; ``series`` names its sibling run (``""``: the run itself)."""

    run: str
    steps: list[int]
    values: list[float]
    series: str = ""

    @property
    def source(self) -> str:
        """Where it comes from, as a label: the run, and the sibling run if any."""
        return _source(self.run, self.series)


@dataclass
class Text:
    run: str
    step: int
    text: str
    series: str = ""

    @property
    def source(self) -> str:
        return _source(self.run, self.series)


@dataclass
class Image:
    run: str
    step: int
    png: bytes
    width: int
    height: int
    series: str = ""

    @property
    def source(self) -> str:
        return _source(self.run, self.series)


@dataclass
class Histogram:
    run: str
    step: int
    limits: list[float]
    counts: list[float]
    series: str = ""

    @property
    def source(self) -> str:
        return _source(self.run, self.series)


def _source(run: str, series: str) -> str:
    return f"{run}/{series}" if series else run


@dataclass
class RunData:
    """Everything read from a log directory, keyed by tag; each value lists one entry per run."""

    runs: list[str] = field(default_factory=list)
    scalars: dict[str, list[Series]] = field(default_factory=lambda: defaultdict(list))
    texts: dict[str, list[Text]] = field(default_factory=lambda: defaultdict(list))
    images: dict[str, list[Image]] = field(default_factory=lambda: defaultdict(list))
    histograms: dict[str, list[Histogram]] = field(default_factory=lambda: defaultdict(list))

    @property
    def empty(self) -> bool:
        return not (self.scalars or self.texts or self.images or self.histograms)


def run_dirs(logdir: Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) holding TensorBoard event files."""
    found = {p.parent for p in logdir.rglob("events.out.tfevents.*") if p.is_file()}
    return sorted(found)


def load_runs(logdir: str | Path) -> RunData:
    """Load scalars, texts, images and histograms of every run under ``logdir``.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or is not a directory.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"Log directory {str(root)!r} does not exist or is not a folder.")
    data = RunData()
    guidance = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    for directory in run_dirs(root):
        run, series = _run_and_series(root, directory)
        acc = EventAccumulator(str(directory), size_guidance=guidance)
        acc.Reload()
        tags = acc.Tags()
        if run not in data.runs:
            data.runs.append(run)
        for tag in tags.get("scalars", []):
            events = acc.Scalars(tag)
            data.scalars[tag].append(
                Series(run, [e.step for e in events], [float(e.value) for e in events], series)
            )
        for tag in tags.get("tensors", []):
            if tag.endswith(_TEXT_SUFFIX):
                for ev in acc.Tensors(tag):
                    strings = ev.tensor_proto.string_val
                    if strings:
                        text = strings[0].decode("utf-8", "replace")
                        data.texts[tag[: -len(_TEXT_SUFFIX)]].append(
                            Text(run, ev.step, text, series))
        for tag in tags.get("images", []):
            for im in acc.Images(tag):
                data.images[tag].append(
                    Image(run, im.step, im.encoded_image_string, im.width, im.height, series)
                )
        for tag in tags.get("histograms", []):
            for h in acc.Histograms(tag):
                hv = h.histogram_value
                data.histograms[tag].append(
                    Histogram(run, h.step, list(hv.bucket_limit), list(hv.bucket), series)
                )
    return data


def _run_and_series(root: Path, directory: Path) -> tuple[str, str]:
    """The run a directory of event files belongs to, and its sibling-run name (or ``""``).

    Example:
        >>> _run_and_series(Path("runs"), Path("runs/inject/version_0/train"))
        ('inject/version_0', 'train')
        >>> _run_and_series(Path("runs"), Path("runs/train")), _run_and_series(Path("r"), Path("r"))
        (('.', 'train'), ('.', ''))
    """
    series = directory.name if directory != root and directory.name in SIBLING_RUNS else ""
    run = (directory.parent if series else directory).relative_to(root).as_posix()
    return ("." if run in ("", ".") else run), series

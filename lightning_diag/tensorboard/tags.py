"""Every TensorBoard tag lightning_diag writes, built and declared in this one module.

Writers (the callbacks, :class:`~lightning_diag.base.DiagnosticCallback` for findings, and
:mod:`lightning_diag.tuning`) build their tags with the functions and constants below, never from
literals; the HTML report picks its tags by the same roots; docs/tensorboard.md holds the table
:func:`tag_table` generates from :data:`TAGS`. Each writer's tags live under one root
(:class:`Family`), so regrouping them (by recipe step, say) is a change of roots here.

Example:
    >>> curve("loss/val")
    'diag/curves/loss/val'
    >>> spec = find("diag/activations/dead_fraction/net.2", "scalar")
    >>> spec.writer, spec.pattern, spec.conditional
    ('ActivationHistogram', 'diag/activations/dead_fraction/<layer>', False)
    >>> [s.pattern for s in declared("InitialLossCheck")]  # only its findings
    ['diagnostics/InitialLossCheck', 'diagnostics/InitialLossCheck/<code>']
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from lightning_diag.functional.monitors import STAT_NAMES
from lightning_diag.tensorboard.writer import markdown_table

__all__ = [
    "ACTIVATIONS", "ACTIVATIONS_SUMMARY", "CHECK", "CURVES", "CURVES_FIGURE", "DATA",
    "DATA_CLASS_COUNTS", "DATA_SUMMARY", "EMA_SUFFIX", "ENSEMBLE", "ENSEMBLE_GAIN",
    "EVERY_DIAGNOSTIC", "FINDINGS", "FIRST_LAYER", "FIRST_LAYER_FILTERS", "GRADIENT_CHECK",
    "GRADIENT_CHECK_ERRORS", "GRADIENT_CHECK_WORST", "OVERFIT", "OVERFIT_ACCURACY", "OVERFIT_LOSS",
    "TAGS", "TUNING", "TUNING_SUMMARY", "TUNING_SWEEP_CHART", "TUNING_SWEEP_TABLE", "UPDATE_RATIO",
    "UPDATE_RATIO_GUIDE", "UPDATE_RATIO_MEDIAN", "WRITERS", "Family", "Kind", "TagSpec",
    "activation_histogram", "activation_stat", "curve", "curves_layout", "data_grid", "data_labels",
    "declared", "ema_metric", "ensemble_member", "ensemble_metric", "find", "finding_value",
    "findings_text", "raw_metric", "refine_curve", "refine_layout", "replace_table", "sweep_curve",
    "sweep_layout", "tag_table", "update_ratio_layer", "update_ratio_layout", "write_table",
]

Kind = Literal["scalar", "histogram", "image", "text", "layout"]

#: Stands for the class name of the diagnostic in the findings tags every diagnostic writes.
CHECK = "<Check>"
EVERY_DIAGNOSTIC = "every diagnostic"
#: Everything that writes tags: the callbacks by class name, and the tuning code.
WRITERS = ("DataInspection", "GradientCheck", "InitialLossCheck", "OverfitSmallBatch",
           "LearningCurves", "ActivationHistogram", "FirstLayerVisualization",
           "UpdateRatioMonitor", "LRPlateauAdvisor", "EMAWeights", "CheckpointEnsemble", "tuning")


@dataclass(frozen=True)
class Family:
    """The tags of one writer, all under ``root``.

    Example:
        >>> Family("X", "diag/x").tag("a", 1), Family("X", "diag/x").prefix
        ('diag/x/a/1', 'diag/x/')
    """

    writer: str
    root: str

    def tag(self, *parts: object) -> str:
        return "/".join([self.root, *map(str, parts)])

    @property
    def prefix(self) -> str:
        """The root with its trailing slash, for picking this writer's tags by prefix."""
        return self.root + "/"


_ROOT = "diag"
FINDINGS = Family(EVERY_DIAGNOSTIC, "diagnostics")
DATA = Family("DataInspection", f"{_ROOT}/data")
GRADIENT_CHECK = Family("GradientCheck", f"{_ROOT}/gradient_check")
OVERFIT = Family("OverfitSmallBatch", f"{_ROOT}/overfit")
CURVES = Family("LearningCurves", f"{_ROOT}/curves")
ACTIVATIONS = Family("ActivationHistogram", f"{_ROOT}/activations")
UPDATE_RATIO = Family("UpdateRatioMonitor", f"{_ROOT}/update_ratio")
FIRST_LAYER = Family("FirstLayerVisualization", f"{_ROOT}/first_layer")
ENSEMBLE = Family("CheckpointEnsemble", f"{_ROOT}/ensemble")
TUNING = Family("tuning", f"{_ROOT}/tuning")


# -- the builders the writers call ------------------------------------------------------------
def findings_text(check: str) -> str:
    """The markdown table of one diagnostic's findings."""
    return FINDINGS.tag(check)


def finding_value(check: str, code: str) -> str:
    """The measured value of one finding."""
    return FINDINGS.tag(check, code)


DATA_SUMMARY = DATA.tag("summary")
DATA_CLASS_COUNTS = DATA.tag("class_counts")


def data_labels(split: str) -> str:
    """The label histogram of one split (``train``, ``validation``)."""
    return DATA.tag("labels", split)


def data_grid(name: str, split: str = "train") -> str:
    """An image grid of samples; those of a split other than ``train`` get its name appended.

    Example:
        >>> data_grid("exact_duplicates"), data_grid("exact_duplicates", "validation")
        ('diag/data/exact_duplicates', 'diag/data/exact_duplicates_validation')
    """
    return DATA.tag(name if split == "train" else f"{name}_{split}")


GRADIENT_CHECK_ERRORS = GRADIENT_CHECK.tag("errors")
GRADIENT_CHECK_WORST = GRADIENT_CHECK.tag("worst_error")
OVERFIT_LOSS = OVERFIT.tag("loss")
OVERFIT_ACCURACY = OVERFIT.tag("accuracy")


def curve(series: str) -> str:
    """An epoch curve, ``series`` being ``loss/train``, ``accuracy/gap``, ..."""
    return CURVES.tag(series)


CURVES_FIGURE = CURVES.tag("figure")


def curves_layout() -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the learning curves and its charts."""
    return "learning curves", {
        "loss (train vs val)": [curve("loss/train"), curve("loss/val")],
        "accuracy (train vs val)": [curve("accuracy/train"), curve("accuracy/val")],
        "train - val accuracy gap": [curve("accuracy/gap")]}


def activation_stat(stat: str, layer: str) -> str:
    """One statistic of one layer (``mean``, ``dead_fraction``, ``grad_norm``, ...)."""
    return ACTIVATIONS.tag(stat, layer)


def activation_histogram(kind: str, layer: str) -> str:
    """The histogram of a layer's activations (``act``) or of the gradient into it (``grad``)."""
    return ACTIVATIONS.tag(kind, layer)


ACTIVATIONS_SUMMARY = ACTIVATIONS.tag("summary")


def update_ratio_layer(param: str) -> str:
    """The update ratio of one weight tensor."""
    return UPDATE_RATIO.tag("layer", param)


UPDATE_RATIO_MEDIAN = UPDATE_RATIO.tag("median")
UPDATE_RATIO_GUIDE = UPDATE_RATIO.tag("guide_1e-3")


def update_ratio_layout() -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the update ratios and its charts."""
    return "update_ratio", {
        "median update ratio vs 1e-3 guide": [UPDATE_RATIO_MEDIAN, UPDATE_RATIO_GUIDE],
        "per-layer update ratio": [update_ratio_layer(".*"), UPDATE_RATIO_GUIDE]}


FIRST_LAYER_FILTERS = FIRST_LAYER.tag("filters")

#: Appended to a validation metric's name for the value of the EMA weights.
EMA_SUFFIX = "_ema"


def ema_metric(key: str) -> str:
    """The EMA weights' value of the validation metric ``key`` (logged through Lightning)."""
    return f"{key}{EMA_SUFFIX}"


def raw_metric(tag: str) -> str | None:
    """The metric an :func:`ema_metric` tag stands next to, or None for another tag.

    Example:
        >>> raw_metric("val/acc_ema"), raw_metric("val_acc")
        ('val/acc', None)
    """
    metric = tag.removesuffix(EMA_SUFFIX)
    return metric if metric and metric != tag else None


def ensemble_member(index: int | str, metric: str) -> str:
    """A metric the user's ``validation_step`` logs, for one kept checkpoint (oldest first).

    Example:
        >>> ensemble_member(0, "val/loss")
        'diag/ensemble/member_0/val/loss'
    """
    return ENSEMBLE.tag(f"member_{index}", metric)


def ensemble_metric(metric: str) -> str:
    """A metric the user's ``validation_step`` logs, for the ensemble of the checkpoints."""
    return ENSEMBLE.tag("ensemble", metric)


ENSEMBLE_GAIN = ENSEMBLE.tag("gain")


def sweep_curve(lr: float | str) -> str:
    """The smoothed loss curve of one learning rate of the sweep.

    Example:
        >>> sweep_curve(0.01)
        'diag/tuning/sweep/lr_1e-02'
    """
    return TUNING.tag("sweep", f"lr_{lr}" if isinstance(lr, str) else f"lr_{lr:.0e}")


TUNING_SWEEP_CHART = TUNING.tag("sweep_chart")
TUNING_SWEEP_TABLE = TUNING.tag("sweep")
TUNING_SUMMARY = TUNING.tag("summary")


def sweep_layout(curves: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the sweep: all its curves on one chart."""
    return TUNING.root, {"sweep: smoothed training loss per learning rate": curves}


def refine_curve(rank: int | str) -> str:
    """The monitored metric per epoch of the refined configuration of this rank."""
    return TUNING.tag("refine", f"rank_{rank}")


def refine_layout(monitor: str, curves: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the refinement: its curves on one chart."""
    return TUNING.root, {f"refine: {monitor} per epoch": curves}


# -- the declarations -------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"(<[^<>/]+>)")
#: Placeholders that may span path segments (Lightning metric names may hold slashes).
_SPANNING = {"<metric>"}


@dataclass(frozen=True)
class TagSpec:
    """One tag, or one pattern of tags, a writer writes.

    Attributes:
        writer: The callback's class name, ``"tuning"``, or ``"every diagnostic"``.
        kind: ``scalar``, ``histogram``, ``image``, ``text``, or ``layout`` (a custom-scalars
            category, whose chart titles are ``charts``).
        pattern: The tag; ``<name>`` stands for one path segment (a layer, a split, ...),
            ``<metric>`` for a metric name, slashes included.
        description: What it shows, in one line.
        condition: When it is written beyond the writer running with a TensorBoard logger;
            empty when always.
        charts: For a layout, the titles of its charts (patterns as well).
    """

    writer: str
    kind: Kind
    pattern: str
    description: str
    condition: str = ""
    charts: tuple[str, ...] = ()

    @property
    def conditional(self) -> bool:
        return bool(self.condition)

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return _compile(self.pattern)

    def matches(self, tag: str) -> bool:
        return self.regex.fullmatch(tag) is not None

    def matches_chart(self, title: str) -> bool:
        return any(_compile(c).fullmatch(title) for c in self.charts)


def _compile(pattern: str) -> re.Pattern[str]:
    # split() with a group alternates literal text and placeholders
    parts = _PLACEHOLDER.split(pattern)
    return re.compile("".join(
        re.escape(p) if i % 2 == 0 else ".+" if p in _SPANNING else "[^/]+"
        for i, p in enumerate(parts)))


def _specs() -> tuple[TagSpec, ...]:
    def spec(family: Family, kind: Kind, pattern: str, description: str, condition: str = "",
             charts: tuple[str, ...] = ()) -> TagSpec:
        return TagSpec(family.writer, kind, pattern, description, condition, charts)

    def layout(family: Family, made: tuple[str, dict[str, list[str]]], condition: str = "",
               titles: tuple[str, ...] = ()) -> TagSpec:
        category, charts = made
        titles = titles or tuple(charts)
        return spec(family, "layout", category, "custom-scalars charts: " + "; ".join(titles),
                    condition, titles)

    image_like = "image-like inputs"
    validation = "with a validation loop"
    labelled = "integer class labels"
    found_in = "such samples in the {split} set, " + image_like
    grids = {"exact_duplicates": "groups of identical inputs",
             "near_duplicates": "groups of near-identical inputs",
             "non_finite": "samples holding NaN or Inf", "constant": "constant (blank) inputs"}
    return (
        spec(FINDINGS, "text", findings_text(CHECK), "the check's findings as a markdown table, "
             "rendered from its `findings.jsonl` records; step = global step",
             "when it has findings"),
        spec(FINDINGS, "scalar", finding_value(CHECK, "<code>"), "the measured value of a "
             "finding", "for findings with a numeric value"),
        spec(DATA, "text", DATA_SUMMARY, "every count of the inspection, per set"),
        spec(DATA, "image", DATA_CLASS_COUNTS, "bar chart of the samples per class, train "
             "next to validation", labelled),
        spec(DATA, "histogram", data_labels("train"), "the training labels", labelled),
        spec(DATA, "histogram", data_labels("validation"), "the validation labels",
             f"{labelled}, a validation set"),
        spec(DATA, "image", data_grid("samples_per_class"), "one row of training samples per "
             "class", f"{labelled}, {image_like}"),
        *(spec(DATA, "image", data_grid(name, split), f"{what}, one group per row",
               found_in.format(split=split))
          for name, what in grids.items() for split in ("train", "validation")),
        spec(DATA, "image", data_grid("leakage_train_vs_validation"), "training sample next to "
             "the validation sample repeating it", "validation samples found repeating "
             f"training ones, {image_like}"),
        spec(GRADIENT_CHECK, "text", GRADIENT_CHECK_ERRORS, "the relative error per tensor "
             "(analytic vs numerical gradient)", "a finite, reproducible loss"),
        spec(GRADIENT_CHECK, "scalar", GRADIENT_CHECK_WORST, "the worst relative error",
             "a finite, reproducible loss"),
        spec(OVERFIT, "scalar", OVERFIT_LOSS, "loss on the small sample; step = overfit step"),
        spec(OVERFIT, "scalar", OVERFIT_ACCURACY, "accuracy on the small sample; step = "
             "overfit step", "classification: classes per sample, pixel or token, or 0/1 "
             "labels"),
        spec(CURVES, "scalar", curve("loss/train"), "training loss; step = epoch",
             "the module logs the `train_loss` metric"),
        spec(CURVES, "scalar", curve("loss/val"), "validation loss; step = epoch",
             f"{validation}, the module logs the `val_loss` metric"),
        spec(CURVES, "scalar", curve("accuracy/train"), "training accuracy; step = epoch",
             "the module logs the `train_acc` metric"),
        spec(CURVES, "scalar", curve("accuracy/val"), "validation accuracy; step = epoch",
             f"{validation}, the module logs the `val_acc` metric"),
        spec(CURVES, "scalar", curve("accuracy/gap"), "training minus validation accuracy; "
             "step = epoch", "both accuracies are logged"),
        spec(CURVES, "image", CURVES_FIGURE, "loss and accuracy, train and val on one panel "
             "each (also `learning_curves.png`)"),
        layout(CURVES, curves_layout()),
        *(spec(ACTIVATIONS, "scalar", activation_stat(stat, "<layer>"), f"`{stat}` of the "
               "layer's output", "bounded layers (tanh, sigmoid, hardtanh, ...)"
               if stat == "saturated_fraction" else "")
          for stat in STAT_NAMES),
        spec(ACTIVATIONS, "scalar", activation_stat("grad_norm", "<layer>"), "norm of the "
             "gradient into the layer's output", "layers the gradient reaches"),
        spec(ACTIVATIONS, "histogram", activation_histogram("act", "<layer>"), "the layer's "
             "output"),
        spec(ACTIVATIONS, "histogram", activation_histogram("grad", "<layer>"), "the gradient "
             "into the layer's output", "layers the gradient reaches"),
        spec(ACTIVATIONS, "image", ACTIVATIONS_SUMMARY, "mean/std per layer and the "
             "distributions, at the end of training"),
        spec(UPDATE_RATIO, "scalar", update_ratio_layer("<param>"), "||dw|| / ||w|| of one "
             "weight tensor (2 or more dimensions)"),
        spec(UPDATE_RATIO, "scalar", UPDATE_RATIO_MEDIAN, "the median over weight tensors"),
        spec(UPDATE_RATIO, "scalar", UPDATE_RATIO_GUIDE, "the recipe's healthy ratio, 1e-3"),
        layout(UPDATE_RATIO, update_ratio_layout()),
        spec(FIRST_LAYER, "image", FIRST_LAYER_FILTERS, "the first layer's filters, each "
             "normalized, as a grid (also `first_layer_step<N>.png`)", "a Conv2d, or a Linear "
             "on images of `input_shape`"),
        TagSpec("EMAWeights", "scalar", ema_metric("<metric>"), "every validation metric of "
                "the averaged weights, next to the raw `<metric>`",
                f"`evaluate=\"both\"`, {validation}"),
        spec(ENSEMBLE, "scalar", ensemble_member("<i>", "<metric>"), "every metric "
             "`validation_step` logs, for checkpoint `<i>` (oldest first)",
             f">= 2 kept checkpoints, {validation}"),
        spec(ENSEMBLE, "scalar", ensemble_metric("<metric>"), "every metric `validation_step` "
             "logs, for the ensemble of the checkpoints", f">= 2 kept checkpoints, {validation}"),
        spec(ENSEMBLE, "scalar", ENSEMBLE_GAIN, "the ensemble's improvement over the best "
             "member on the validation accuracy, else the validation loss (> 0: better)",
             f">= 2 kept checkpoints, {validation}, an accuracy or loss logged"),
        spec(TUNING, "scalar", sweep_curve("<lr>"), "smoothed training loss of one learning "
             "rate; run `<run_dir>/sweep`", "`lr_sweep(run_dir=...)`"),
        spec(TUNING, "image", TUNING_SWEEP_CHART, "every sweep curve, raw and smoothed",
             "`lr_sweep(run_dir=...)`"),
        spec(TUNING, "text", TUNING_SWEEP_TABLE, "the sweep's table and pick rule",
             "`lr_sweep(run_dir=...)`"),
        layout(TUNING, sweep_layout([]), "`lr_sweep(run_dir=...)`"),
        spec(TUNING, "scalar", refine_curve("<k>"), "the monitored metric per epoch of the "
             "refined configuration ranked `<k>`; run `<run_dir>/summary`", "`tune`"),
        spec(TUNING, "text", TUNING_SUMMARY, "the summary of sweep, search and refinement",
             "`tune`"),
        layout(TUNING, refine_layout("<monitor>", []), "`tune`"),
    )


#: Every tag lightning_diag writes.
TAGS: tuple[TagSpec, ...] = _specs()


def declared(writer: str) -> list[TagSpec]:
    """The tags ``writer`` may write: its own and, for a callback, its findings tags."""
    own = [s for s in TAGS if s.writer == writer]
    if writer in WRITERS and writer != TUNING.writer:
        own += [dataclasses.replace(s, writer=writer, pattern=s.pattern.replace(CHECK, writer))
                for s in TAGS if s.writer == EVERY_DIAGNOSTIC]
    return own


def find(tag: str, kind: Kind, writer: str | None = None) -> TagSpec | None:
    """The declaration ``tag`` of this kind matches (among ``writer``'s when given), or None."""
    specs = declared(writer) if writer is not None else TAGS
    return next((s for s in specs if s.kind == kind and s.matches(tag)), None)


# -- the generated documentation --------------------------------------------------------------
_BEGIN = ("<!-- tag table: generated from lightning_diag/tensorboard/tags.py by `make tag-table`; "
          "do not edit -->")
_END = "<!-- end of tag table -->"


def tag_table() -> str:
    """The markdown table of :data:`TAGS`, as docs/tensorboard.md holds it.

    Example:
        >>> print(tag_table().splitlines()[0])
        | tag | kind | written by | when | what |
    """
    kinds = {"layout": "custom scalars"}
    rows = [[f"`{s.pattern}`", kinds.get(s.kind, s.kind),
             f"`{s.writer}`" if s.writer in WRITERS else s.writer,
             s.condition or "always", s.description] for s in TAGS]
    return markdown_table(["tag", "kind", "written by", "when", "what"], rows)


def replace_table(doc: str) -> str:
    """``doc`` with the text between the tag-table markers replaced by :func:`tag_table`.

    Raises:
        ValueError: the markers are missing.
    """
    start, end = doc.find(_BEGIN), doc.find(_END)
    if start < 0 or end < start:
        raise ValueError(f"The tag-table markers are missing; put these two lines where the "
                         f"table goes:\n{_BEGIN}\n{_END}")
    return f"{doc[:start]}{_BEGIN}\n\n{tag_table()}\n\n{doc[end:]}"


def write_table(page: str | Path) -> None:
    """Regenerate the tag table of a doc page in place (``make tag-table``)."""
    path = Path(page)
    path.write_text(replace_table(path.read_text(encoding="utf-8")), encoding="utf-8")

"""Every TensorBoard tag lightning_diag writes, built and declared in this one module.

Writers (the callbacks, :class:`~lightning_diag.base.DiagnosticCallback` for the findings table,
and :mod:`lightning_diag.tuning`) build their tags with the functions and constants below, never
from literals; the HTML report picks its tags by the same roots; docs/tensorboard.md holds the
table :func:`tag_table` generates from :data:`TAGS`.

TensorBoard groups tags by their first path component, sorts the groups by name and opens only
the first two, on every dashboard. So each writer's tags live under one root (:class:`Family`)
named after its step of the recipe, numbered as docs/workflow.md numbers them (``1_data``,
``2_gradient_check``, ``5.3_activations``, ...), so that the groups come in recipe order and
before the user's own metrics (letters sort after digits). Two roots are numbered 0 because
they are what to read first: ``0_findings`` (the one table of every finding) and ``0_curves``
(the learning curves of step 5.1-5.2: is the loss going down, do train and validation part).

Series to compare (train vs validation, EMA vs raw weights, the ensemble vs its members, a
ratio vs the recipe's healthy value) are the same tag written in *sibling runs*: sub-directories
of the run's log directory named in :data:`SIBLING_RUNS`, as Keras' TensorBoard callback writes
``train/`` and ``validation/``. TensorBoard draws each run in its own colour on one chart, on
every dashboard; :mod:`~lightning_diag.tensorboard.events` reads them back as series of their
parent run.

Example:
    >>> curve("loss"), TRAIN_RUN, VALIDATION_RUN
    ('0_curves/loss', 'train', 'validation')
    >>> spec = find("5.3_activations/dead_fraction/net.2", "scalar")
    >>> spec.writer, spec.pattern, spec.conditional
    ('ActivationHistogram', '5.3_activations/dead_fraction/<layer>', False)
    >>> find(curve("loss"), "scalar", run="train").runs
    ('train', 'validation')
    >>> [s.pattern for s in declared("InitialLossCheck")]  # only the findings table
    ['0_findings/table']
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
    "ACTIVATIONS", "ACTIVATIONS_SUMMARY", "COMBINED_RUN", "CURVES", "CURVES_FIGURE", "CURVES_GAP",
    "DATA", "DATA_CLASS_COUNTS", "DATA_SUMMARY", "EMA", "EMA_RUN", "EMA_SUFFIX", "ENSEMBLE",
    "EVERY_DIAGNOSTIC", "FINDINGS", "FINDINGS_TABLE", "FIRST_LAYER", "FIRST_LAYER_FILTERS",
    "GRADIENT_CHECK", "GRADIENT_CHECK_ERRORS", "GUIDE_RUN", "MEMBERS_RUN", "OVERFIT",
    "OVERFIT_ACCURACY", "OVERFIT_LOSS", "RAW_RUN", "ROOTS", "SIBLING_RUNS", "TAGS", "TRAIN_RUN",
    "TUNING", "TUNING_SUMMARY", "TUNING_SWEEP_CHART", "TUNING_SWEEP_TABLE",
    "TUNING_TRIAL_ENDED", "UPDATE_RATIO",
    "UPDATE_RATIO_MEDIAN", "VALIDATION_RUN", "WRITERS", "Family", "Kind", "TagSpec",
    "activation_histogram", "activation_stat", "curve", "data_grid", "data_labels", "declared",
    "ema_comparison", "ema_metric", "ensemble_comparison", "find", "overfit_ladder",
    "overfit_ladder_layout", "raw_metric", "refine_curve",
    "refine_layout", "replace_table", "sweep_curve", "sweep_layout", "tag_table", "typed_layer",
    "update_ratio_layer", "update_ratio_layout", "write_table",
]

Kind = Literal["scalar", "histogram", "image", "text", "layout"]

EVERY_DIAGNOSTIC = "every diagnostic"
#: Everything that writes tags: the callbacks by class name, and the tuning code.
WRITERS = ("DataInspection", "GradientCheck", "InitialLossCheck", "OverfitSmallBatch",
           "LearningCurves", "ActivationHistogram", "FirstLayerVisualization",
           "UpdateRatioMonitor", "TrainingInvariants", "LRPlateauAdvisor", "EMAWeights",
           "CheckpointEnsemble", "tuning")


@dataclass(frozen=True)
class Family:
    """The tags of one writer, all under ``root`` (a TensorBoard group).

    Example:
        >>> Family("X", "9_x").tag("a", 1), Family("X", "9_x").prefix
        ('9_x/a/1', '9_x/')
    """

    writer: str
    root: str

    def tag(self, *parts: object) -> str:
        return "/".join([self.root, *map(str, parts)])

    @property
    def prefix(self) -> str:
        """The root with its trailing slash, for picking this writer's tags by prefix."""
        return self.root + "/"


# Recipe order (docs/workflow.md); step 3 (initial loss), 6.4 (reading the curves) and the
# training invariants write findings only, so they have no group of their own.
FINDINGS = Family(EVERY_DIAGNOSTIC, "0_findings")
CURVES = Family("LearningCurves", "0_curves")
DATA = Family("DataInspection", "1_data")
GRADIENT_CHECK = Family("GradientCheck", "2_gradient_check")
OVERFIT = Family("OverfitSmallBatch", "4_overfit")
ACTIVATIONS = Family("ActivationHistogram", "5.3_activations")
FIRST_LAYER = Family("FirstLayerVisualization", "5.4_first_layer")
UPDATE_RATIO = Family("UpdateRatioMonitor", "5.5_update_ratio")
TUNING = Family("tuning", "6_tuning")
ENSEMBLE = Family("CheckpointEnsemble", "7.3_ensemble")
EMA = Family("EMAWeights", "7.4_ema")
#: Every root, in the order TensorBoard shows the groups (by name), which is the recipe's.
ROOTS = tuple(f.root for f in (CURVES, FINDINGS, DATA, GRADIENT_CHECK, OVERFIT, ACTIVATIONS,
                               FIRST_LAYER, UPDATE_RATIO, TUNING, ENSEMBLE, EMA))

#: The sibling runs (sub-directories of the run's log directory) series to compare go to.
TRAIN_RUN, VALIDATION_RUN = "train", "validation"
RAW_RUN, EMA_RUN = "raw", "ema"
MEMBERS_RUN, COMBINED_RUN = "members", "combined"
#: The recipe's healthy update ratio, drawn as a line of its own on each update-ratio chart.
GUIDE_RUN = "healthy_1e-3"
SIBLING_RUNS = (TRAIN_RUN, VALIDATION_RUN, GUIDE_RUN, MEMBERS_RUN, COMBINED_RUN, RAW_RUN, EMA_RUN)


# -- the builders the writers call ------------------------------------------------------------
#: Every finding of the run, all callbacks, in one markdown table rewritten as findings arrive.
FINDINGS_TABLE = FINDINGS.tag("table")

DATA_SUMMARY = DATA.tag("summary")
DATA_CLASS_COUNTS = DATA.tag("class_counts")


def data_labels(split: str) -> str:
    """The label histogram of one split (``train``, ``validation``)."""
    return DATA.tag("labels", split)


def data_grid(name: str, split: str = "train") -> str:
    """An image grid of samples; those of a split other than ``train`` get its name appended.

    Example:
        >>> data_grid("exact_duplicates"), data_grid("exact_duplicates", "validation")
        ('1_data/exact_duplicates', '1_data/exact_duplicates_validation')
    """
    return DATA.tag(name if split == "train" else f"{name}_{split}")


GRADIENT_CHECK_ERRORS = GRADIENT_CHECK.tag("errors")
OVERFIT_LOSS = OVERFIT.tag("loss")
OVERFIT_ACCURACY = OVERFIT.tag("accuracy")


def overfit_ladder(lr: float | str) -> str:
    """The small sample's loss at one learning rate of the ladder the overfit test tries when
    the configured rate cannot overfit it: one curve per rate.

    Example:
        >>> overfit_ladder(0.01)
        '4_overfit/ladder/lr_1e-02'
    """
    return OVERFIT.tag("ladder", f"lr_{lr}" if isinstance(lr, str) else f"lr_{lr:.0e}")


def overfit_ladder_layout(curves: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the ladder: the configured rate's loss and each rung's."""
    return OVERFIT.root, {"loss on the small sample per learning rate": _exactly(
        [OVERFIT_LOSS, *curves])}


def curve(quantity: str) -> str:
    """The epoch curve of ``loss`` or ``accuracy``, written in :data:`TRAIN_RUN` and
    :data:`VALIDATION_RUN` so that every dashboard draws the two on one chart."""
    return CURVES.tag(quantity)


CURVES_GAP = CURVES.tag("train_minus_val_accuracy")
# Sorted after the curves (TensorBoard sorts a group's cards by tag): the charts come first.
CURVES_FIGURE = CURVES.tag("overview")


def activation_stat(stat: str, layer: str) -> str:
    """One statistic of one layer (``mean``, ``dead_fraction``, ``grad_norm``, ...)."""
    return ACTIVATIONS.tag(stat, layer)


def activation_histogram(kind: str, layer: str) -> str:
    """The histogram of a layer's activations (``act``) or of the gradient into it (``grad``)."""
    return ACTIVATIONS.tag(kind, layer)


def typed_layer(name: str, kind: str, param: str = "") -> str:
    """A layer as the ``<layer>`` / ``<param>`` segment of a tag: its name and module type (and
    the parameter's own name), ASCII without spaces, as ``layer_label`` writes ``net.3 (Conv2d)``.

    Example:
        >>> typed_layer("net.3", "Conv2d"), typed_layer("net.3", "Conv2d", "weight")
        ('net.3_Conv2d', 'net.3_Conv2d.weight')
        >>> typed_layer("", "Net", "scale")  # a parameter of the model itself
        'Net.scale'
    """
    layer = f"{name}_{kind}" if name else kind
    return f"{layer}.{param}" if param else layer


ACTIVATIONS_SUMMARY = ACTIVATIONS.tag("summary")


def update_ratio_layer(param: str) -> str:
    """The log10 update ratio of one weight tensor."""
    return UPDATE_RATIO.tag("per_layer_log10", param)


#: The median over weight tensors of the log10 update ratio (sorted before the layers).
UPDATE_RATIO_MEDIAN = UPDATE_RATIO.tag("median_log10")


def update_ratio_layout() -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the update ratios: every weight tensor on one chart."""
    return UPDATE_RATIO.root, {
        "log10 update ratio of every weight tensor (healthy: -3)": [
            update_ratio_layer(".*"), UPDATE_RATIO_MEDIAN]}


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


def ema_comparison(metric: str) -> str:
    """A validation metric per epoch, in :data:`RAW_RUN` (the trained weights) and
    :data:`EMA_RUN` (their average).

    Example:
        >>> ema_comparison("val/acc")
        '7.4_ema/val/acc'
    """
    return EMA.tag(metric)


def ensemble_comparison(metric: str) -> str:
    """A metric ``validation_step`` logs, in :data:`MEMBERS_RUN` (each kept checkpoint at its
    epoch) and :data:`COMBINED_RUN` (their ensemble, at the same epochs)."""
    return ENSEMBLE.tag(metric)


def sweep_curve(lr: float | str) -> str:
    """The smoothed loss curve of one learning rate of the sweep.

    Example:
        >>> sweep_curve(0.01)
        '6_tuning/sweep/lr_1e-02'
    """
    return TUNING.tag("sweep", f"lr_{lr}" if isinstance(lr, str) else f"lr_{lr:.0e}")


TUNING_SWEEP_CHART = TUNING.tag("sweep_chart")
TUNING_SWEEP_TABLE = TUNING.tag("sweep")
TUNING_SUMMARY = TUNING.tag("summary")
#: In a search trial's run: the finding that ended it (diagnosis-guided pruning).
TUNING_TRIAL_ENDED = TUNING.tag("trial_ended_by")


def _exactly(tags: list[str]) -> list[str]:
    """Tags as the regular expressions a custom-scalars chart takes, each matching itself only
    (``lr_1e+00`` holds a ``+``).

    Example:
        >>> print(*_exactly([sweep_curve(1.0)]))
        6_tuning/sweep/lr_1e\\+00
    """
    return [re.escape(t) for t in tags]


def sweep_layout(curves: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the sweep: all its curves on one chart."""
    return TUNING.root, {"sweep: smoothed training loss per learning rate": _exactly(curves)}


def refine_curve(rank: int | str) -> str:
    """The monitored metric per epoch of the refined configuration of this rank."""
    return TUNING.tag("refine", f"rank_{rank}")


def refine_layout(monitor: str, curves: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The custom-scalars category of the refinement: its curves on one chart."""
    return TUNING.root, {f"refine: {monitor} per epoch": _exactly(curves)}


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
        runs: The sibling runs (:data:`SIBLING_RUNS`) it is written in, one series each;
            empty: the run itself.
    """

    writer: str
    kind: Kind
    pattern: str
    description: str
    condition: str = ""
    charts: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()

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
             charts: tuple[str, ...] = (), runs: tuple[str, ...] = ()) -> TagSpec:
        return TagSpec(family.writer, kind, pattern, description, condition, charts, runs)

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
    split_runs = (TRAIN_RUN, VALIDATION_RUN)
    ensemble = f">= 2 kept checkpoints, {validation}"
    return (
        spec(FINDINGS, "text", FINDINGS_TABLE, "every finding of the run (all callbacks) in one "
             "table, diagnosis first, then FAIL, WARN, INFO (`sort_findings`), with value, "
             "expected range, step and advice; rewritten at the step of each new finding "
             "(the Text dashboard shows the latest step on top)", "when there are findings"),
        spec(CURVES, "scalar", curve("loss"), "loss per epoch (step = epoch): training in run "
             "`train`, validation in run `validation`", "the module logs `train_loss` and/or "
             f"`val_loss` (any common name; validation {validation})", runs=split_runs),
        spec(CURVES, "scalar", curve("accuracy"), "accuracy per epoch, training and validation "
             "in their runs as for the loss", "the module logs `train_acc` and/or `val_acc`",
             runs=split_runs),
        spec(CURVES, "scalar", CURVES_GAP, "training minus validation accuracy; step = epoch",
             "both accuracies are logged"),
        spec(CURVES, "image", CURVES_FIGURE, "loss and accuracy, train and val on one panel "
             "each (also `learning_curves.png`)"),
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
        spec(OVERFIT, "scalar", OVERFIT_LOSS, "loss on the small sample; step = overfit step"),
        spec(OVERFIT, "scalar", OVERFIT_ACCURACY, "accuracy on the small sample; step = "
             "overfit step", "classification: classes per sample, pixel or token, or 0/1 "
             "labels"),
        spec(OVERFIT, "scalar", overfit_ladder("<lr>"), "loss on the small sample at one "
             "learning rate of the ladder; step = overfit step", "the configured rate did not "
             "overfit"),
        layout(OVERFIT, overfit_ladder_layout([]), "the configured rate did not overfit"),
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
        spec(FIRST_LAYER, "image", FIRST_LAYER_FILTERS, "the first layer's filters, each "
             "normalized, as a grid (also `first_layer_step<N>.png`)", "a Conv2d, or a Linear "
             "on images of `input_shape`"),
        spec(UPDATE_RATIO, "scalar", UPDATE_RATIO_MEDIAN, "log10 of the median over weight "
             "tensors of ||dw|| / ||w|| (healthy: about -3; -inf: no update)"),
        spec(UPDATE_RATIO, "scalar", update_ratio_layer("<param>"), "log10 ||dw|| / ||w|| of "
             "one weight tensor (2 or more dimensions)"),
        spec(UPDATE_RATIO, "scalar", UPDATE_RATIO_MEDIAN, "the recipe's healthy value, -3 "
             "(1e-3), as a line on the median's chart", runs=(GUIDE_RUN,)),
        spec(UPDATE_RATIO, "scalar", update_ratio_layer("<param>"), "-3, as a line on each "
             "weight tensor's chart", runs=(GUIDE_RUN,)),
        layout(UPDATE_RATIO, update_ratio_layout()),
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
        spec(TUNING, "text", TUNING_TRIAL_ENDED, "the finding that ended a search trial early; "
             "run `<run_dir>/search/trial_<n>`", "`random_search(diagnose=True)` pruned it"),
        layout(TUNING, refine_layout("<monitor>", []), "`tune`"),
        spec(ENSEMBLE, "scalar", ensemble_comparison("<metric>"), "every metric "
             "`validation_step` logs: each kept checkpoint at its epoch (run `members`, oldest "
             "first) and their ensemble at the same epochs (run `combined`), at fit end",
             ensemble, runs=(MEMBERS_RUN, COMBINED_RUN)),
        spec(EMA, "scalar", ema_comparison("<metric>"), "every validation metric per epoch: "
             "the trained weights in run `raw`, their average in run `ema`",
             f"`evaluate=\"both\"`, {validation}", runs=(RAW_RUN, EMA_RUN)),
        TagSpec(EMA.writer, "scalar", ema_metric("<metric>"), "the same average's metric, "
                "logged through Lightning (every logger; `ModelCheckpoint` can monitor it)",
                f"`evaluate=\"both\"`, {validation}"),
    )


#: Every tag lightning_diag writes, in recipe order.
TAGS: tuple[TagSpec, ...] = _specs()


def declared(writer: str) -> list[TagSpec]:
    """The tags ``writer`` may write: its own and, for a callback, the findings table."""
    own = [s for s in TAGS if s.writer == writer]
    if writer in WRITERS and writer != TUNING.writer:
        own += [dataclasses.replace(s, writer=writer) for s in TAGS
                if s.writer == EVERY_DIAGNOSTIC]
    return own


def find(tag: str, kind: Kind, writer: str | None = None, run: str = "") -> TagSpec | None:
    """The declaration ``tag`` of this kind matches (among ``writer``'s when given) in the
    sibling run ``run`` (``""``: the run itself), or None."""
    specs = declared(writer) if writer is not None else TAGS
    return next((s for s in specs if s.kind == kind and s.matches(tag)
                 and (run in s.runs if run else not s.runs)), None)


# -- the generated documentation --------------------------------------------------------------
_BEGIN = ("<!-- tag table: generated from lightning_diag/tensorboard/tags.py by `make tag-table`; "
          "do not edit -->")
_END = "<!-- end of tag table -->"


def tag_table() -> str:
    """The markdown table of :data:`TAGS`, as docs/tensorboard.md holds it.

    Example:
        >>> print(tag_table().splitlines()[0])
        | tag | kind | run | written by | when | what |
    """
    kinds = {"layout": "custom scalars"}
    rows = [[f"`{s.pattern}`", kinds.get(s.kind, s.kind),
             ", ".join(f"`{r}`" for r in s.runs) or ".",
             f"`{s.writer}`" if s.writer in WRITERS else s.writer,
             s.condition or "always", s.description] for s in TAGS]
    return markdown_table(["tag", "kind", "run", "written by", "when", "what"], rows)


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

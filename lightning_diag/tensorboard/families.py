"""The names of every TensorBoard tag lightning_diag writes: the groups (:class:`Family`), the
sibling runs and the builders the writers call. :mod:`lightning_diag.tensorboard.tags` declares
them (and re-exports every name here: import them from there).

TensorBoard groups tags by their first path component, sorts the groups by name and opens only
the first two, on every dashboard. So each writer's tags live under one root (:class:`Family`)
named after its step of the recipe, numbered as docs/workflow.md numbers them (``1_data``,
``2_gradient_check``, ``5.3_activations``, ...), so that the groups come in recipe order and
before the user's own metrics (letters sort after digits). Two roots are numbered 0 because
they are what to read first: ``0_curves`` (the learning curves of step 5.1-5.2: is the loss
going down, do train and validation part, and next to them the number of FAIL and WARN findings)
and ``0_findings`` (the one table of every finding).

Series to compare (train vs validation, the EMA weights vs the trained ones, a ratio vs the
recipe's healthy value) are the same tag written in *sibling runs*: sub-directories of the
run's log directory named in :data:`SIBLING_RUNS`, as Keras' TensorBoard callback writes
``train/`` and ``validation/``. TensorBoard draws each run in its own colour on one chart, on
every dashboard; :mod:`~lightning_diag.tensorboard.events` reads them back as series of their
parent run. There are at most four, so that two runs side by side (ten runs) get distinct
colours on every chart (:class:`~lightning_diag.tensorboard.writer.SiblingRuns`).

Example:
    >>> curve("loss"), TRAIN_RUN, VALIDATION_RUN
    ('0_curves/loss', 'train', 'validation')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ACTIVATIONS", "ACTIVATIONS_SUMMARY", "CURVES", "CURVES_FIGURE", "CURVES_GAP", "DATA",
    "DATA_CLASS_COUNTS", "DATA_SUMMARY", "EMA", "EMA_RUN", "EMA_SUFFIX", "ENSEMBLE",
    "ENSEMBLE_FIGURE", "EVERY_DIAGNOSTIC", "FINDINGS", "FINDINGS_CARD", "FINDINGS_TABLE",
    "FIRST_LAYER", "FIRST_LAYER_FILTERS", "Family", "GRADIENT_CHECK", "GRADIENT_CHECK_ERRORS",
    "GUIDE_RUN", "Kind", "OVERFIT", "OVERFIT_ACCURACY", "OVERFIT_LOSS", "ROOTS", "SIBLING_RUNS",
    "TRAIN_RUN", "TUNING", "TUNING_SUMMARY", "TUNING_SWEEP_CHART", "TUNING_SWEEP_TABLE",
    "TUNING_TRIAL_ENDED", "UPDATE_RATIO", "UPDATE_RATIO_MEDIAN", "VALIDATION_RUN", "WRITERS",
    "activation_histogram", "activation_stat", "curve", "data_grid", "ema_comparison",
    "ema_metric", "learning_rate", "overfit_ladder", "overfit_ladder_layout", "raw_metric",
    "refine_curve", "refine_layout", "sweep_curve", "sweep_layout", "typed_layer",
    "update_ratio_layer", "update_ratio_layout",
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

#: The sibling runs (sub-directories of the run's log directory) series to compare go to. The
#: trained weights' validation metrics are the ``validation`` run's, next to the EMA weights'.
TRAIN_RUN, VALIDATION_RUN, EMA_RUN = "train", "validation", "ema"
#: The recipe's healthy update ratio, drawn as a line of its own on each update-ratio chart.
GUIDE_RUN = "healthy_1e-3"
#: In the order TensorBoard lists them after their run (each dated a millisecond after the
#: one before: :func:`~lightning_diag.tensorboard.writer.sibling_start`). TensorBoard colours
#: the runs it lists from a palette of 7, in that order; two runs of ``1 + k`` runs each give
#: the same colour to places ``i`` and ``i + 7 - (1 + k)``, so the runs that share a chart
#: (the run and the guide, train and validation, validation and EMA) stand next to each other:
#: never ``6 - k`` places apart.
SIBLING_RUNS = (GUIDE_RUN, TRAIN_RUN, VALIDATION_RUN, EMA_RUN)


# -- the builders the writers call ------------------------------------------------------------
#: Every finding of the run, all callbacks, in one markdown table, written again as it changes.
FINDINGS_TABLE = FINDINGS.tag("table")


#: The card that says whether anything failed (an image: Time Series does not smooth it),
#: in the first group TensorBoard opens on, the curves' (what to read first), sorted next to
#: the accuracy chart.
FINDINGS_CARD = CURVES.tag("findings")

DATA_SUMMARY = DATA.tag("summary")
DATA_CLASS_COUNTS = DATA.tag("class_counts")


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


def learning_rate(group: str) -> str:
    """The learning rate of one optimizer's parameter group per epoch, next to the curves it
    explains (the diagnosis often blames it).

    Example:
        >>> learning_rate("Adam"), learning_rate("SGD_1.group2")
        ('0_curves/learning_rate/Adam', '0_curves/learning_rate/SGD_1.group2')
    """
    return CURVES.tag("learning_rate", group)
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
    """A validation metric per epoch, in :data:`VALIDATION_RUN` (the trained weights) and
    :data:`EMA_RUN` (their average).

    Example:
        >>> ema_comparison("val/acc")
        '7.4_ema/val/acc'
    """
    return EMA.tag(metric)


#: Every metric ``validation_step`` logs, each kept checkpoint against their ensemble, as bars
#: (a few numbers measured once: a line chart would smooth them into one).
ENSEMBLE_FIGURE = ENSEMBLE.tag("members_vs_ensemble")


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

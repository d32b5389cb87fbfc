"""Every TensorBoard tag lightning_diag writes, declared in this one module.

Writers (the callbacks, the run record for the findings table and counts, and
:mod:`lightning_diag.tuning`) build their tags with the functions and constants of
:mod:`lightning_diag.tensorboard.families` (all importable from here), never from literals;
:data:`TAGS` declares, per writer, every tag it writes and on what condition; the HTML report
picks its tags by the same roots; docs/tensorboard.md holds the table :func:`tag_table`
generates from :data:`TAGS`, and ``tests/test_tags.py`` runs every callback and compares the
tags written with the declarations.

Example:
    >>> spec = find("5.3_activations/dead_fraction/net.2", "scalar")
    >>> spec.writer, spec.pattern, spec.conditional
    ('ActivationHistogram', '5.3_activations/dead_fraction/<layer>', False)
    >>> find(curve("loss"), "scalar", run="train").runs
    ('train', 'validation')
    >>> [s.pattern for s in declared("InitialLossCheck")]  # only the findings table and card
    ['0_findings/table', '0_curves/findings']
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import cached_property

from lightning_diag.functional.monitors import STAT_NAMES
from lightning_diag.markdown import markdown_table, replace_between
from lightning_diag.tensorboard.families import (
    ACTIVATIONS,
    ACTIVATIONS_SUMMARY,
    CURVES,
    CURVES_FIGURE,
    CURVES_GAP,
    DATA,
    DATA_CLASS_COUNTS,
    DATA_SUMMARY,
    EMA,
    EMA_RUN,
    EMA_SUFFIX,
    ENSEMBLE,
    ENSEMBLE_FIGURE,
    EVERY_DIAGNOSTIC,
    FINDINGS,
    FINDINGS_CARD,
    FINDINGS_TABLE,
    FIRST_LAYER,
    FIRST_LAYER_FILTERS,
    GRADIENT_CHECK,
    GRADIENT_CHECK_ERRORS,
    GUIDE_RUN,
    OVERFIT,
    OVERFIT_ACCURACY,
    OVERFIT_LOSS,
    ROOTS,
    SIBLING_RUNS,
    TRAIN_RUN,
    TUNING,
    TUNING_SUMMARY,
    TUNING_SWEEP_CHART,
    TUNING_SWEEP_TABLE,
    TUNING_TRIAL_ENDED,
    UPDATE_RATIO,
    UPDATE_RATIO_MEDIAN,
    VALIDATION_RUN,
    WRITERS,
    Family,
    Kind,
    activation_histogram,
    activation_stat,
    curve,
    data_grid,
    ema_comparison,
    ema_metric,
    learning_rate,
    overfit_ladder,
    overfit_ladder_layout,
    raw_metric,
    refine_curve,
    refine_layout,
    sweep_curve,
    sweep_layout,
    typed_layer,
    update_ratio_layer,
    update_ratio_layout,
)

__all__ = [
    "ACTIVATIONS", "ACTIVATIONS_SUMMARY", "CURVES", "CURVES_FIGURE", "CURVES_GAP", "DATA",
    "DATA_CLASS_COUNTS", "DATA_SUMMARY", "EMA", "EMA_RUN", "EMA_SUFFIX", "ENSEMBLE",
    "ENSEMBLE_FIGURE", "EVERY_DIAGNOSTIC", "FINDINGS", "FINDINGS_CARD", "FINDINGS_TABLE",
    "FIRST_LAYER", "FIRST_LAYER_FILTERS", "Family", "GRADIENT_CHECK", "GRADIENT_CHECK_ERRORS",
    "GUIDE_RUN", "Kind", "OVERFIT", "OVERFIT_ACCURACY", "OVERFIT_LOSS", "ROOTS", "SIBLING_RUNS",
    "TAGS", "TRAIN_RUN", "TUNING", "TUNING_SUMMARY", "TUNING_SWEEP_CHART", "TUNING_SWEEP_TABLE",
    "TUNING_TRIAL_ENDED", "TagSpec", "UPDATE_RATIO", "UPDATE_RATIO_MEDIAN", "VALIDATION_RUN",
    "WRITERS", "activation_histogram", "activation_stat", "curve", "data_grid", "declared",
    "ema_comparison", "ema_metric", "find", "learning_rate", "overfit_ladder",
    "overfit_ladder_layout", "raw_metric", "refine_curve", "refine_layout", "replace_table",
    "sweep_curve", "sweep_layout", "tag_table", "typed_layer", "update_ratio_layer",
    "update_ratio_layout",
]

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
             "expected range, step and advice; written again at the step of a new or worse "
             "finding and at the end of the fit, never twice the same (the Text dashboard shows "
             "the latest step on top)", "when there are findings"),
        TagSpec(FINDINGS.writer, "image", FINDINGS_CARD, "the number of FAIL, WARN and INFO "
                "findings (the diagnosis left out), the diagnosis' likely causes and the FAIL "
                "and WARN codes: the first cards TensorBoard opens on say whether anything "
                "failed; written again when it changes, and at the end of the fit",
                "when the fit ends, and when a finding is new or worse"),
        spec(CURVES, "scalar", curve("loss"), "loss per epoch (step = epoch): training in run "
             "`train`, validation in run `validation`", "the module logs `train_loss` and/or "
             f"`val_loss` (any common name; validation {validation})", runs=split_runs),
        spec(CURVES, "scalar", curve("accuracy"), "accuracy per epoch, training and validation "
             "in their runs as for the loss", "the module logs `train_acc` and/or `val_acc`",
             runs=split_runs),
        spec(CURVES, "scalar", CURVES_GAP, "training minus validation accuracy; step = epoch",
             "both accuracies are logged"),
        spec(CURVES, "scalar", learning_rate("<group>"), "the learning rate of each "
             "optimizer's parameter group as each epoch starts (step = epoch); `<group>`: "
             "the optimizer's class (`_<k>` for the k-th of one class), `.group<j>` when it "
             "has several groups"),
        spec(CURVES, "image", CURVES_FIGURE, "loss and accuracy, train and val on one panel "
             "each (also `learning_curves.png`)"),
        spec(DATA, "text", DATA_SUMMARY, "every count of the inspection, per set"),
        spec(DATA, "image", DATA_CLASS_COUNTS, "bar chart of the samples per class, train "
             "next to validation", labelled),
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
        spec(ENSEMBLE, "image", ENSEMBLE_FIGURE, "every metric `validation_step` logs, as "
             "bars with their values: each kept checkpoint (by its epoch, oldest first) and "
             "their ensemble, at fit end", ensemble),
        spec(EMA, "scalar", ema_comparison("<metric>"), "every validation metric per epoch: "
             "the trained weights in run `validation` (as the curves), their average in run "
             "`ema`", f"`evaluate=\"both\"`, {validation}", runs=(VALIDATION_RUN, EMA_RUN)),
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
_BEGIN = ("<!-- tag table: generated from lightning_diag/tensorboard/tags.py when the docs are "
          "built (docs/hooks/generated.py) -->")
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
    """``doc`` with the text between the tag-table markers replaced by :func:`tag_table` (the
    docs build's hook fills ``docs/tensorboard.md`` with it).

    Raises:
        ValueError: the markers are missing.
    """
    return replace_between(doc, _BEGIN, _END, tag_table())



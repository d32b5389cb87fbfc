"""Every finding code lightning_diag emits, declared once: its check, severity range, meaning,
recipe step, what its value measures, and what the run-level readers make of it.

Codes are a public contract: the diagnosis (:mod:`lightning_diag.checks.diagnosis`: the root
cause each code points at, :attr:`CodeSpec.cause`), the search's pruning
(:data:`lightning_diag.tuning.pruning.PRUNING_CODES`: :attr:`CodeSpec.ends_trial`), the
presentation of a finding (:mod:`lightning_diag.presentation`: :attr:`CodeSpec.value` and
:attr:`CodeSpec.percent`), ``docs/codes.md`` (:func:`code_table`, filled in at the docs build)
and users' CI gates read them. ``tests/test_codes.py`` runs every callback and checks that each
code it emits is declared here, for its check, within the declared severities.

A check owns one family of codes, ``<slug>.<what>`` (:data:`FAMILIES`); ``ActivationHistogram``
owns two, ``activations.*`` and ``gradients.*``. Every callback also has some of the
:data:`GENERIC` codes: ``<slug>.error`` (an error inside the library, see
:class:`~lightning_diag.base.DiagnosticCallback`), ``.user_error``, ``.skipped`` and
``.no_tensorboard``. Codes not declared here (your own ``DiagnosticCallback`` subclasses) are
read by their suffix: a generic suffix is not a training problem, anything else at WARN or FAIL
is one (cause ``other``).

Example:
    >>> spec("data.leakage").check, spec("data.leakage").cause, spec("data.leakage").percent
    ('DataInspection', 'data', True)
    >>> spec("gradients.vanishing").check
    'ActivationHistogram'
    >>> spec("my_check.error").cause, spec("my_check.odd") is None
    ('', True)
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_diag.markdown import markdown_table, replace_between
from lightning_diag.severity import Severity

__all__ = ["CODES", "DIAGNOSIS_PREFIX", "FAMILIES", "GENERIC", "CodeSpec", "code_table",
           "declared_codes", "replace_table", "spec"]

INFO, W, F = Severity.INFO, Severity.WARN, Severity.FAIL

#: Codes under this prefix are the combined diagnosis of a run: it heads every listing.
DIAGNOSIS_PREFIX = "diagnosis."


@dataclass(frozen=True)
class CodeSpec:
    """One finding code.

    Attributes:
        code: ``<family>.<what>``.
        check: The callback (class name) that emits it; the diagnosis is ``Diagnosis``.
        lowest: The lowest severity it is emitted at.
        highest: The highest severity it is emitted at.
        meaning: What it says, in one line.
        step: The recipe step it belongs to (docs/workflow.md), e.g. ``"5.3"``.
        value: What the finding's ``value`` measures, as a label for the number; empty when it
            has none or the number needs no label.
        percent: The value is a fraction, shown as a percentage.
        cause: The root cause of the diagnosis it points at (a key of
            :data:`~lightning_diag.checks.diagnosis.CAUSES`); empty: not a training problem
            (an INFO reading, a check that could not run), never part of the diagnosis.
        fix: What to do, as the diagnosis' next step lists it (data and implementation causes).
        ends_trial: Why a search trial that meets it as a WARN is hopeless; empty: it does not
            end one (any FAIL does). Irreversible evidence only, each measured to end no trial
            that finishes within 1 point of its search's best
            (``benchmarks/results/pruning_rules.md``).
        reasons: ``(reason, cause, fix)`` for findings of this code whose
            ``details["reason"]`` is ``reason``: they point at that cause instead
            (:meth:`routed`), e.g. an initial loss below 0 is no initialization problem.
    """

    code: str
    check: str
    lowest: Severity
    highest: Severity
    meaning: str
    step: str
    value: str = ""
    percent: bool = False
    cause: str = ""
    fix: str = ""
    ends_trial: str = ""
    reasons: tuple[tuple[str, str, str], ...] = ()

    def allows(self, severity: Severity) -> bool:
        """Whether ``severity`` is within the declared range."""
        return self.lowest <= severity <= self.highest

    def routed(self, reason: object = None) -> tuple[str, str]:
        """The cause and fix of a finding of this code whose ``details["reason"]`` is
        ``reason``: those of :attr:`reasons` when it names it, else :attr:`cause` and
        :attr:`fix`.

        Example:
            >>> spec("initial_loss.mismatch").routed("negative")[0]
            'implementation'
            >>> spec("initial_loss.mismatch").routed()[0]
            'initialization'
        """
        return next(((c, f) for r, c, f in self.reasons if r == reason), (self.cause, self.fix))


#: The codes every callback may have, by suffix: (severity, meaning). Not training problems.
GENERIC: dict[str, tuple[Severity, str]] = {
    "error": (W, "an error inside lightning_diag; the check is off for the rest of the fit"),
    "user_error": (W, "your code, called by the check on a copy, raised; the check stepped aside"),
    "skipped": (INFO, "the check did not run, and says why"),
    "no_tensorboard": (INFO, "no TensorBoardLogger: images, texts and histograms are skipped"),
}

_CORRUPT = "repair or remove the corrupted samples"
_DUPLICATES = "remove the duplicates"
_RATE = "median update ratio"


def _declarations() -> tuple[CodeSpec, ...]:
    def c(code: str, check: str, lowest: Severity, highest: Severity, meaning: str, step: str,
          **kw: str | bool | tuple[tuple[str, str, str], ...]) -> CodeSpec:
        return CodeSpec(code, check, lowest, highest, meaning, step, **kw)  # type: ignore[arg-type]

    def generic(check: str, slug: str, step: str, *suffixes: str) -> list[CodeSpec]:
        return [c(f"{slug}.{s}", check, GENERIC[s][0], GENERIC[s][0], GENERIC[s][1], step)
                for s in ("error", *suffixes)]

    data, grad, init, over = "DataInspection", "GradientCheck", "InitialLossCheck", \
        "OverfitSmallBatch"
    curves, act, first, ratio = "LearningCurves", "ActivationHistogram", \
        "FirstLayerVisualization", "UpdateRatioMonitor"
    adv, ema, ens = "LRPlateauAdvisor", "EMAWeights", "CheckpointEnsemble"
    inv = "TrainingInvariants"
    return (
        c("diagnosis.summary", "Diagnosis", W, F, "the likely root causes of every problem found, "
          "in the order to fix them", "all"),
        c("data.summary", data, INFO, INFO, "what was inspected, per split", "1"),
        c("data.sampled", data, INFO, INFO, "a seeded random subset was inspected (`max_samples`)",
          "1", value="samples inspected"),
        c("data.no_labels", data, INFO, INFO, "no integer class per sample: label checks skipped",
          "1"),
        c("data.unreadable", data, F, F, "samples that raise in `__getitem__` or hold no "
          "readable input", "1", value="samples", cause="data", fix=_CORRUPT),
        c("data.non_finite", data, F, F, "inputs holding NaN or Inf", "1", value="inputs",
          cause="data", fix=_CORRUPT),
        c("data.constant_input", data, W, W, "constant (blank) inputs", "1", value="inputs",
          cause="data", fix=_CORRUPT),
        c("data.mixed_shapes", data, INFO, INFO, "inputs of another shape than the first one, left "
          "out of the duplicate search", "1", value="inputs"),
        c("data.exact_duplicate", data, W, W, "groups of identical inputs", "1", value="groups",
          cause="data", fix=_DUPLICATES),
        c("data.near_duplicates_skipped", data, INFO, INFO, "near duplicates not searched (inputs "
          "a similarity cannot judge, such as short token sequences); exact ones still are",
          "1"),
        c("data.near_duplicate", data, W, W, "groups of near-identical inputs", "1",
          value="groups", cause="data", fix=_DUPLICATES),
        c("data.conflicting_labels", data, W, W, "identical inputs with different labels", "1",
          value="groups", cause="data", fix="fix the conflicting labels"),
        c("data.label_out_of_range", data, F, F, "labels outside [0, C)", "1",
          value="labels out of range", cause="data", fix="fix the out-of-range labels"),
        c("data.class_imbalance", data, W, W, "the commonest class far outnumbers the rarest",
          "1", value="commonest / rarest class", cause="data",
          fix="collect or re-weight the rare classes"),
        c("data.class_absent", data, INFO, INFO, "classes a split has no sample of that another "
          "split holds", "1", value="classes"),
        c("data.leakage", data, W, F, "validation samples that repeat training ones", "1",
          value="share of the validation set", percent=True, cause="data",
          fix="take the leaked samples out of one split (until then validation overstates "
              "accuracy)"),
        *generic(data, "data", "1", "user_error", "skipped", "no_tensorboard"),
        c("gradient_check.ok", grad, INFO, INFO, "analytic and numerical gradients agree", "2",
          value="worst relative error"),
        c("gradient_check.mismatch", grad, F, F, "analytic and numerical gradients disagree",
          "2", value="worst relative error", cause="implementation",
          fix="the analytic gradient disagrees with the numerical one (a custom backward, an "
              "in-place or non-differentiable operation)"),
        c("gradient_check.inconclusive", grad, INFO, W, "too few comparisons, a loss that is "
          "not reproducible at the same weights (WARN), or a step that computes below float64 "
          "(INFO)", "2", value="worst relative error", cause="other"),
        c("gradient_check.non_finite", grad, F, F, "the loss is NaN or Inf on the first "
          "samples", "2", cause="implementation",
          fix="the loss is NaN/Inf on the first samples (log(0), a division by zero)"),
        *generic(grad, "gradient_check", "2", "user_error", "skipped", "no_tensorboard"),
        c("initial_loss.ok", init, INFO, INFO, "the initial loss is the expected one", "3",
          value="initial loss"),
        c("initial_loss.mismatch", init, F, F, "the initial loss is far from the expected one",
          "3", value="initial loss", cause="initialization",
          reasons=(("negative", "implementation", "the loss at a uniform prediction is below 0: "
                    "no cross-entropy (`nll_loss` given probabilities, not log-probabilities)"),
                   )),
        c("initial_loss.collapsed", init, W, W, "every initial prediction is one class", "3",
          value="mean max-probability", cause="initialization"),
        c("initial_loss.non_finite", init, F, F, "the initial loss is NaN or Inf", "3",
          cause="implementation",
          fix="the loss is NaN/Inf at initialization (log(0), a division by zero)"),
        c("initial_loss.summed", init, INFO, INFO, "the loss sums over the samples: judged per "
          "sample; the learning rate then scales with the batch size", "3",
          value="doubled-batch loss ratio"),
        c("initial_loss.no_expectation", init, INFO, INFO, "no expected initial loss can be "
          "inferred (pass `expected_loss=`)", "3", value="initial loss"),
        c("initial_loss.regularization", init, INFO, INFO, "the regularization found, or why none "
          "was checked", "3"),
        c("initial_loss.reg_not_increasing", init, F, F, "the loss does not rise with the "
          "regularization strength", "3", cause="implementation",
          fix="the loss does not rise with the regularization strength: the term is not in the "
              "loss"),
        c("initial_loss.optimizer_error", init, W, W, "the optimizer could not be built on a "
          "copy to read its weight decay", "3", cause="other"),
        *generic(init, "initial_loss", "3", "user_error", "skipped"),
        c("overfit.reached", over, INFO, INFO, "the net memorizes a small sample", "4",
          value="best loss"),
        c("overfit.not_reached", over, W, F, "no learning rate tried overfits a small sample",
          "4", value="best loss", cause="implementation",
          fix="no learning rate overfits a small sample: look at the loss (no softmax before "
              "cross-entropy), the labels and the data pipeline"),
        c("overfit.non_finite", over, W, F, "the loss became NaN or Inf on the small sample",
          "4", value="best loss", cause="implementation",
          fix="no learning rate overfits a small sample: look at the loss (no softmax before "
              "cross-entropy), the labels and the data pipeline"),
        c("overfit.floor", over, INFO, INFO, "the loss stops at a floor of the data or of the "
          "capacity, after learning from the inputs: not a bug", "4", value="best loss"),
        c("overfit.slow", over, INFO, INFO, "the sample is not memorized within the budget, but "
          "the loss still falls steadily and its trend reaches the target within one more "
          "budget: slow, not stuck", "4", value="best loss"),
        *generic(over, "overfit", "4", "user_error", "skipped"),
        c("curves.keys", curves, INFO, INFO, "the metric names the curves are read from", "5.1"),
        c("curves.missing_keys", curves, INFO, INFO, "curves skipped: their metric is not logged",
          "5.1"),
        c("curves.summary", curves, INFO, INFO, "the last epoch's losses and accuracies", "5.1",
          value="last value"),
        *generic(curves, "curves", "5.1", "no_tensorboard"),
        c("activations.dead_units", act, W, W, "most units of a layer are dead", "5.3",
          value="dead units", percent=True, cause="gradient_flow"),
        c("activations.saturation", act, W, W, "most units of a bounded layer are saturated",
          "5.3", value="saturated units", percent=True, cause="gradient_flow"),
        c("activations.summary", act, INFO, INFO, "the worst dead and saturated fractions and the "
          "gradient ratio", "5.3", value="worst dead fraction", percent=True),
        c("gradients.vanishing", act, W, W, "the gradient vanishes before the first layers",
          "5.3", value="gradient RMS ratio first/last layer", cause="gradient_flow"),
        c("gradients.exploding", act, W, W, "the gradient grows towards the first layers",
          "5.3", value="gradient RMS ratio first/last layer", cause="lr_high"),
        *generic(act, "activations", "5.3", "no_tensorboard"),
        c("invariants.grad_not_zeroed", inv, W, F, "the gradient is not cleared between two "
          "optimizer steps (FAIL: it still holds the previous step's)", "5",
          value="gradient norm carried over", cause="implementation",
          fix="the gradients pile up across optimizer steps: call `optimizer.zero_grad()` once "
              "per step"),
        c("invariants.param_not_in_optimizer", inv, W, W, "trainable parameters that get a "
          "gradient but are in no optimizer", "5", value="parameters", cause="implementation",
          fix="trainable parameters are in no optimizer: pass them in `configure_optimizers` "
              "(or freeze them with `requires_grad_(False)`)"),
        c("invariants.param_not_updated", inv, W, W, "parameters with a gradient that the "
          "optimizer step leaves unchanged", "5", value="parameters", cause="implementation",
          fix="the optimizer step leaves parameters with a gradient unchanged (a hand-written "
              "update that rebinds a name, a weight reassigned after each step)"),
        c("invariants.eval_mode_in_training", inv, W, W, "the trained part of the model is in "
          "eval mode at an optimizer step", "5", value="layers", cause="implementation",
          fix="the model trains in eval mode: call `self.train()` after evaluating inside "
              "training code"),
        c("invariants.metric_out_of_range", inv, W, W, "a logged bounded metric outside its "
          "range", "5", value="worst value", cause="implementation",
          fix="a logged accuracy or other bounded metric is outside [0, 1]: divide by the "
              "number of samples, on one scale"),
        c("invariants.epoch_loss_inconsistent", inv, W, W, "a logged epoch loss no longer the "
          "mean of its step losses", "5", value="epoch loss", cause="implementation",
          fix="the logged epoch loss is not the mean of its step losses: reset a running sum "
              "each epoch (or log the step loss with `on_epoch=True`)"),
        c("invariants.target_leak", inv, W, W, "the input holds the target and the loss "
          "collapsed early", "5", value="loss / initial loss", percent=True, cause="data",
          fix="the inputs hold the target: feed the model what precedes it (a window or "
              "sequence shifted by one, a feature that is the target, or a loss that scores a "
              "position on the token it reads)"),
        c("invariants.summary", inv, INFO, INFO, "what each invariant looked at, and which "
          "stepped aside", "5", value="problems found"),
        *generic(inv, "invariants", "5"),
        c("first_layer.summary", first, INFO, INFO, "the first layer's filters drawn", "5.4",
          value="filters"),
        c("first_layer.not_found", first, INFO, INFO, "no first layer to draw", "5.4"),
        *generic(first, "first_layer", "5.4", "no_tensorboard"),
        c("update_ratio.too_high", ratio, W, W, "updates too large for the weights", "5.5",
          value=_RATE, cause="lr_high", ends_trial="an update as large as the weights"),
        c("update_ratio.too_low", ratio, W, W, "updates too small for the weights", "5.5",
          value=_RATE, cause="lr_low"),
        c("update_ratio.zero_updates", ratio, W, W, "no weight moves", "5.5",
          value="weight tensors without an update", cause="implementation",
          fix="no weight moves: check `requires_grad`, the optimizer's parameters and "
              "`detach()`", ends_trial="no weight moves"),
        c("update_ratio.summary", ratio, INFO, INFO, "the run's median update ratio", "5.5",
          value=_RATE),
        *generic(ratio, "update_ratio", "5.5"),
        c("advisor.keys", adv, INFO, INFO, "the metric names the advisor reads", "6.4"),
        c("advisor.divergence", adv, W, F, "the step loss jumped (WARN) or became NaN/Inf "
          "(FAIL)", "6.4", value="step loss", cause="lr_high"),
        c("advisor.stalled", adv, W, W, "the step loss does not move", "6.4",
          value="drop of the step loss", percent=True, cause="other"),
        c("advisor.plateau", adv, W, W, "the loss plateaus while still high", "6.4",
          value="best loss", cause="plateau"),
        c("advisor.underfit", adv, W, W, "both curves high and close", "6.4", cause="underfit"),
        c("advisor.overfit", adv, W, W, "training pulls away from validation", "6.4",
          cause="overfit"),
        c("advisor.summary", adv, INFO, INFO, "the plateau counter and what was reported", "6.4",
          value="epochs without improvement"),
        *generic(adv, "advisor", "6.4"),
        c("ensemble.gain", ens, INFO, INFO, "the ensemble of kept checkpoints against its best "
          "member", "7.3", value="gain over the best member"),
        c("ensemble.no_monitor", ens, INFO, INFO, "the monitored metric was never logged", "7.3"),
        c("ensemble.ignored_paths", ens, INFO, INFO, "the kept list of the checkpoint resumed "
          "from names files outside this callback's directory: left alone", "7.3"),
        *generic(ens, "ensemble", "7.3", "user_error", "skipped", "no_tensorboard"),
        c("ema.summary", ema, INFO, INFO, "the averaged weights against the trained ones", "7.4",
          value="EMA minus raw"),
        c("ema.non_finite", ema, W, W, "a non-finite loss or weight: EMA updates skipped", "7.4",
          value="step", cause="other"),
        *generic(ema, "ema", "7.4", "user_error"),
        *generic("DiagnosisPruning", "trial_pruning", "6.2"),
        c("record.byte_budget", "RunRecord", W, W, "the library's files reached their byte "
          "budget: it stopped writing them", "all", value="bytes written"),
    )


#: Every code, in recipe order.
CODES: tuple[CodeSpec, ...] = _declarations()
_BY_CODE = {s.code: s for s in CODES}



#: The code families (the part before the dot) each check owns; the first is its ``slug``.
#: ``ActivationHistogram`` measures the gradient flowing back through the layers as well as
#: their activations, and its ``gradients.*`` codes are a public contract older than this
#: registry: it owns both families. ``tests/test_codes.py`` checks every code against these.
FAMILIES: dict[str, tuple[str, ...]] = {
    "Diagnosis": ("diagnosis",), "DataInspection": ("data",),
    "GradientCheck": ("gradient_check",), "InitialLossCheck": ("initial_loss",),
    "OverfitSmallBatch": ("overfit",), "LearningCurves": ("curves",),
    "ActivationHistogram": ("activations", "gradients"),
    "FirstLayerVisualization": ("first_layer",), "UpdateRatioMonitor": ("update_ratio",),
    "TrainingInvariants": ("invariants",),
    "LRPlateauAdvisor": ("advisor",), "CheckpointEnsemble": ("ensemble",),
    "EMAWeights": ("ema",), "DiagnosisPruning": ("trial_pruning",), "RunRecord": ("record",),
}

def spec(code: str) -> CodeSpec | None:
    """The declaration of ``code``; for an undeclared code with a :data:`GENERIC` suffix, one
    built from it (check unknown); else None."""
    found = _BY_CODE.get(code)
    if found is not None:
        return found
    suffix = code.rpartition(".")[2]
    if suffix in GENERIC and "." in code:
        severity, meaning = GENERIC[suffix]
        return CodeSpec(code, "", severity, severity, meaning, "")
    return None


def declared_codes(check: str) -> list[CodeSpec]:
    """The codes ``check`` (a callback's class name) may emit.

    Example:
        >>> [s.code for s in declared_codes("FirstLayerVisualization")]
        ['first_layer.summary', 'first_layer.not_found', 'first_layer.error', \
'first_layer.no_tensorboard']
    """
    return [s for s in CODES if s.check == check]


# -- the generated documentation --------------------------------------------------------------
_BEGIN = ("<!-- code table: generated from lightning_diag/codes.py when the docs are built "
          "(docs/hooks/generated.py) -->")
_END = "<!-- end of code table -->"


def code_table() -> str:
    """The markdown table of :data:`CODES`, as docs/codes.md holds it.

    Example:
        >>> code_table().splitlines()[0].split(" | ")[:4]
        ['| code', 'check', 'severity', 'recipe step']
    """
    def severity(s: CodeSpec) -> str:
        return s.lowest.name if s.lowest == s.highest else f"{s.lowest.name}-{s.highest.name}"

    def cause(s: CodeSpec) -> str:
        routed = "".join(f"; {c} when the reason is `{r}`" for r, c, _ in s.reasons)
        return (s.cause or "-") + routed

    rows = [[f"`{s.code}`", f"`{s.check}`", severity(s), s.step, s.meaning,
             s.value + (" (%)" if s.percent else "") or "-", cause(s),
             s.ends_trial or "-"] for s in CODES]
    return markdown_table(["code", "check", "severity", "recipe step", "meaning", "value",
                           "diagnosis cause", "ends a search trial"], rows)


def replace_table(doc: str) -> str:
    """``doc`` with the text between the code-table markers replaced by :func:`code_table`
    (the docs build's hook fills ``docs/codes.md`` with it).

    Raises:
        ValueError: the markers are missing.
    """
    return replace_between(doc, _BEGIN, _END, code_table())

"""One diagnosis from every finding of a run: the likely root causes, in the order to fix them,
each with the findings it rests on (their codes) and the recipe's next step.

Each check reports well on its own; read together, their findings can contradict each other
(an underfitting verdict advising a higher learning rate while the update ratio and a
divergence say it is far too high) or report one problem as several (dead units and the
vanishing gradient they cause). :func:`diagnose` groups the problems (WARN and FAIL findings)
by the root cause they point at, folds the symptoms a cause explains into it, drops or rewrites
advice that contradicts a stronger finding, and returns one finding, ``diagnosis.summary``,
which every listing shows first (:func:`lightning_diag.findings.sort_findings`).

The causes come in the recipe's order, which is the order to fix them: each step assumes the
earlier ones pass (data, then the implementation, the initialization, the learning rate, the
gradient flow, and last the reading of the curves). The cause each code points at, and what to
do about it, is declared with the code (:attr:`lightning_diag.codes.CodeSpec.cause` and
``fix``). Every diagnostic callback on a Trainer takes part: the run's record
(:class:`lightning_diag.record.RunRecord`) publishes the diagnosis once, at fit end, after every
callback's own ``on_fit_end``, when the problems come from two checks or more.

Example:
    >>> from lightning_diag.findings import Finding, Severity
    >>> found = [
    ...     Finding("UpdateRatioMonitor", "update_ratio.too_high", Severity.WARN, "ratio 1.31"),
    ...     Finding("ActivationHistogram", "activations.dead_units", Severity.WARN, "84% dead"),
    ...     Finding("LRPlateauAdvisor", "advisor.underfit", Severity.WARN, "train acc 0.43",
    ...             advice="Underfitting: ... perhaps raise the learning rate.")]
    >>> d = diagnose(found)
    >>> d.code, [c["cause"] for c in d.details["causes"]]
    ('diagnosis.summary', ['lr_high'])
    >>> d.details["causes"][0]["explains"]
    ['activations.dead_units', 'advisor.underfit']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lightning_diag.codes import DIAGNOSIS_PREFIX, spec
from lightning_diag.findings import Finding, Severity

__all__ = ["CAUSES", "CHECK", "CODE", "Cause", "causes", "diagnose", "problems"]

CHECK = "Diagnosis"
CODE = f"{DIAGNOSIS_PREFIX}summary"

#: Each cause: its title and the recipe's next step, in the order to fix them.
CAUSES: dict[str, tuple[str, str]] = {
    "data": ("The data has problems (recipe 1)",
             "Look at the data first (recipe 1): {parts}; then train again."),
    "implementation": ("The model, the loss or the training loop is likely wrong (recipes 2-4)",
                       "Fix the implementation before tuning anything: {parts}."),
    "initialization": ("The initialization is off (recipe 3)",
                       "Scale the initialization down, the last layer first, until the initial "
                       "loss matches its expectation (log C for C classes, recipe 3.1); check "
                       "the loss itself (softmax applied twice, wrong labels)."),
    "lr_high": ("The learning rate is too high (recipe 5.5)",
                "Lower the learning rate about 10x{ladder} (the update ratio should be near "
                "1e-3, recipe 5.5), or pick it with the learning-rate sweep (recipe 6.1: "
                "`lightning-diag tune`)."),
    "lr_low": ("The learning rate is too low (recipe 5.5)",
               "Raise the learning rate about 10x{ladder} (the update ratio should be near "
               "1e-3, recipe 5.5), or pick it with the learning-rate sweep (recipe 6.1: "
               "`lightning-diag tune`)."),
    "gradient_flow": ("Dead or saturated units block the gradient (recipe 5.3)",
                      "Check the weight initialization and the nonlinearities (the per-layer "
                      "histograms show where): smaller initial weights, LeakyReLU, "
                      "normalization or residual connections."),
    "overfit": ("The model overfits (recipe 6.4.3)",
                "Add weight decay or other regularization (dropout, augmentation), or get "
                "more data; keep the checkpoint of the best validation loss."),
    "underfit": ("The model underfits (recipe 6.4.2)",
                 "Use a bigger model or train longer; perhaps raise the learning rate."),
    "plateau": ("The loss plateaus while still high (recipe 6.4.1)",
                "Decay the learning rate (x0.1; `LRPlateauAdvisor(act=True)` does it)."),
    "other": ("Other findings", "See each finding's advice: {parts}."),
}
#: When only a divergence says the rate is too high: the recipe's two readings of it (6.4.4).
_DIVERGENCE_ONLY = ("The loss diverged on samples the data inspection did not flag: the "
                    "learning rate is too high, or the model is unstable (recipe 6.4.4)",
                    "Lower the learning rate, look for vanishing or exploding gradients, clip "
                    "gradients; reproduce the step with the batch the advisor saved.")


@dataclass
class Cause:
    """One root cause: the findings it rests on and those it explains (its consequences).

    Attributes:
        key: One of :data:`CAUSES`.
        evidence: The findings it rests on.
        explains: Findings that are its consequences, not causes of their own.
        dropped: Advice of other findings dropped or rewritten because it contradicts this
            cause, each as ``"code: why"``.
    """

    key: str
    evidence: list[Finding] = field(default_factory=list)
    explains: list[Finding] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def severity(self) -> Severity:
        return max((f.severity for f in self.evidence), default=Severity.WARN)

    @property
    def strength(self) -> tuple[Severity, int]:
        return self.severity, len(self.evidence)

    def title(self) -> str:
        if self.key == "lr_high" and all(f.code == "advisor.divergence" for f in self.evidence):
            return _DIVERGENCE_ONLY[0]
        return CAUSES[self.key][0]

    def next_step(self) -> str:
        if self.key == "lr_high" and all(f.code == "advisor.divergence" for f in self.evidence):
            return _DIVERGENCE_ONLY[1]
        template = CAUSES[self.key][1]
        return template.format(parts=self._parts(), ladder=self._ladder())

    def _parts(self) -> str:
        if self.key == "data":
            parts = [_fix(f) for f in self.evidence if f.code != "advisor.divergence"]
            if any(f.code == "advisor.divergence" for f in self.evidence):
                parts.append("the loss diverged on flagged samples (see `advisor.divergence`)")
        elif self.key == "implementation":
            parts = [_fix(f) for f in self.evidence]
        else:
            parts = [f"`{f.code}`: {f.advice}" if f.advice else f"`{f.code}`"
                     for f in self.evidence]
        return "; ".join(dict.fromkeys(parts))

    def _ladder(self) -> str:
        for f in self.evidence:
            ladder = f.details.get("ladder")
            if isinstance(ladder, dict) and ladder.get("overfits_at"):
                return (f", to about {ladder['overfits_at']:.0e} where the overfit test "
                        f"memorizes its sample in {ladder.get('steps')} steps")
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.key, "title": self.title(), "severity": self.severity.value,
                "evidence": _codes(self.evidence), "explains": _codes(self.explains),
                "next_step": self.next_step(), "dropped": list(self.dropped)}


def _fix(f: Finding) -> str:
    """What to do about ``f``, as its code's declaration says (:attr:`CodeSpec.fix`)."""
    declared = spec(f.code)
    fix = declared.routed(f.details.get("reason"))[1] if declared is not None else ""
    return fix or f"see `{f.code}`"


def problems(found: Iterable[Finding]) -> list[Finding]:
    """The WARN and FAIL findings about the training: those whose code points at a cause
    (:attr:`lightning_diag.codes.CodeSpec.cause`; a code not declared there, unless its suffix
    is a generic one such as ``.error`` or ``.skipped``), not an earlier diagnosis."""
    return [f for f in found if f.severity >= Severity.WARN
            and not f.code.startswith(DIAGNOSIS_PREFIX) and _kind(f) != ""]


def _kind(f: Finding) -> str:
    """The cause a finding points at on its own: its code's declared cause (the one its
    ``details["reason"]`` routes to, :meth:`~lightning_diag.codes.CodeSpec.routed`), but for a
    divergence on samples the data inspection flagged (the data) and an overfit test whose
    ladder of learning rates found the rate off (that rate); ``""``: not a problem."""
    if f.code == "advisor.divergence" and f.details.get("flagged_in_batch"):
        return "data"
    if f.code.startswith("overfit."):
        verdict = str((f.details.get("ladder") or {}).get("verdict"))
        if verdict in ("lr_too_low", "lr_too_high"):
            return {"lr_too_low": "lr_low", "lr_too_high": "lr_high"}[verdict]
    declared = spec(f.code)
    return "other" if declared is None else declared.routed(f.details.get("reason"))[0]


def causes(found: Iterable[Finding]) -> list[Cause]:
    """The root causes the problems among ``found`` point at, in the order to fix them.

    Rules, applied in order:

    1. Every problem goes to the cause it points at on its own (a divergence whose batch holds
       samples the data inspection flagged goes to the data; one on clean or unknown samples
       to the learning rate; the overfit test to the rate its ladder found, else to the
       implementation).
    2. A learning rate both too high and too low: the stronger (severity, then number of
       findings) stays; the other's findings become contradicted, their advice dropped.
    3. Dead or saturated units and a vanishing gradient follow from a learning rate too high
       (units die after oversized updates), else from the initialization when it is off.
    4. Underfitting and a plateau follow from a learning rate that is off: with a rate too
       high, "perhaps raise the learning rate" is dropped; with a rate too low, "decay the
       learning rate" is.
    """
    by_kind: dict[str, Cause] = {}
    for f in problems(found):
        by_kind.setdefault(_kind(f), Cause(_kind(f))).evidence.append(f)
    high, low = by_kind.get("lr_high"), by_kind.get("lr_low")
    if high is not None and low is not None:
        keep, lose = (high, low) if high.strength >= low.strength else (low, high)
        keep.dropped += [f"`{f.code}`: contradicted by the stronger evidence that the learning "
                         f"rate is too {'high' if keep is high else 'low'}" for f in lose.evidence]
        keep.explains += lose.evidence
        del by_kind[lose.key]
    rate = by_kind.get("lr_high") or by_kind.get("lr_low")
    flow = by_kind.get("gradient_flow")
    host = by_kind.get("lr_high") or by_kind.get("initialization")
    if flow is not None and host is not None:
        host.explains += flow.evidence
        del by_kind["gradient_flow"]
    for key, advice in (("underfit", "perhaps raise the learning rate"),
                        ("plateau", "decay the learning rate")):
        cause = by_kind.get(key)
        if cause is None or rate is None:
            continue
        rate.explains += cause.evidence
        contradicts = (key == "underfit") == (rate.key == "lr_high")
        if contradicts:
            way = "high" if rate.key == "lr_high" else "low"
            rate.dropped += [f"`{f.code}`: \"{advice}\" is dropped: the learning rate is "
                             f"already too {way}" for f in cause.evidence]
        del by_kind[key]
    return [by_kind[k] for k in CAUSES if k in by_kind]


def diagnose(found: Iterable[Finding], min_checks: int = 1) -> Finding | None:
    """The ``diagnosis.summary`` finding of ``found``, or None when it has no problem or its
    problems come from fewer than ``min_checks`` checks.

    Its severity is the highest of the causes' evidence; ``details["causes"]`` holds, per
    cause in order: ``cause`` (a key of :data:`CAUSES`), ``title``, ``severity``,
    ``evidence`` and ``explains`` (codes), ``next_step`` and ``dropped`` (advice of other
    findings dropped or rewritten, with why).

    Example:
        >>> from lightning_diag.findings import Finding, Severity
        >>> diagnose([Finding("X", "x.ok", Severity.INFO, "fine")]) is None
        True
    """
    found = list(found)
    issues = problems(found)
    if not issues or len({f.check for f in issues}) < min_checks:
        return None
    listed = causes(found)
    lines, steps = [], []
    for i, cause in enumerate(listed, 1):
        evidence = ", ".join(_codes(cause.evidence))
        explains = (f"; explains {', '.join(_codes(cause.explains))}" if cause.explains else "")
        lines.append(f"({i}) {cause.title()} [{evidence}{explains}].")
        dropped = "".join(f" ({d})" for d in cause.dropped)
        steps.append(f"({i}) {cause.next_step()}{dropped}")
    count = f"{len(listed)} likely root cause{'s' * (len(listed) != 1)}"
    return Finding(CHECK, CODE, max(c.severity for c in listed),
                   f"{count}, in the order to fix them: " + " ".join(lines),
                   advice=" ".join(steps),
                   details={"causes": [c.to_dict() for c in listed], "problems": len(issues)})


def _codes(found: list[Finding]) -> list[str]:
    """The codes of ``found`` in order, each once, with ``xN`` when it repeats."""
    counts: dict[str, int] = {}
    for f in found:
        counts[f.code] = counts.get(f.code, 0) + 1
    return [code if n == 1 else f"{code} x{n}" for code, n in counts.items()]

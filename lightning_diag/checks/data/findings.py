"""The findings of a data inspection, built from a
:class:`~lightning_diag.checks.data.scan.DataReport`: one per problem and set, a summary first.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lightning_diag.checks.data.inspect import inspect_dataset
    >>> x = torch.rand(4, 3)
    >>> x[2, 0] = float("nan")
    >>> [(f.code, f.indices) for f in inspect_dataset(TensorDataset(x)) if f.code != "data.summary"]
    [('data.no_labels', ()), ('data.non_finite', (2,))]
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from lightning_diag.checks.data.scan import DataReport, SplitScan
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.data import imbalance_ratio
from lightning_diag.functional.tokens import SHINGLE

__all__ = ["findings_of"]

Make = Callable[..., Finding]

_DUP = ("Look at the data first: remove the copies; they over-weight some samples and make the "
        "training loss look better than it is.")
_CORRUPT = ("Remove or repair these samples: corrupted data can make the loss diverge suddenly "
            "(recipe step 6.4).")


def findings_of(report: DataReport, make: Make) -> list[Finding]:
    """All findings of ``report``, the info summary first."""
    out = [_summary(report, make)]
    for scan in report.scans():
        if len(scan.indices) < scan.size:
            out.append(make("data.sampled", Severity.INFO,
                            f"{_where(scan)}inspected a seeded random subset of "
                            f"{len(scan.indices)} of {scan.size} samples (`max_samples`).",
                            value=float(len(scan.indices)), details={"split": scan.name},
                            subject=scan.name))
    if report.train.label_kind != "class":
        kind = ("no targets" if report.train.label_kind == "none" else
                "targets that are not one integer class per sample (regression, multi-label, "
                "per-pixel or per-token targets)")
        out.append(make("data.no_labels", Severity.INFO,
                        f"The training samples have {kind}: the per-sample label checks (range, "
                        "imbalance, conflicting duplicates) are skipped.",
                        advice="If the samples do hold an integer class label, pass "
                               "`batch_to_target=` (a function from one sample to its label)."))
    for scan in report.scans():
        in_split = functools.partial(make, subject=scan.name)  # one fact per code and split
        out += _per_sample(scan, in_split)
        out += _duplicates(report, scan, in_split)
        out += _labels(report, scan, in_split)
    if report.val is not None and report.leaks["pairs"]:
        out.append(_leakage(report, report.val, make))
    return out


def _near_rule(report: DataReport, scan: SplitScan) -> str:
    if scan.tokens:
        return (f" (token sequences sharing >= {report.config.token_threshold:g} of their "
                f"{SHINGLE}-token n-grams, Jaccard)")
    return f" (centred cosine >= {report.config.near_threshold})"


def _where(scan: SplitScan) -> str:
    return "" if scan.name == "train" else "Validation set: "


def _summary(report: DataReport, make: Make) -> Finding:
    parts = []
    for name, s in report.summary().items():
        if isinstance(s, dict):
            parts.append(f"{name}: {s['inspected']}/{s['samples']} samples read, "
                         f"{s['unreadable']} unreadable, {s['non_finite']} non-finite, "
                         f"{s['constant']} constant, {s['exact_duplicate_groups']} exact and "
                         f"{s['near_duplicate_groups']} near duplicate groups")
    leaks = f"; {len(report.leaks['pairs'])} train/validation leak pairs" if report.val else ""
    shape = report.train.shape
    inputs = (f"token sequences, the first of length {shape[0]}" if report.train.tokens
              and shape else f"input shape {shape}")
    classes = report.num_classes
    source = f", {report.class_source}" if classes is not None else ""
    return make("data.summary", Severity.INFO,
                f"Data inspected ({inputs}, {classes} classes{source}): "
                + "; ".join(parts) + leaks + ".", details=report.summary())


def _per_sample(scan: SplitScan, make: Make) -> list[Finding]:
    out = []
    split = {"split": scan.name}
    if scan.unreadable:
        idx, err = scan.unreadable[0]
        out.append(make("data.unreadable", Severity.FAIL,
                        f"{_where(scan)}{len(scan.unreadable)} sample(s) raised in `__getitem__` "
                        f"or held no readable input (first: index {idx}, {err}).",
                        advice=_CORRUPT,
                        value=float(len(scan.unreadable)), expected=0.0,
                        indices=tuple(i for i, _ in scan.unreadable),
                        details={**split, "errors": dict(scan.unreadable)}))
    if scan.non_finite:
        out.append(make("data.non_finite", Severity.FAIL,
                        f"{_where(scan)}{len(scan.non_finite)} input(s) hold NaN or Inf.",
                        advice=_CORRUPT, value=float(len(scan.non_finite)), expected=0.0,
                        indices=tuple(scan.non_finite), details=split))
    if scan.constant:
        out.append(make("data.constant_input", Severity.WARN,
                        f"{_where(scan)}{len(scan.constant)} input(s) are constant (blank).",
                        advice="Look at them: blank images are usually failed reads or crops.",
                        value=float(len(scan.constant)), expected=0.0,
                        indices=tuple(scan.constant), details=split))
    if scan.other_shape:
        out.append(make("data.mixed_shapes", Severity.INFO,
                        f"{_where(scan)}{scan.other_shape} input(s) differ from the shape "
                        f"{scan.shape} of the first one; duplicate search skipped them.",
                        details=split))
    return out


def _duplicates(report: DataReport, scan: SplitScan, make: Make) -> list[Finding]:
    out = []
    split = {"split": scan.name}
    for code, groups, what in (("data.exact_duplicate", report.exact[scan.name], "identical"),
                               ("data.near_duplicate", report.near[scan.name], "near-identical")):
        if not groups:
            continue
        members = sorted(i for g in groups for i in g)
        threshold = "" if code == "data.exact_duplicate" else _near_rule(report, scan)
        out.append(make(code, Severity.WARN,
                        f"{_where(scan)}{len(groups)} group(s) of {what} inputs{threshold}: "
                        f"{len(members)} samples, {len(members) - len(groups)} redundant.",
                        advice=_DUP, value=float(len(groups)), expected=0.0,
                        indices=tuple(members), details={**split, "groups": groups}))
    if reason := report.near_skipped.get(scan.name):
        out.append(make("data.near_duplicates_skipped", Severity.INFO,
                        f"{_where(scan)}near duplicates not searched: {reason}. Exact "
                        "duplicates are still reported.",
                        advice="If these inputs are text, check the tokenization; else pass "
                               "`batch_to_input=` returning them as float features.",
                        details=split))
    labels = dict(zip(scan.indices.tolist(), scan.labels, strict=True))
    conflicts = [g for g in report.exact[scan.name]
                 if len({labels[i] for i in g if labels[i] is not None}) > 1]
    if conflicts:
        out.append(make("data.conflicting_labels", Severity.WARN,
                        f"{_where(scan)}{len(conflicts)} group(s) of identical inputs carry "
                        "different labels.",
                        advice="Look at the data first: at most one of these labels is right; "
                               "fix or drop the others.",
                        value=float(len(conflicts)), expected=0.0,
                        indices=tuple(sorted(i for g in conflicts for i in g)),
                        details={**split,
                                 "groups": [{i: labels[i] for i in g} for g in conflicts]}))
    return out


def _labels(report: DataReport, scan: SplitScan, make: Make) -> list[Finding]:
    n = report.num_classes
    counts = report.counts(scan)
    if counts is None or n is None:
        return []
    out = []
    split = {"split": scan.name}
    bad = [i for i, v in zip(scan.indices.tolist(), scan.labels, strict=True)
           if v is not None and not 0 <= v < n]
    if bad:
        out.append(make("data.label_out_of_range", Severity.FAIL,
                        f"{_where(scan)}{len(bad)} label(s) outside [0, {n}) ({n} classes, "
                        f"{report.class_source}).",
                        advice="Fix the labels or `num_classes`; cross-entropy fails on them.",
                        value=float(len(bad)), expected=(0.0, float(n - 1)), indices=tuple(bad),
                        details=split))
    missing = [c for c, k in enumerate(counts.tolist()) if k == 0]
    # a class another split holds is a fact about the splits (a small validation set, a
    # class kept for validation), not a problem of this one's; one that no split holds is a
    # gap in the labels when it lies below the largest training label
    elsewhere = _held_elsewhere(report, scan, missing)
    gaps = [c for c in missing if c not in elsewhere and c < report.labelled_classes]
    ratio = imbalance_ratio(counts)
    limit = report.config.imbalance_ratio
    if gaps or ratio >= limit:
        present = counts.clone().float()
        present[counts == 0] = float("inf")
        rare, common = int(present.argmin()), int(counts.argmax())
        text = (f"the commonest class ({common}, {int(counts[common])} samples) has {ratio:.1f}x "
                f"the samples of the rarest ({rare}, {int(counts[rare])}); expected < {limit:g}x")
        if gaps:
            text = f"class(es) {gaps} have no sample in any split; " + text
        out.append(make("data.class_imbalance", Severity.WARN, _where(scan) + text + ".",
                        advice="Look at the data first: collect or re-weight the rare classes "
                               "and watch per-class accuracy.",
                        value=ratio, expected=float(limit),
                        details={**split, "counts": counts.tolist(), "missing": gaps}))
    if elsewhere:
        where = "; ".join(f"class {c}: " + ", ".join(f"{k} in {name}" for name, k in held.items())
                          for c, held in elsewhere.items())
        out.append(make("data.class_absent", Severity.INFO,
                        f"{_where(scan)}class(es) {list(elsewhere)} have no sample in the "
                        f"{scan.name} split; another split holds them ({where}).",
                        advice=("The model never trains on them: its accuracy on them is a "
                                "guess's. Move some of their samples to training if it should "
                                "learn them." if scan.name == "train" else ""),
                        value=float(len(elsewhere)),
                        details={**split, "classes": list(elsewhere),
                                 "held_by": {str(c): held for c, held in elsewhere.items()}}))
    return out


def _held_elsewhere(report: DataReport, scan: SplitScan,
                    classes: list[int]) -> dict[int, dict[str, int]]:
    """Of ``classes`` (missing from ``scan``), those another split holds: class -> split ->
    samples."""
    held: dict[int, dict[str, int]] = {}
    for other in report.scans():
        counts = None if other is scan else report.counts(other)
        if counts is None:
            continue
        for c in classes:
            if int(counts[c]):
                held.setdefault(c, {})[other.name] = int(counts[c])
    return dict(sorted(held.items()))


def _leakage(report: DataReport, val: SplitScan, make: Make) -> Finding:
    pairs: list[tuple[int, int]] = report.leaks["pairs"]
    train_idx = sorted({i for i, _ in pairs})
    val_hit = len({j for _, j in pairs})
    share = val_hit / max(len(val.indices), 1)
    exact = report.leaks["exact"]
    return make("data.leakage", Severity.FAIL if exact else Severity.WARN,
                f"{len(train_idx)} training sample(s) also appear in validation ({exact} exact "
                f"pair(s)): {val_hit} validation samples, {share:.1%} of the validation set.",
                advice="Remove them from one side: validation must measure unseen data, or it "
                       "overstates accuracy.",
                value=share, expected=0.0, indices=tuple(train_idx),
                details={"pairs": pairs, "validation_matched": val_hit})

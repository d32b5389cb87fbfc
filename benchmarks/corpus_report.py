"""Measure the corpora of issue 20 (item 8): false alarms per family, bugs caught, margins.

Fits every program of the healthy corpus (``tests/corpus/healthy.py``) and every planted bug
(``tests/corpus/bugs.py``) with every callback of the library at its defaults
(``tests.corpus.runner.every_callback``, all twelve),
one at a time in this process, and writes a markdown report:

- per family of healthy programs, the false alarms (WARN/FAIL findings; the diagnosis, which
  restates them, left out) and the programs that got one;
- per healthy program and per callback, every WARN/FAIL with its value and expected range;
- per planted bug, the codes it must be flagged with, whether it was, and what was raised;
- every threshold's margin on the healthy programs: each finding that carries a value and an
  expected value or range (INFO included), the distance from the value to the threshold.

Margins: a range ``(lo, hi)`` has two thresholds, except a bound that is a quantity's natural
limit (a lower bound of 0; an upper bound of 1 above a lower bound in [0, 1), for fractions);
a single expected value is an upper threshold (a relative error, a target loss, a count). The
margin is the distance to the nearest threshold as a fraction of it (negative: crossed: an
alarm) and, for positive values, the factor the value may still move by before crossing it.

Usage (from the repository root):
    python benchmarks/corpus_report.py            # both corpora -> benchmarks/results/corpus.md
    python -m benchmarks.corpus_report --only healthy --out /tmp/healthy.md
    python benchmarks/corpus_report.py --only bugs no_zero_grad lr_too_high
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "corpus.md"


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_diag"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# --- margins ---------------------------------------------------------------------------------
def thresholds(expected: Any) -> list[tuple[str, float]]:
    """The thresholds of an expected value or range: ``("max", b)`` / ``("min", b)``.

    Example:
        >>> thresholds((1.2, 1.57)), thresholds((0.0, 0.5)), thresholds((0.9, 1.0))
        ([('min', 1.2), ('max', 1.57)], [('max', 0.5)], [('min', 0.9)])
        >>> thresholds(1e-4)
        [('max', 0.0001)]
    """
    if isinstance(expected, (tuple, list)):
        lo, hi = float(expected[0]), float(expected[1])
        out = [] if lo == 0 else [("min", lo)]
        if not (hi == 1 and 0 <= lo < 1):
            out.append(("max", hi))
        return out
    return [("max", float(expected))]


def margin(value: float, kind: str, bound: float) -> tuple[float, float]:
    """``(relative margin, factor)`` of ``value`` to one threshold; NaN where undefined.

    Example:
        >>> margin(0.5, "max", 1.0), margin(2.0, "min", 1.0)
        ((0.5, 2.0), (1.0, 2.0))
        >>> margin(1.5, "max", 1.0)[0]
        -0.5
    """
    if bound == 0:
        return math.nan, math.nan
    rel = (bound - value) / abs(bound) if kind == "max" else (value - bound) / abs(bound)
    factor = math.nan
    if value > 0 and bound > 0:
        factor = bound / value if kind == "max" else value / bound
    return rel, factor


def nearest(value: float, expected: Any) -> tuple[str, float, float, float] | None:
    """The nearest threshold ``(kind, bound, relative margin, factor)``, or None (a count
    against 0, or no threshold)."""
    rows = [(kind, bound, *margin(value, kind, bound)) for kind, bound in thresholds(expected)]
    rows = [r for r in rows if not math.isnan(r[2])]
    return min(rows, key=lambda r: r[2]) if rows else None


# --- formatting ------------------------------------------------------------------------------
def _num(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _expected(e: Any) -> str:
    if e is None:
        return "-"
    if isinstance(e, (tuple, list)):
        return f"{_num(e[0])} to {_num(e[1])}"
    return _num(e)


def _pct(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{100 * x:+.0f}%" if abs(x) < 10 else f"{'+' if x > 0 else '-'}{100 * abs(x):.1e}%"


def _alarm(f: Any) -> str:
    subject = f" {f.subject}" if f.subject else ""
    value = "" if f.value is None else f" {_num(f.value)} (expected {_expected(f.expected)})"
    return f"{f.check}: {f.severity.value.upper()} `{f.code}`{subject}{value}"


def _table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row)
              + " |" for row in rows]
    return "\n".join(lines)


# --- measuring -------------------------------------------------------------------------------
def measure(programs: list[Any], label: str) -> list[Any]:
    from tests.corpus.runner import run

    results = []
    for program in programs:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)  # stray files of a run never land in the repository
            try:
                result = run(program, Path(tmp))
            finally:
                os.chdir(cwd)
        print(f"[{label}] {program.name}: {len(result.alarms())} WARN/FAIL, "
              f"{result.cpu_seconds:.1f} s CPU", file=sys.stderr, flush=True)
        results.append(result)
    return results


def healthy_sections(results: list[Any]) -> list[str]:
    by_family: dict[str, list[Any]] = defaultdict(list)
    for r in results:
        by_family[r.program.family].append(r)
    fam_rows = []
    for family, rs in by_family.items():
        alarms = [f for r in rs for f in r.alarms()]
        fam_rows.append([family, ", ".join(r.program.name for r in rs), len(alarms),
                         sum(bool(r.alarms()) for r in rs),
                         ", ".join(sorted({f"`{f.code}`" for f in alarms})) or "-"])
    total = sum(len(r.alarms()) for r in results)
    alarmed = sum(bool(r.alarms()) for r in results)
    out = [f"## Healthy corpus: {total} false alarm(s) on {alarmed} of {len(results)} programs "
           f"({len(by_family)} families)",
           "",
           "A false alarm is a WARN or FAIL finding on a correct, healthy program (the "
           "diagnosis summary, which restates them, is not counted).",
           "",
           _table(["family", "programs", "false alarms", "programs alarmed", "codes"], fam_rows),
           "",
           "### Per program and per callback",
           "",
           _table(["program", "family", "what it is", "CPU s", "wall s", "WARN/FAIL findings"],
                  [[f"`{r.program.name}`", r.program.family, r.program.about,
                    f"{r.cpu_seconds:.1f}", f"{r.seconds:.1f}",
                    ("<br>".join(_alarm(f) for f in r.alarms()) or "none")
                    + ("" if r.error is None else f" (the fit raised {r.error!r})")]
                   for r in results])]
    return out


def bug_sections(results: list[Any], bugs: dict[str, Any]) -> list[str]:
    rows, caught = [], 0
    for r in results:
        bug = bugs[r.program.name]
        hit = sorted(set(bug.codes) & r.codes())
        caught += bool(hit)
        rows.append([f"`{bug.name}`", bug.source, r.program.about,
                     ", ".join(f"`{c}`" for c in bug.codes),
                     "**yes**: " + ", ".join(f"`{c}`" for c in hit) if hit else "**no**",
                     "<br>".join(_alarm(f) for f in r.alarms()) or "none", _diagnosis(r),
                     "-" if r.error is None else f"{type(r.error).__name__}: {r.error}",
                     f"{r.cpu_seconds:.1f}"])
    return [f"## Planted bugs: {caught} of {len(results)} caught", "",
            "A bug is caught when one of the codes it must be flagged with is raised at WARN "
            "or FAIL.", "",
            _table(["bug", "source", "the bug", "must be flagged with", "caught",
                    "WARN/FAIL raised", "diagnosis: causes (evidence)", "the fit raised",
                    "CPU s"], rows)]


def _diagnosis(result: Any) -> str:
    """The causes of the run's ``diagnosis.summary``, in order, each with its evidence."""
    for f in result.findings:
        if f.code == "diagnosis.summary":
            return "<br>".join(f"{i}. {c['cause']} ({', '.join(c['evidence'])})"
                               for i, c in enumerate(f.details.get("causes", []), 1))
    return "-"


def measures(f: Any) -> list[tuple[str, float, Any, str]]:
    """``(what, value, expected, note)`` of every threshold a finding shows a healthy value
    against: its own value and expected range, and the ones its details carry (the gradient
    RMS ratio of the activation summary; the largest and smallest logged update ratio, which
    the too-high / too-low rules see, beside the summary's median; the share of an overfit
    floor's fall below the constant-output loss, which tells a floor from a failure)."""
    out: list[tuple[str, float, Any, str]] = []
    if f.code == "overfit.floor" and f.details.get("beyond_constant") is not None:
        from lightning_diag.checks.overfit import BEYOND_CONSTANT

        return [(f"{f.code}: share of the fall below the constant-output loss",
                 float(f.details["beyond_constant"]), (BEYOND_CONSTANT, 1.0),
                 "the loss target is not the threshold of a floor")]
    if f.value is not None and f.expected is not None and math.isfinite(float(f.value)):
        note = ""
        if f.details.get("loss_above_target"):
            note = (f"reached on accuracy at step {f.details.get('accuracy_step')}; the loss "
                    "is information only")
        elif f.code == "overfit.reached":
            note = "a stopping rule: the test stops at the target"
        out.append((f.code, float(f.value), f.expected, note))
    if f.code == "activations.summary" and f.details.get("gradient_ratio") is not None:
        from lightning_diag.callbacks import ActivationHistogram

        default = ActivationHistogram()
        out.append((f"{f.code}: first/last gradient RMS", float(f.details["gradient_ratio"]),
                    (default.vanishing_ratio, default.exploding_ratio), ""))
    medians = [m for _, m in f.details.get("medians", [])] if f.code == "update_ratio.summary" \
        else []
    if medians and isinstance(f.expected, (tuple, list)):
        out.append((f"{f.code}: largest logged", max(medians), (0.0, f.expected[1]), ""))
        out.append((f"{f.code}: smallest logged", min(medians), (f.expected[0], math.inf), ""))
    return out


def overfit_steps(result: Any) -> tuple[Any, tuple[str, float, Any, str]] | None:
    """The overfit test's steps to its verdict against its ``max_steps`` budget: the margin
    that matters for a stopping rule (a healthy program that needs 950 of 1000 steps is one
    seed away from a false alarm)."""
    from lightning_diag.callbacks import OverfitSmallBatch

    for cb in result.callbacks:
        if isinstance(cb, OverfitSmallBatch) and cb.result is not None and cb.result.reached:
            r = cb.result
            steps = r.accuracy_step if r.loss_above_target else r.steps
            how = "on accuracy" if r.loss_above_target else (
                "on accuracy and loss" if r.classification else "on loss")
            found = next(f for f in cb.findings if f.code == "overfit.reached")
            return found, ("overfit.reached: steps to reach", float(steps or 0),
                           (0.0, float(cb.options["max_steps"])), f"reached {how}")
    return None


def margin_sections(results: list[Any]) -> list[str]:
    measured = []
    for r in results:
        extra = overfit_steps(r)
        for f in r.findings:
            found = measures(f) + ([extra[1]] if extra is not None and extra[0] is f else [])
            for what, value, expected, note in found:
                measured.append((r.program.name, f, what, value, expected, note,
                                 nearest(value, expected)))
    by_what: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in measured:
        by_what[(row[1].check, row[2])].append(row)
    code_rows = []
    for (check, what), items in sorted(by_what.items()):
        judged = [i for i in items if i[6] is not None]
        if not judged:
            code_rows.append([check, f"`{what}`", len(items), "-", "-", "-", "-", "-",
                              "a count against 0"])
            continue
        name, _, _, value, expected, note, (kind, bound, rel, factor) = min(
            judged, key=lambda i: i[6][2])
        rels = sorted(i[6][2] for i in judged)
        code_rows.append([check, f"`{what}`", len(items), f"`{name}`", _num(value),
                          _expected(expected), f"{kind} {_num(bound)}",
                          f"{_pct(rel)} ({_num(factor)}x)" if not math.isnan(factor)
                          else _pct(rel), f"median {_pct(rels[len(rels) // 2])}", note or "-"])
    detail = [[f"`{name}`", f"`{what}`" + (f" {f.subject}" if f.subject else ""),
               f.severity.value.upper(), _num(value), _expected(expected),
               "-" if near is None else f"{near[0]} {_num(near[1])}",
               "-" if near is None else _pct(near[2]),
               "-" if near is None else _num(near[3]), note or "-"]
              for name, f, what, value, expected, note, near in measured]
    return ["## Threshold margins on the healthy corpus", "",
            "Every finding that carries a value and an expected value or range, INFO "
            "included, and the thresholds its details show values against: the margin from "
            "the healthy value to the nearest threshold, as a fraction of the threshold "
            "(negative: crossed, an alarm), and the factor the value may move by before it "
            "crosses. A lower bound of 0 and an upper bound of 1 for fractions are natural "
            "limits, not thresholds; a single expected value is an upper threshold. The "
            "overfit test stops at its target, so `overfit.reached` sits just below it by "
            "construction: its margin is not a false-alarm margin.", "",
            "### Tightest margin per measure", "",
            _table(["callback", "measure", "findings", "tightest program", "value", "expected",
                    "threshold", "margin (factor)", "spread", "note"], code_rows),
            "", "### Every measured value", "",
            _table(["program", "measure", "severity", "value", "expected", "nearest threshold",
                    "margin", "factor", "note"], detail)]


def stability_section(runs: dict[int, list[Any]], bugs: dict[str, Any]) -> list[str]:
    """Per program, what each seed (the model's initialization and the global RNG; the data
    stay the same) raised: a verdict that changes with the seed sits on its threshold."""
    seeds = sorted(runs)
    rows = []
    for i, first in enumerate(runs[seeds[0]]):
        name = first.program.name
        cells = []
        for seed in seeds:
            r = runs[seed][i]
            codes = sorted({f.code for f in r.alarms()})
            if name in bugs:
                hit = set(bugs[name].codes) & r.codes()
                cells.append(("caught" if hit else "**missed**") + (
                    f" ({', '.join(codes)})" if codes and not hit else ""))
            else:
                cells.append(", ".join(f"`{c}`" for c in codes) or "none")
        stable = "yes" if len(set(cells)) == 1 else "**no**"
        rows.append([f"`{name}`", *cells, stable])
    return [f"## Stability over {len(seeds)} seeds", "",
            "The same programs with the model initialized from other seeds (the data do not "
            "change): the WARN/FAIL codes each seed raised (healthy programs), caught or "
            "missed (bugs).", "",
            _table(["program", *[f"seed {s}" for s in seeds], "same verdict"], rows)]


def docs_table(results: list[Any]) -> str:
    """The per-family table of docs/models.md."""
    by_family: dict[str, list[Any]] = defaultdict(list)
    for r in results:
        by_family[r.program.family].append(r)
    rows = []
    for family, rs in by_family.items():
        alarms = [f for r in rs for f in r.alarms()]
        rows.append([family, len(rs), len(alarms),
                     ", ".join(sorted({f"`{f.code}`" for f in alarms})) or "-"])
    return _table(["family", "programs", "false alarms", "codes"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="only these programs / bugs (default: all)")
    parser.add_argument("--only", choices=("healthy", "bugs"), default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seeds", type=int, default=1,
                        help="also run every program with seeds 1..N-1 and report whether "
                             "each verdict stays the same (default 1: seed 0 only)")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:  # run as a path: `tests.corpus` lives in the repository
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    from tests.corpus.bugs import BUGS
    from tests.corpus.healthy import HEALTHY
    _quiet()  # after the imports: Lightning sets its loggers' levels when imported
    torch.set_num_threads(1)
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    want = set(args.names)
    healthy = [p for n, p in HEALTHY.items() if not want or n in want]
    bugs = [b.program for n, b in BUGS.items() if not want or n in want]
    sections: list[str] = []
    timing = []
    extra_seeds = range(1, max(args.seeds, 1))
    stability: dict[int, list[Any]] = {}
    if args.only != "bugs" and healthy:
        t, c = time.perf_counter(), time.process_time()
        results = measure(healthy, "healthy")
        stability[0] = list(results)
        timing.append(f"healthy corpus {time.perf_counter() - t:.0f} s wall, "
                      f"{time.process_time() - c:.0f} s CPU")
        sections += [*healthy_sections(results), "", *margin_sections(results), ""]
        sections += ["## The table of docs/models.md", "", docs_table(results), ""]
    if args.only != "healthy" and bugs:
        t, c = time.perf_counter(), time.process_time()
        bug_results = measure(bugs, "bugs")
        timing.append(f"bug corpus {time.perf_counter() - t:.0f} s wall, "
                      f"{time.process_time() - c:.0f} s CPU")
        sections = [*bug_sections(bug_results, BUGS), "", *sections]
        stability[0] = stability.get(0, []) + bug_results
    if extra_seeds:
        t, c = time.perf_counter(), time.process_time()
        programs = [r.program for r in stability[0]]
        for seed in extra_seeds:
            stability[seed] = measure([dataclasses.replace(p, seed=seed) for p in programs],
                                      f"seed {seed}")
        timing.append(f"{len(extra_seeds)} more seed(s) {time.perf_counter() - t:.0f} s wall, "
                      f"{time.process_time() - c:.0f} s CPU")
        sections += [*stability_section(stability, BUGS), ""]
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    head = [
        "# The corpora of issue 20: false alarms, bugs caught, threshold margins", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU "
        f"cores ({platform.machine()}), torch {torch.__version__}, 1 intra-op thread, machine "
        f"shared with other jobs (1-minute load average {load:.2f} at the start, "
        f"{end_load:.2f} at the end); {'; '.join(timing)}. Every callback at its defaults "
        f"(all twelve). Command: `python benchmarks/corpus_report.py"
        f"{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`.", ""]
    text = "\n".join(head + sections).rstrip() + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

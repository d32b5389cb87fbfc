"""The ``lightning-diag`` command: ``demo``, ``report LOGDIR``, ``check LOGDIR`` and ``tune``.

Example:
    >>> from lightning_diag.cli import main
    >>> main(["report", "/no/such/dir"])
    2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

_TUNE_MODULE = "lightning_diag.tuning.cli"


def build_parser(with_tune_args: bool = False) -> argparse.ArgumentParser:
    """The argument parser; the tuning options are added only when ``tune`` is the command, so
    that ``demo`` and ``report`` never import Optuna."""
    parser = argparse.ArgumentParser(
        prog="lightning-diag",
        description="The 'babysit your network' recipe as PyTorch Lightning callbacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a small CNN on digits with the whole recipe attached",
                          description="Train the digits CNN with every diagnostic attached, print "
                          "the findings, the TensorBoard command and the HTML report path.")
    demo.add_argument("--inject", action="store_true",
                      help="plant bugs (duplicates, leaks, mis-scaled last layer, too-high LR)")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    demo.add_argument("--out", default="runs/demo", help="log directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--limit-batches", type=int, default=None,
                      help="train/val batches per epoch (default: all)")
    demo.add_argument("--no-progress-bar", action="store_true", help="hide the progress bar")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")

    report = sub.add_parser("report", help="build a self-contained HTML report from a log dir",
                            description="Build one self-contained HTML file (figures embedded) "
                            "from the TensorBoard event files under LOGDIR.")
    report.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log directory")
    report.add_argument("-o", "--out", default=None,
                        help="output HTML file (default LOGDIR/report.html)")

    check = sub.add_parser("check", help="print the findings of a run or a tree of runs; exit 1 "
                           "on failures", description="Print the findings recorded in the "
                           "findings.jsonl of every run under LOGDIR, worst first, with the advice "
                           "of warnings and failures; exit 1 when any finding is at or above "
                           "--fail-on (for CI), 2 when there is nothing to check (no run, or a "
                           "findings.jsonl without one readable record).")
    check.add_argument("logdir", metavar="LOGDIR", help="a run's log directory or a folder of runs")
    check.add_argument("--fail-on", choices=["warn", "fail"], default="fail",
                       help="exit 1 when a finding is at least this severe (default fail)")
    check.add_argument("--min-severity", choices=["info", "warn", "fail"], default="info",
                       help="list only findings at least this severe (default info: all); the "
                       "counts and the exit status still cover every finding")

    tune = sub.add_parser("tune", help="learning-rate sweep, random search and refinement",
                          description="Learning-rate sweep -> random search -> refinement "
                          "(recipe step 6); needs the `tune` extra (Optuna).")
    if with_tune_args:
        from lightning_diag.tuning.cli import add_tune_arguments

        add_tune_arguments(tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    wants_tune = bool(args_list) and args_list[0] == "tune"
    if wants_tune:
        problem = _tune_unavailable()
        if problem:
            print(problem, file=sys.stderr)
            return 2
    args = build_parser(with_tune_args=wants_tune).parse_args(args_list)
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args)
    if args.command == "check":
        return _check(args)
    from lightning_diag.tuning.cli import run_tune

    return int(run_tune(args))


def _tune_unavailable() -> str:
    try:
        import lightning_diag.tuning.cli  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name in ("lightning_diag.tuning", _TUNE_MODULE):
            return ("lightning-diag tune: the tuning module (lightning_diag.tuning.cli) is not "
                    "available in this installation.")
        return (f"lightning-diag tune needs the package {err.name!r}: install the tune extra "
                "with pip install 'lightning-diag[tune]'.")
    return ""


def _demo(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        print(f"lightning-diag demo: --epochs must be >= 1, got {args.epochs}.", file=sys.stderr)
        return 2
    if args.limit_batches is not None and args.limit_batches < 1:
        print(f"lightning-diag demo: --limit-batches must be >= 1, got {args.limit_batches}.",
              file=sys.stderr)
        return 2
    try:  # the demo writes there: a path that cannot be a folder is a usage error
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"lightning-diag demo: cannot write to --out {args.out!r}: {_reason(err)}.",
              file=sys.stderr)
        return 2
    from lightning_diag.examples.demo import run_demo

    run_demo(args.out, inject=args.inject, epochs=args.epochs, seed=args.seed,
             limit_batches=args.limit_batches, progress_bar=not args.no_progress_bar,
             report=not args.no_report)
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_diag.report import build_report

    logdir = Path(args.logdir)
    if not logdir.is_dir():
        what = "is not a directory" if logdir.exists() else "does not exist"
        print(f"lightning-diag report: log directory {args.logdir!r} {what}.", file=sys.stderr)
        return 2
    target = Path(args.out) if args.out is not None else logdir / "report.html"
    try:
        path = build_report(logdir, target)
    except OSError as err:
        # the report is written last: an error on its file or folders is the -o mistake
        mine = err.filename is not None and Path(err.filename) in (target, *target.parents)
        what = (f"cannot write the report to {str(target)!r}" if mine else
                f"cannot read {str(err.filename or logdir)!r}")
        at = (f" at {err.filename!r}" if mine and Path(err.filename) != target else "")
        print(f"lightning-diag report: {what}: {_reason(err)}{at}"
              + (" (pass -o a file in a folder you can write)." if mine else "."),
              file=sys.stderr)
        return 2
    print(path)
    return 0


def _reason(err: OSError) -> str:
    """An OSError's reason without its errno and file name, e.g. "Not a directory"."""
    return err.strerror or type(err).__name__


def _check(args: argparse.Namespace) -> int:
    import warnings

    from lightning_diag.findings import FINDINGS_FILE, Severity, load_findings_files
    from lightning_diag.presentation import counts_text, format_findings

    try:
        with warnings.catch_warnings():  # each skipped line is summed up per run below
            warnings.simplefilter("ignore", UserWarning)
            runs = load_findings_files(args.logdir)
    except FileNotFoundError:
        print(f"lightning-diag check: log directory {args.logdir!r} does not exist.",
              file=sys.stderr)
        return 2
    if not runs:
        print(f"lightning-diag check: no {FINDINGS_FILE} under {args.logdir!r}: no run with "
              "lightning_diag callbacks and a logger was found there.", file=sys.stderr)
        return 2
    unreadable = [read for read in runs.values() if not read.findings]
    for read in runs.values():
        if not read.findings:
            what = (f"{read.lines} line(s), none a finding record" if read.lines else "empty")
            print(f"lightning-diag check: {read.path} holds no readable finding record "
                  f"({what}): nothing to check there.", file=sys.stderr)
        elif read.skipped:
            print(f"lightning-diag check: {read.path}: skipped {read.skipped} of {read.lines} "
                  "line(s) that are not finding records (cut short or corrupt).", file=sys.stderr)
    every = [f for read in runs.values() for f in read.findings]
    if not every:
        return 2
    least = Severity(args.min_severity)
    for run, read in runs.items():
        if read.findings:
            print(f"Run {run}\n{format_findings(read.findings, min_severity=least)}\n")
    print(f"{len(every)} finding(s) in {len(runs)} run(s): {counts_text(every)}.")
    if unreadable:
        return 2
    threshold = Severity(args.fail_on)
    return int(any(f.severity >= threshold for f in every))

"""Diagnosis-guided pruning vs the plain random search, per task family, on realistic ranges.

For each family and seed, the recipe's search is run as a user would: a learning-rate sweep
(recipe rates 1e-1 to 1e-4, 100 steps, extended once at an edge) picks a rate, then
:func:`random_search` draws ``--trials`` configurations, learning rate log-uniform two decades
either side of the pick (``lr_span=100``), weight decay from (1e-4, 1e-5, 0), ``--epochs`` 2-8
per trial under Optuna's median pruner. It runs on the same seed, so trial ``n`` is the same
configuration in both, with ``diagnose=False`` (plain: the median pruner alone) and
``diagnose=True`` (guided: the trial monitor also ends trials), ``--repeats`` times each, the
two taking turns going first; a search is deterministic, so its repeats differ only in time
(checked), and the median time is taken. Families (``search_tasks.py``):

- ``digits``: the library's example, ``DigitsClassifier(arch="cnn")``, Adam;
- ``blobs``: a tanh MLP, SGD with momentum 0.9, 5 overlapping Gaussian classes (the case of
  issue 24);
- ``bars``: a CNN, AdamW with a cosine schedule, bars of 4 orientations in noise;
- ``waves``: a GRU, Adam with a linear warm-up then cosine, gradients clipped at 1, noisy sines.

Reported per family: the time until the plain search's best validation accuracy is reached in
each search, as the process's CPU seconds (single-threaded work: its wall time on an idle
machine; the load of other jobs on a shared machine does not inflate it) and as wall seconds
from the studies' timestamps; the best accuracy of each, the whole search's time, what ended
trials; and **false prunes**: every trial the diagnosis ended is
also trained to its end in a side measurement (outside the timed searches), and counts as a
false prune if it finishes within 1 point of the best accuracy seen for that seed.

    .venv/bin/python benchmarks/bench_guided_search.py --families digits blobs bars waves \\
        --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from search_tasks import TASKS, Task

from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.tuning.sweep import lr_sweep, train_and_score

POINT = 0.01  # "within 1 point" of accuracy
SPAN = 100.0  # two decades either side of the sweep's pick
WEIGHT_DECAYS = (1e-4, 1e-5, 0.0)


@dataclass(frozen=True)
class Family:
    """A benchmark family: how to build its model and data for a seed."""

    name: str
    what: str
    task: Task | None = None  # None: the digits example

    def factory(self) -> Any:
        if self.task is None:
            return functools.partial(DigitsClassifier, arch="cnn")
        return self.task.factory

    def data(self, seed: int) -> Any:
        if self.task is None:
            return DigitsDataModule(batch_size=32, seed=seed)
        return self.task.datamodule(seed)

    def trainer_kwargs(self) -> dict[str, Any]:
        return {} if self.task is None else self.task.trainer_kwargs()


FAMILIES = {
    "digits": Family("digits", "digits CNN, Adam (`DigitsClassifier(arch='cnn')`)"),
    "blobs": Family("blobs", "tanh MLP, SGD + momentum 0.9, 5 Gaussian classes",
                    TASKS["blobs-tanh-sgdm"]),
    "bars": Family("bars", "CNN, AdamW + cosine, 12x12 bars", TASKS["bars-cnn-adamw-cosine"]),
    "waves": Family("waves", "GRU, Adam + warm-up then cosine, clip 1, noisy sines",
                    TASKS["waves-gru-adam-warmup_cosine"]),
}


def search(family: Family, seed: int, center: float, diagnose: bool,
           args: argparse.Namespace) -> list[dict[str, Any]]:
    """The search's trials in the order they ran, each with the time from the start of the
    search to its own end: ``cpu``, the process's CPU seconds (what the load of other jobs on
    the machine does not inflate), and ``elapsed``, the wall seconds from the start of the
    study's first trial, read from the study's timestamps."""
    import optuna

    import lightning_diag.tuning.search as searching

    real, cpu = searching.objective, {}
    start = time.process_time()

    def timed(*given: Any, **kwargs: Any) -> Any:  # each trial's end, in CPU seconds
        run = real(*given, **kwargs)

        def timed_run(trial: Any) -> float:
            try:
                return run(trial)
            finally:
                cpu[trial.number] = time.process_time() - start
        return timed_run

    searching.objective = timed
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            result = searching.random_search(
                family.factory(), family.data(seed), center_lr=center, lr_span=SPAN,
                n_trials=args.trials, epochs=tuple(args.epochs), weight_decays=WEIGHT_DECAYS,
                run_dir=run_dir, seed=seed, diagnose=diagnose, accelerator="cpu",
                **family.trainer_kwargs())
            trials = optuna.load_study(study_name=result.study_name,
                                       storage=result.storage).get_trials(deepcopy=False)
    finally:
        searching.objective = real
    first = min(t.datetime_start for t in trials)
    ended = {t.number: (t.datetime_complete - first).total_seconds() for t in trials}
    return [{**dict(r), "elapsed": ended[r.number], "cpu": cpu[r.number]}
            for r in sorted(result.rows, key=lambda r: r.number)]


def time_to(rows: list[dict[str, Any]], target: float, clock: str) -> float:
    """``clock`` seconds when a completed trial first reached ``target`` (inf: never)."""
    return next((r[clock] for r in rows
                 if r["state"] == "complete" and r["value"] >= target - 1e-9), math.inf)


def outcome(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a search did, trial by trial, whatever its timing."""
    return [(r["number"], r["state"], r["steps"], r["ended_by"],
             round(r["value"], 6) if math.isfinite(r["value"]) else None) for r in rows]


def compare(family: Family, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    sweep = lr_sweep(family.factory(), datamodule=family.data(seed), steps=100, seed=seed,
                     accelerator="cpu", **family.trainer_kwargs())
    center = sweep.best_lr
    # Each search ``--repeats`` times, the two taking turns going first (so neither always
    # finds the caches warm); a search is deterministic, so its repeats differ only in time,
    # and the median time of the repeats is taken.
    runs: dict[bool, list[list[dict[str, Any]]]] = {False: [], True: []}
    for rep in range(args.repeats):
        for diagnose in (False, True) if (seed + rep) % 2 == 0 else (True, False):
            runs[diagnose].append(search(family, seed, center, diagnose, args))
    for diagnose, repeats in runs.items():
        if any(outcome(r) != outcome(repeats[0]) for r in repeats):
            raise RuntimeError(f"{family.name} seed {seed}: the repeats of the "
                               f"{'guided' if diagnose else 'plain'} search differ")
    plain, guided = runs[False][0], runs[True][0]
    best_plain = max((r["value"] for r in plain if r["state"] == "complete"), default=math.nan)
    best_guided = max((r["value"] for r in guided if r["state"] == "complete"),
                      default=math.nan)

    def median_to(diagnose: bool, clock: str) -> float:
        return statistics.median(time_to(r, best_plain, clock) for r in runs[diagnose])

    # side measurement: every trial the diagnosis ended, trained to its end
    diagnosed = [r for r in guided if r["ended_by"] not in ("", "pruner")]
    finals = {r["number"]: train_and_score(
        family.factory(), family.data(seed), r["lr"], r["weight_decay"], args.epochs[1], seed,
        "val_acc", accelerator="cpu", **family.trainer_kwargs()) for r in diagnosed}
    best = max([best_plain, best_guided, *finals.values()])
    false = [f"trial {n} (lr {next(r['lr'] for r in diagnosed if r['number'] == n):.2g}, "
             f"{v:.3f})" for n, v in finals.items() if v >= best - POINT]
    plain_times = [time_to(r, best_plain, "cpu") for r in runs[False]]
    return {"family": family.name, "seed": seed, "pick": center,
            "best_plain": best_plain, "best_guided": best_guided,
            "t_plain": median_to(False, "cpu"), "t_guided": median_to(True, "cpu"),
            "w_plain": median_to(False, "elapsed"), "w_guided": median_to(True, "elapsed"),
            "spread": max(plain_times) / min(plain_times) - 1,
            "total_plain": statistics.median(r[-1]["cpu"] for r in runs[False]),
            "total_guided": statistics.median(r[-1]["cpu"] for r in runs[True]),
            "ended": dict(collections.Counter(r["ended_by"] for r in guided if r["ended_by"])),
            "plain_pruned": sum(r["ended_by"] == "pruner" for r in plain),
            "diagnosed": len(diagnosed), "false": false,
            "side_best": max(finals.values(), default=math.nan)}


def saved(r: dict[str, Any], clock: str = "t") -> float:
    return 1 - r[f"{clock}_guided"] / r[f"{clock}_plain"]


def row(r: dict[str, Any]) -> str:
    ended = ", ".join(f"{code} {n}" for code, n in sorted(r["ended"].items())) or "-"
    return (f"| {r['family']} | {r['seed']} | {r['pick']:g} | {r['best_plain']:.4f} | "
            f"{r['best_guided']:.4f} | {r['t_plain']:.1f} | {r['t_guided']:.1f} | "
            f"**{saved(r):.0%}** | {saved(r, 'w'):.0%} | {r['spread']:.0%} | "
            f"{r['total_plain']:.1f} | "
            f"{r['total_guided']:.1f} | {ended} | {r['plain_pruned']} | {r['diagnosed']} | "
            f"{len(r['false'])} |")


def summary(results: list[dict[str, Any]]) -> list[str]:
    lines = ["| family | pairs | time to the plain search's best, CPU: saved per seed | mean | "
             "wall (loaded machine): mean | best accuracy: lowest guided - plain | whole "
             "search CPU, plain -> guided (s) | trials the diagnosis ended | false prunes |",
             "|" + "---|" * 9]
    for name in dict.fromkeys(r["family"] for r in results):
        rs = [r for r in results if r["family"] == name]
        gap = min(r["best_guided"] - r["best_plain"] for r in rs)
        lines.append(
            f"| {name} | {len(rs)} | {', '.join(f'{saved(r):.0%}' for r in rs)} | "
            f"**{statistics.mean(saved(r) for r in rs):.0%}** | "
            f"{statistics.mean(saved(r, 'w') for r in rs):.0%} | {gap * 100:+.1f} points | "
            f"{sum(r['total_plain'] for r in rs):.1f} -> "
            f"{sum(r['total_guided'] for r in rs):.1f} | {sum(r['diagnosed'] for r in rs)} | "
            f"{sum(len(r['false']) for r in rs)} |")
    return lines


def write(args: argparse.Namespace, results: list[dict[str, Any]], load: list[float]) -> None:
    """The tables, rewritten after every pair of searches so a partial run keeps its numbers."""
    false = [f"- {r['family']} seed {r['seed']}: {w}" for r in results for w in r["false"]]
    lines = [
        "## Diagnosis-guided pruning vs the plain random search, per family (issue 24)",
        "",
        f"Measured {datetime.date.today()} on {os.cpu_count()} CPU cores shared with other "
        f"jobs (load average {min(load):.1f}-{max(load):.1f} during the run), one intra-op "
        f"thread. Per family and seed: a sweep (recipe rates, 100 steps) picks a rate; "
        f"`random_search` draws {args.trials} trials, lr log-uniform in [pick / {SPAN:g}, "
        f"pick x {SPAN:g}], weight decay from {WEIGHT_DECAYS}, epochs {tuple(args.epochs)} "
        f"(Optuna's median pruner from the end of epoch {args.epochs[0]}), with "
        "`diagnose=False` (plain) and with `diagnose=True` (guided) on the same seed, "
        f"{args.repeats} run(s) each, taking turns going first, after a warm-up search of "
        "each; a search is "
        "deterministic, so its repeats differ only in time, and times are the median of the "
        "repeats. Times are the search process's CPU seconds "
        "from its start to the end of a trial (single-threaded work: its wall time on an idle "
        "machine, and what the other jobs' load does not inflate); the wall-time column reads "
        "the study's timestamps, as loaded as the machine was. A false prune: a trial the "
        "diagnosis ended that, trained to its end in a side measurement, finishes within 1 "
        "point of the best accuracy seen for that seed.",
        "",
        *[f"- `{f.name}`: {f.what}" for f in FAMILIES.values() if f.name in args.families],
        "",
        *summary(results),
        "",
        "| family | seed | sweep pick | best plain | best guided | time to plain's best, "
        "plain (CPU s) | guided (CPU s) | time saved, CPU | wall | plain's repeats: slowest / "
        "fastest - 1 | search total, plain (CPU s) | guided (CPU s) | guided: trials ended, "
        "by rule (finding code, or Optuna's pruner) | plain: trials the median pruner ended | "
        "trials the diagnosis ended | false prunes |",
        "|" + "---|" * 16,
        *map(row, results),
        "",
        "False prunes: " + ("none." if not false else ""),
        *false,
        "",
        f"Command: `.venv/bin/python benchmarks/bench_guided_search.py --families "
        f"{' '.join(args.families)} --seeds {' '.join(map(str, args.seeds))} --trials "
        f"{args.trials} --epochs {args.epochs[0]} {args.epochs[1]} --repeats {args.repeats}`",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES),
                        choices=list(FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, nargs=2, default=[2, 8], metavar=("MIN", "MAX"))
    parser.add_argument("--repeats", type=int, default=3,
                        help="Runs of each search per seed; the median time is taken.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "guided_search_families.md"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_diag").setLevel(logging.ERROR)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    warm = argparse.Namespace(**{**vars(args), "trials": 2, "epochs": [1, 1]})
    load = [os.getloadavg()[0]]
    for name in args.families:  # imports, allocator and kernel caches, before anything is timed
        for diagnose in (False, True):
            search(FAMILIES[name], 0, 1e-3, diagnose, warm)
    results = []
    for seed in args.seeds:  # the families interleaved, so that a change of load spreads
        for name in args.families:
            start = time.perf_counter()
            results.append(compare(FAMILIES[name], seed, args))
            load.append(os.getloadavg()[0])
            print(row(results[-1]), f"{time.perf_counter() - start:.0f} s, load {load[-1]:.1f}",
                  flush=True)
            write(args, results, load)


if __name__ == "__main__":
    main()

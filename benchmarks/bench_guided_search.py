"""Diagnosis-guided pruning vs the plain random search, on the same seeds and the same trials.

Runs :func:`random_search` twice per (architecture, seed): ``diagnose=False`` (Optuna's median
pruner alone) and ``diagnose=True`` (the monitors end hopeless trials as well), over learning
rates from 1e-5 to 10 (log-uniform) on the digits CNN and MLP with Adam. Trial ``n`` draws the
same configuration in both searches, so the two differ only by when trials end. Reports, from the
studies' own trial timestamps:

- the wall time until the plain search's best validation accuracy is reached, in each search;
- the best accuracy each search found;
- the configurations within 1 point of the best found within a fixed budget (half the plain
  search's wall time);
- how many trials each rule ended (the diagnosis, by finding code; Optuna's pruner) and when;
- what the monitors cost a trial nobody ended (paired seconds of the same completed trials).

    .venv/bin/python benchmarks/bench_guided_search.py --archs cnn mlp --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import logging
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.tuning.search import SearchResult, random_search

LOW, HIGH = 1e-5, 10.0
CENTER, SPAN = (LOW * HIGH) ** 0.5, (HIGH / LOW) ** 0.5
POINT = 0.01  # "within 1 point" of accuracy


def search(arch: str, seed: int, diagnose: bool, args: argparse.Namespace
           ) -> list[dict[str, Any]]:
    """The search's trials in the order they ran, each with the wall time from the start of the
    first trial to its own end (``elapsed``), read from the study's timestamps."""
    import optuna

    with tempfile.TemporaryDirectory() as run_dir:
        result: SearchResult = random_search(
            functools.partial(DigitsClassifier, arch=arch),
            DigitsDataModule(batch_size=args.batch_size, seed=seed),
            center_lr=CENTER, lr_span=SPAN, n_trials=args.trials, epochs=tuple(args.epochs),
            weight_decays=(0.0,), run_dir=run_dir, seed=seed, diagnose=diagnose,
            accelerator="cpu")
        trials = optuna.load_study(study_name=result.study_name,
                                   storage=result.storage).get_trials(deepcopy=False)
    start = min(t.datetime_start for t in trials)
    ended = {t.number: (t.datetime_complete - start).total_seconds() for t in trials}
    rows = sorted(result.rows, key=lambda r: r["number"])
    for r in rows:
        r["elapsed"] = ended[r["number"]]
    return rows


def time_to(rows: list[dict[str, Any]], target: float) -> float:
    """Elapsed seconds when a completed trial first reached ``target``."""
    return next((r["elapsed"] for r in rows
                 if r["state"] == "complete" and r["value"] >= target - 1e-9), float("nan"))


def compare(arch: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    # the two searches take turns going first, so neither always finds the caches warm
    if seed % 2:
        guided = search(arch, seed, True, args)
        plain = search(arch, seed, False, args)
    else:
        plain = search(arch, seed, False, args)
        guided = search(arch, seed, True, args)
    best_plain = max(r["value"] for r in plain if r["state"] == "complete")
    best_guided = max(r["value"] for r in guided if r["state"] == "complete")
    best = max(best_plain, best_guided)
    budget = plain[-1]["elapsed"] / 2

    def near(rows: list[dict[str, Any]]) -> int:
        return sum(r["state"] == "complete" and r["value"] >= best - POINT
                   and r["elapsed"] <= budget for r in rows)

    ended = collections.Counter(r["ended_by"] for r in guided if r["ended_by"])
    plain_ended = collections.Counter(r["ended_by"] for r in plain if r["ended_by"])
    steps = [r["ended_at"] for r in guided if r["ended_by"] not in ("", "pruner")]
    # what the monitors cost: the same trials, completed in both searches
    done_plain = {r["number"]: r["seconds"] for r in plain if r["state"] == "complete"}
    paired = [(r["seconds"], done_plain[r["number"]]) for r in guided
              if r["state"] == "complete" and r["number"] in done_plain]
    overhead = (sum(g for g, _ in paired) / sum(p for _, p in paired)) if paired else float("nan")
    return {"arch": arch, "seed": seed, "best_plain": best_plain, "best_guided": best_guided,
            "t_plain": time_to(plain, best_plain), "t_guided": time_to(guided, best_plain),
            "total_plain": plain[-1]["elapsed"], "total_guided": guided[-1]["elapsed"],
            "near_plain": near(plain), "near_guided": near(guided), "budget": budget,
            "ended": dict(ended), "plain_ended": dict(plain_ended),
            "median_step": statistics.median(steps) if steps else float("nan"),
            "overhead": overhead, "paired": len(paired)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["cnn", "mlp"], choices=("cnn", "mlp"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 5], metavar=("MIN", "MAX"))
    parser.add_argument("--batch-size", type=int, default=64,
                        help="Of the digits loaders: 64 gives 23 steps per epoch, 16 gives 90.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "guided_search.md"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_diag").setLevel(logging.ERROR)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    warm = argparse.Namespace(**{**vars(args), "trials": 2, "epochs": [1, 1]})
    for arch in args.archs:  # imports, allocator and kernel caches, before anything is timed
        for diagnose in (False, True):
            search(arch, 0, diagnose, warm)
    results = []
    for arch in args.archs:
        for seed in args.seeds:
            results.append(compare(arch, seed, args))
            print(row(results[-1]), flush=True)
            write(args, results)


def row(r: dict[str, Any]) -> str:
    saved = 1 - r["t_guided"] / r["t_plain"]
    ended = ", ".join(f"{code} {n}" for code, n in sorted(r["ended"].items()))
    return (f"| {r['arch']} | {r['seed']} | {r['best_plain']:.4f} | {r['best_guided']:.4f} | "
            f"{r['t_plain']:.1f} | {r['t_guided']:.1f} | {saved:.0%} | "
            f"{r['total_plain']:.1f} | {r['total_guided']:.1f} | "
            f"{r['near_plain']} | {r['near_guided']} | {ended} | "
            f"{r['plain_ended'].get('pruner', 0)} | {r['median_step']:g} | "
            f"{r['overhead']:.3f} ({r['paired']}) |")


def write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """The table, rewritten after every pair of searches so a partial run keeps its numbers."""
    saved = [1 - r["t_guided"] / r["t_plain"] for r in results]
    lines = [
        "## Diagnosis-guided pruning vs the plain random search",
        "",
        f"Measured {datetime.date.today()} on {os.cpu_count()} CPU cores. `random_search` over "
        f"lr in [{LOW:g}, {HIGH:g}] (log-uniform), weight decay 0, {args.trials} trials, epochs "
        f"{tuple(args.epochs)} (Optuna's MedianPruner after the first), Adam, digits "
        f"`DigitsClassifier` + `DigitsDataModule(batch_size={args.batch_size}, seed=s)`; the "
        "same seed and trials with "
        "`diagnose=False` (plain) and `diagnose=True` (guided), taking turns going first, after "
        "a warm-up search of each. Times are wall times from the start of the study's first "
        "trial, read from the study's timestamps (no process start-up).",
        "",
        "| arch | seed | best plain | best guided | time to plain's best, plain (s) | guided (s) "
        "| time saved | search total, plain (s) | guided (s) | within 1 point in half "
        "plain's time, plain | guided | guided: trials ended, by rule (finding code, or "
        "Optuna's pruner) | trials the median pruner ended (plain) | median step ended | "
        "completed trials' time, guided/plain (pairs) |",
        "|" + "---|" * 15,
        *map(row, results),
        "",
        f"Time saved to the plain search's best: mean {statistics.mean(saved):.0%}, "
        f"min {min(saved):.0%}, max {max(saved):.0%} over {len(saved)} pairs.",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_guided_search.py --archs "
        f"{' '.join(args.archs)} --seeds {' '.join(map(str, args.seeds))} --trials "
        f"{args.trials} --epochs {args.epochs[0]} {args.epochs[1]} --batch-size "
        f"{args.batch_size}`",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

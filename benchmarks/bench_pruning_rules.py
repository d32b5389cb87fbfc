"""False prunes of each diagnosis rule on a corpus of searches (issue 24).

For each task of ``search_tasks.TASKS`` (optimizers SGD, SGD with momentum, Adam, AdamW;
schedules none, warm-up, one-cycle, cosine, warm-up then cosine; a tanh and a ReLU MLP, a CNN, a
GRU) and each seed, the recipe's search is drawn: a learning-rate sweep (recipe rates 1e-1 to
1e-4, 100 steps, extended once at an edge) picks a rate, and the search draws ``--trials``
configurations log-uniform in ``[pick / span, pick * span]`` (``--span 100``: two decades either
side) and weight decay from (1e-4, 1e-5, 0), with the very sampler :func:`random_search` uses, so
trial ``n`` of seed ``s`` is the same configuration as in a search.

Every trial is then trained to its end (``--epochs`` max, no pruning of any kind) with the
search's trial monitors attached, and every finding that would end a trial under some rule is
recorded with the step it appeared at. A rule's **false prune** is a trial it would end that,
run to the end, finishes within 1 point of its search's best (issue 24). The table gives, per
finding code (WARN and FAIL), how many trials it would end, how many of those are false prunes,
and the share of its trials' training steps it would save.

    .venv/bin/python benchmarks/bench_pruning_rules.py --seeds 0 1 2

The raw records (every trial's configuration, final accuracy, firing steps, step losses and
update ratios) go to ``--json`` so that other rules can be evaluated offline.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from search_tasks import TASKS, Task

from lightning_diag.base import DiagnosticCallback
from lightning_diag.batch import loss_from_output
from lightning_diag.findings import Severity
from lightning_diag.tuning.pruning import PRUNING_CODES, trial_monitors
from lightning_diag.tuning.study import trial_sampler
from lightning_diag.tuning.sweep import build_model, lr_sweep, quiet_trainer

POINT = 0.01
WEIGHT_DECAYS = (1e-4, 1e-5, 0.0)


class Recorder(pl.Callback):
    """Step losses, and the first step each (code, severity) of the monitors appeared at."""

    def __init__(self, monitors: list[DiagnosticCallback]) -> None:
        self.monitors = monitors
        self.losses: list[float] = []
        self.first: dict[str, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(loss_from_output(outputs).detach()))
        for m in self.monitors:
            for f in m.findings:
                if f.severity >= Severity.WARN:
                    key = f"{f.code}:{f.severity.name}"
                    self.first.setdefault(key, trainer.global_step - 1)


def draws(seed: int, center: float, span: float, n: int) -> list[tuple[float, float]]:
    """The ``(lr, weight_decay)`` of trials 0..n-1 of ``random_search(seed=seed)``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=trial_sampler(optuna, seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial.suggest_float("lr", center / span, center * span, log=True),
                    trial.suggest_categorical("weight_decay", list(WEIGHT_DECAYS))))
        study.tell(trial, 0.0)
    return out


def run_trial(task: Task, seed: int, lr: float, wd: float, epochs: int) -> dict[str, Any]:
    monitors = trial_monitors()
    recorder = Recorder(monitors)
    trainer = quiet_trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                            callbacks=[*monitors, recorder], **task.trainer_kwargs())
    start = time.perf_counter()
    trainer.fit(build_model(task.factory, lr, wd, seed), datamodule=task.datamodule(seed))
    acc = trainer.callback_metrics.get("val_acc")
    ratios = next((m.medians for m in monitors if hasattr(m, "medians")), [])
    return {"lr": lr, "weight_decay": wd, "acc": float(acc) if acc is not None else 0.0,
            "steps": trainer.global_step, "seconds": time.perf_counter() - start,
            "first": recorder.first, "losses": recorder.losses,
            "ratios": [[s, r] for s, r in ratios]}


def corpus(args: argparse.Namespace) -> list[dict[str, Any]]:
    searches = []
    for name in args.tasks:
        task = TASKS[name]
        for seed in args.seeds:
            sweep = lr_sweep(task.factory, datamodule=task.datamodule(seed), steps=100,
                             seed=seed, accelerator="cpu", **task.trainer_kwargs())
            trials = [run_trial(task, seed, lr, wd, args.epochs)
                      for lr, wd in draws(seed, sweep.best_lr, args.span, args.trials)]
            searches.append({"task": name, "seed": seed, "pick": sweep.best_lr,
                             "trials": trials, "date": str(datetime.date.today()),
                             "load": os.getloadavg()[0]})
            best = max(t["acc"] for t in trials)
            fired = collections.Counter(k for t in trials for k in t["first"])
            print(f"{name} seed {seed}: pick {sweep.best_lr:g}, best {best:.3f}, "
                  f"{sum(t['seconds'] for t in trials):.1f} s, fired {dict(fired)}", flush=True)
            Path(args.json).write_text(json.dumps(searches), encoding="utf-8")
    return searches


def tally(searches: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``code:SEVERITY``: trials it would end, false prunes, steps it would save."""
    out: dict[str, dict[str, Any]] = {}
    for s in searches:
        best = max(t["acc"] for t in s["trials"])
        for t in s["trials"]:
            for key, step in t["first"].items():
                row = out.setdefault(key, {"ended": 0, "false": [], "saved": 0, "steps": 0,
                                           "at": []})
                row["ended"] += 1
                row["saved"] += t["steps"] - (step + 1)
                row["steps"] += t["steps"]
                row["at"].append(step)
                if t["acc"] >= best - POINT:
                    row["false"].append(f"{s['task']} s{s['seed']} lr {t['lr']:.2g} "
                                        f"({t['acc']:.3f} vs best {best:.3f}, step {step})")
    return out


def margins(searches: list[dict[str, Any]]) -> tuple[tuple[float, str], tuple[float, str]]:
    """The update ratios of the trials within 1 point of their search's best that came closest
    to each threshold: the largest median ratio at any logged step (``too_high`` fires at 1),
    and the smallest largest-of-3-consecutive logged medians (``too_low`` needs 3 below 1e-5)."""
    high, low = (0.0, ""), (math.inf, "")
    for s in searches:
        best = max(t["acc"] for t in s["trials"])
        for t in s["trials"]:
            ratios = [r for _, r in t["ratios"] if math.isfinite(r)]
            if t["acc"] < best - POINT or not ratios:
                continue
            where = f"{s['task']} s{s['seed']} lr {t['lr']:.2g}"
            high = max(high, (max(ratios), where))
            runs = [max(ratios[i:i + 3]) for i in range(len(ratios) - 2)]
            low = min(low, (min(runs, default=math.inf), where))
    return high, low


def write(args: argparse.Namespace, searches: list[dict[str, Any]]) -> None:
    rows = tally(searches)
    total_trials = sum(len(s["trials"]) for s in searches)
    (high, high_at), (low, low_at) = margins(searches)
    loads = [s["load"] for s in searches if "load" in s] or args.load
    dates = sorted({s.get("date", args.date) for s in searches})
    lines = [
        "## False prunes of each diagnosis rule (issue 24)",
        "",
        f"Measured {', '.join(dates)} on {os.cpu_count()} CPU cores shared with other jobs "
        f"(load average {min(loads):.1f}-{max(loads):.1f}). "
        f"{len(searches)} searches ({len(args.tasks)} tasks x seeds {args.seeds}), "
        f"{args.trials} trials each ({total_trials} trials), lr log-uniform in [pick / "
        f"{args.span:g}, pick x {args.span:g}] around each seed's sweep pick, weight decay from "
        f"{WEIGHT_DECAYS}, every trial trained {args.epochs} epochs with the monitors of the "
        "search's trials before issue 24 attached (`LRPlateauAdvisor(stall_steps=30)`, "
        "`UpdateRatioMonitor(every_n_steps=20, high=1, extreme=1)`, `ActivationHistogram("
        "every_n_steps=50)`) and nothing ended. A false prune: a trial the rule would end that, "
        "trained to its end, finishes within 1 point of its search's best. \"ends a trial\": "
        "in `PRUNING_CODES` now (any FAIL ends one too; none was seen). Deterministic given "
        "the seeds (CPU, one thread); the seconds below are wall times on a shared machine.",
        "",
        "| finding (severity) | ends a trial | trials it would end | false prunes | median "
        "step | share of those trials' steps it would save |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(rows, key=lambda k: (-len(rows[k]["false"]), k)):
        r = rows[key]
        code, _, severity = key.partition(":")
        today = "**yes**" if severity == "FAIL" or code in PRUNING_CODES else "no"
        at = sorted(r["at"])[len(r["at"]) // 2]
        lines.append(f"| `{code}` ({severity}) | {today} | {r['ended']} | {len(r['false'])} | "
                     f"{at} | {r['saved'] / max(1, r['steps']):.0%} |")
    lines += ["", "Margins of the update-ratio thresholds over the trials within 1 point of "
              f"their search's best: the largest median update ratio any of them reached is "
              f"{high:.3g} ({high_at}; `too_high` ends a trial at 1); the smallest ratio any "
              f"of them stayed under for 3 consecutive logged steps is {low:.3g} ({low_at}; "
              "`too_low` fires below 1e-5).",
              "", "False prunes, each: task, seed, learning rate (final accuracy vs the "
              "search's best, the step the rule fired at):", ""]
    for key, r in sorted(rows.items()):
        for what in r["false"]:
            lines.append(f"- `{key}`: {what}")
    lines += ["", "Searches:", "", "| task | seed | sweep pick | best | trials | seconds |",
              "|---|---|---|---|---|---|"]
    for s in searches:
        lines.append(f"| {s['task']} | {s['seed']} | {s['pick']:g} | "
                     f"{max(t['acc'] for t in s['trials']):.3f} | {len(s['trials'])} | "
                     f"{sum(t['seconds'] for t in s['trials']):.1f} |")
    lines += ["", f"Command: `.venv/bin/python benchmarks/bench_pruning_rules.py --tasks "
              f"{' '.join(args.tasks)} --seeds {' '.join(map(str, args.seeds))} --trials "
              f"{args.trials} --epochs {args.epochs} --span {args.span:g}`"]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--span", type=float, default=100.0)
    results = Path(__file__).parent / "results"
    parser.add_argument("--out", default=str(results / "pruning_rules.md"))
    parser.add_argument("--json", default=str(Path("/tmp") / "pruning_rules.json"))
    parser.add_argument("--from-json", action="store_true",
                        help="Tabulate the records of --json again without training.")
    parser.add_argument("--date", default=str(datetime.date.today()),
                        help="With --from-json: the date of records that do not hold theirs.")
    parser.add_argument("--load", type=float, nargs="+", default=[os.getloadavg()[0]],
                        help="With --from-json: the load seen while records that do not hold "
                             "theirs were measured.")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_diag").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.from_json:
        searches = json.loads(Path(args.json).read_text(encoding="utf-8"))
    else:
        searches = corpus(args)
    write(args, searches)


if __name__ == "__main__":
    main()

"""Cost per epoch and fixed cost of the callbacks, by the slope method (issue 23 part 1).

Each arm trains the digits CNN (``DigitsClassifier(arch="cnn")``, digits, batch 64, 23 steps
an epoch, validation every epoch, a TensorBoardLogger) for ``--short`` and ``--long`` epochs
(10 and 40 by default):

- ``plain``: no callback;
- ``four``: ActivationHistogram, UpdateRatioMonitor, FirstLayerVisualization and
  LearningCurves at their defaults (the step-5 monitors);
- ``eleven``: every callback of the library at its defaults: DataInspection, GradientCheck,
  InitialLossCheck, OverfitSmallBatch (the pre-flight checks, once per fit), the four monitors,
  LRPlateauAdvisor, EMAWeights and CheckpointEnsemble;
- ``ten`` (with ``--arms``): the eleven but CheckpointEnsemble, to show its share.

An arm's cost per epoch is the slope ``(T_long - T_short) / (long - short)`` and its fixed cost
the intercept ``T_short - short * slope``; the figures are the arm's slope over the plain
Trainer's (the per-epoch ratio) and the arm's intercept minus the plain one (the fixed seconds,
pre-flight checks and end-of-fit figures included), each pair of runs giving one reading. Runs
are interleaved (the arms rotate, the lengths alternate), one intra-op thread; wall time,
process CPU time and the training thread's CPU time are reported, with the 1-minute load
average before and after.

Whole-run slopes on a busy machine vary by more than the 2 % they are to resolve, so the
script also attributes: in separate runs of each arm, Lightning's hook dispatch is timed around
every call of a callback's hook (training-thread CPU), and the slope of that time against the
plain Trainer's per-epoch CPU gives the per-epoch ratio the callbacks account for, with the
largest items by callback and hook. With ``--pairs 0`` only the attribution runs (and, as
its reference, ``--attribution-pairs`` pairs of plain Trainer runs) are made.

Usage:
    python benchmarks/bench_cost.py --pairs 5
    python benchmarks/bench_cost.py --pairs 0 --attribution-pairs 2 --arms eleven
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
import matplotlib

matplotlib.use("Agg")
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer import call

from lightning_diag.callbacks import (
    ActivationHistogram,
    CheckpointEnsemble,
    DataInspection,
    EMAWeights,
    FirstLayerVisualization,
    GradientCheck,
    InitialLossCheck,
    LearningCurves,
    LRPlateauAdvisor,
    OverfitSmallBatch,
    UpdateRatioMonitor,
)
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule

#: Per-epoch ratio and fixed seconds the issue asks for (issue 23 part 1).
TARGET_RATIO, TARGET_FIXED = 1.02, 0.15
CLOCKS = ("wall", "cpu", "thread")
#: Hooks Lightning calls once per fit: fixed costs, whatever the run's length.
ONCE = frozenset({"setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start",
                  "on_train_end", "on_sanity_check_start", "on_sanity_check_end",
                  "on_exception"})


def four() -> list[pl.Callback]:
    return [ActivationHistogram(), UpdateRatioMonitor(), FirstLayerVisualization(),
            LearningCurves()]


def eleven() -> list[pl.Callback]:
    return [DataInspection(), GradientCheck(), InitialLossCheck(), OverfitSmallBatch(), *four(),
            LRPlateauAdvisor(), EMAWeights(), CheckpointEnsemble()]


def ten() -> list[pl.Callback]:
    """The eleven but CheckpointEnsemble (it saves a checkpoint every epoch): its share."""
    return [cb for cb in eleven() if not isinstance(cb, CheckpointEnsemble)]


ARMS: dict[str, Callable[[], list[pl.Callback]]] = {"plain": list, "four": four,
                                                    "eleven": eleven, "ten": ten}


def fit(callbacks: list[pl.Callback], epochs: int, root: str) -> dict[str, float]:
    """Seconds of one ``trainer.fit`` on each clock."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
        logger=TensorBoardLogger(root, name="bench"), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        default_root_dir=root)
    model, data = DigitsClassifier(arch="cnn"), DigitsDataModule(64)
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    trainer.fit(model, data)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "thread": time.thread_time() - thread}


def measure(arms: list[str], short: int, long: int, pairs: int
            ) -> dict[str, list[dict[str, dict[str, float]]]]:
    """``pairs`` readings of each arm: {arm: [{length: {clock: seconds}}, ...]}."""
    out: dict[str, list[dict[str, dict[str, float]]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as root:
        for arm in arms:  # warm-up, discarded: the first fit of a process pays one-off costs
            fit(ARMS[arm](), 1, root)
        for p in range(pairs):
            order = arms[p % len(arms):] + arms[:p % len(arms)]
            lengths = (short, long) if p % 2 == 0 else (long, short)
            runs: dict[str, dict[str, dict[str, float]]] = {arm: {} for arm in arms}
            for length in lengths:
                for arm in order:
                    runs[arm][str(length)] = t = fit(ARMS[arm](), length, root)
                    print(f"  pair {p + 1} {arm:6s} {length:3d} epochs: wall {t['wall']:.2f} s "
                          f"cpu {t['cpu']:.2f} s thread {t['thread']:.2f} s "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
            for arm in arms:
                out[arm].append(runs[arm])
    return out


class Attribution:
    """Lightning's ``_call_callback_hooks`` with each call of a callback's hook timed in the
    training thread's CPU time, the profiler context and the name it builds included (what
    Lightning spends on the callbacks: the rest of a step is the plain Trainer's)."""

    def __init__(self) -> None:
        self.seconds: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.calls: Counter[tuple[str, str]] = Counter()

    def __enter__(self) -> Attribution:
        self._real = call._call_callback_hooks
        call._call_callback_hooks = self._timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        call._call_callback_hooks = self._real  # type: ignore[assignment]

    def _timed(self, trainer: pl.Trainer, hook_name: str, *args: Any,
               monitoring_callbacks: bool | None = None, **kwargs: Any) -> None:
        module = trainer.lightning_module
        previous = module._current_fx_name if module is not None else None
        if module is not None:
            module._current_fx_name = hook_name
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            monitoring = isinstance(cb, (EarlyStopping, Checkpoint))
            if monitoring_callbacks is not None and monitoring != monitoring_callbacks:
                continue
            fn = getattr(cb, hook_name)
            if callable(fn):
                start = time.thread_time()
                profiler = trainer.profiler  # type: ignore[attr-defined]
                with profiler.profile(f"[Callback]{cb.state_key}.{hook_name}"):
                    fn(trainer, trainer.lightning_module, *args, **kwargs)
                key = (type(cb).__name__, hook_name)
                self.seconds[key] += time.thread_time() - start
                self.calls[key] += 1
        if module is not None:
            module._current_fx_name = previous


def attribute(arms: list[str], short: int, long: int, pairs: int
              ) -> dict[str, list[dict[str, Attribution]]]:
    """``pairs`` attributed runs of each arm but the plain one, at both lengths."""
    out: dict[str, list[dict[str, Attribution]]] = {arm: [] for arm in arms if arm != "plain"}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(pairs):
            for arm in out:
                runs = {}
                for length in (short, long):
                    with Attribution() as runs[str(length)]:
                        fit(ARMS[arm](), length, root)
                out[arm].append(runs)
    return out


def attributed(data: dict[str, list[dict[str, Attribution]]],
               timed: dict[str, list[dict[str, dict[str, float]]]], short: int, long: int
               ) -> list[str]:
    """Markdown: each arm's time in the callbacks per epoch (slope) against the plain
    Trainer's training-thread CPU per epoch, its time in them outside the epochs (intercept),
    and the callbacks' and hooks' largest shares per epoch."""
    plain = statistics.median(slope_and_fixed(r, "thread", short, long)[0]
                              for r in timed["plain"])
    rows, parts, fixed_lines = [], [], []
    for arm, runs in data.items():
        slopes, fixed = [], []
        for run in runs:  # hooks called once per fit are fixed: kept out of the slope
            t_short, t_long = (sum(v for (_, hook), v in run[str(n)].seconds.items()
                                   if hook not in ONCE) for n in (short, long))
            slopes.append((t_long - t_short) / (long - short))
            once = statistics.mean(sum(v for (_, hook), v in run[str(n)].seconds.items()
                                       if hook in ONCE) for n in (short, long))
            fixed.append(t_short - short * slopes[-1] + once)
        slope = statistics.median(slopes)
        rows.append(f"| {arm} | **{1 + slope / plain:.4f}x** | {slope * 1e3:.2f} ms of "
                    f"{plain * 1e3:.1f} ms | {statistics.median(fixed):.3f} s |")
        keys = {k for k in set(runs[0][str(long)].seconds) | set(runs[0][str(short)].seconds)
                if k[1] not in ONCE}
        share = {k: statistics.median((r[str(long)].seconds[k] - r[str(short)].seconds[k])
                                      / (long - short) for r in runs) for k in keys}
        top = sorted(share.items(), key=lambda kv: -kv[1])[:8]
        parts.append(f"- {arm}: " + "; ".join(
            f"{cb}.{hook} {s * 1e3:.2f} ms ({runs[0][str(long)].calls[(cb, hook)] / long:.1f} "
            "calls)" for (cb, hook), s in top if s > 0))
        fixed_lines.append(f"- {arm}: " + "; ".join(
            f"{cb}.{hook} {s * 1e3:.0f} ms" for (cb, hook), s in fixed_items(runs)[:10]))
    return ["| arm | per-epoch ratio attributed | time in the callbacks per epoch, of the plain "
            "Trainer's training-thread CPU per epoch | time in the callbacks once per fit "
            "and its intercept (fixed) |", "|---|---|---|---|", *rows, "",
            "Largest per-epoch items (hook: training-thread CPU per epoch, calls per epoch):",
            "", *parts, "",
            "Largest fixed items (hooks called once per fit: training-thread CPU, median over "
            "the attributed runs of both lengths):", "", *fixed_lines]


def fixed_items(runs: list[dict[str, Attribution]]) -> list[tuple[tuple[str, str], float]]:
    """The hooks called once per fit, by their median training-thread CPU, largest first."""
    keys = {k for run in runs for a in run.values() for k in a.seconds if k[1] in ONCE}
    items = {k: statistics.median(a.seconds.get(k, 0.0) for run in runs for a in run.values())
             for k in keys}
    return sorted(items.items(), key=lambda kv: -kv[1])


def slope_and_fixed(run: dict[str, dict[str, float]], clock: str, short: int, long: int
                    ) -> tuple[float, float]:
    """Seconds per epoch and fixed seconds of one pair of runs of an arm."""
    slope = (run[str(long)][clock] - run[str(short)][clock]) / (long - short)
    return slope, run[str(short)][clock] - short * slope


def summarize(data: dict[str, list[dict[str, dict[str, float]]]], short: int, long: int
              ) -> list[str]:
    """Markdown rows: each arm against the plain Trainer, on each clock."""
    rows = []
    plain = data["plain"]
    for arm in (a for a in data if a != "plain"):
        for clock in CLOCKS:
            ratios, fixed, per_epoch = [], [], []
            for mine, base in zip(data[arm], plain, strict=True):
                s, f = slope_and_fixed(mine, clock, short, long)
                s0, f0 = slope_and_fixed(base, clock, short, long)
                ratios.append(s / s0)
                fixed.append(f - f0)
                per_epoch.append((s - s0) * 1e3)
            ratio, extra = statistics.median(ratios), statistics.median(fixed)
            verdict = ("met" if ratio <= TARGET_RATIO and extra <= TARGET_FIXED else
                       "ratio met" if ratio <= TARGET_RATIO else
                       "fixed met" if extra <= TARGET_FIXED else "not met")
            rows.append(
                f"| {arm} | {clock} | **{ratio:.3f}x** | {min(ratios):.3f}-{max(ratios):.3f} | "
                f"{statistics.median(per_epoch):+.1f} ms | **{extra:.3f} s** | "
                f"{min(fixed):.3f}-{max(fixed):.3f} | {verdict if clock == 'wall' else ''} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--arms", nargs="+", default=["plain", "four", "eleven"],
                        choices=list(ARMS))
    parser.add_argument("--attribution-pairs", type=int, default=1,
                        help="attributed runs of each arm at both lengths (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/cost.md")
    args = parser.parse_args()
    if args.pairs < 0 or args.attribution_pairs < 0 or not args.pairs + args.attribution_pairs:
        parser.error("--pairs and --attribution-pairs: >= 0, and not both 0")
    arms = ["plain", *(a for a in args.arms if a != "plain")]
    # One intra-op thread: on a shared machine, spinning OpenMP workers make timings meaningless.
    torch.set_num_threads(args.threads)
    load, start = os.getloadavg(), time.perf_counter()
    # attribution alone: its reference, the plain Trainer's CPU per epoch, is measured as many times
    data = (measure(arms, args.short, args.long, args.pairs) if args.pairs else
            measure(["plain"], args.short, args.long, args.attribution_pairs))
    credit = attribute(arms, args.short, args.long, args.attribution_pairs)
    load_end, took = os.getloadavg(), time.perf_counter() - start
    plain = {str(n): statistics.median(r[str(n)]["wall"] for r in data["plain"])
             for n in (args.short, args.long)}
    lines = [
        "## Cost per epoch and fixed cost (issue 23 part 1)", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU "
        f"cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"lightning {pl.__version__}, {args.threads} intra-op thread(s); 1-minute load average "
        f"{load[0]:.2f} at the start, {load_end[0]:.2f} at the end; {took:.0f} s in all. "
        f"Command: `python benchmarks/bench_cost.py --pairs {args.pairs} --attribution-pairs "
        f"{args.attribution_pairs} --short {args.short} --long {args.long} --arms "
        f"{' '.join(arms[1:])}`.", "",
        f"Digits CNN, batch 64 (23 steps an epoch), validation every epoch, TensorBoardLogger; "
        f"plain Trainer median wall {plain[str(args.short)]:.2f} s for {args.short} epochs, "
        f"{plain[str(args.long)]:.2f} s for {args.long}. Per pair: each arm run for "
        f"{args.short} and {args.long} epochs (interleaved); per-epoch cost = slope between the "
        "two, fixed = intercept; ratio = arm slope / plain slope, fixed = arm intercept - plain "
        f"intercept; median and range over {args.pairs} pairs. Targets: <= {TARGET_RATIO}x per "
        f"epoch, <= {TARGET_FIXED} s fixed. Clocks: wall, process CPU (`cpu`, background "
        "threads included), the training thread's CPU (`thread`).", "",
        *(["| arm | clock | per-epoch ratio (median) | range | extra per epoch (median) | "
           "fixed (median) | range | verdict (wall) |", "|---|---|---|---|---|---|---|---|",
           *summarize(data, args.short, args.long)] if args.pairs else
          [f"No whole-run pairs (`--pairs 0`): the plain Trainer alone was run "
           f"{args.attribution_pairs} time(s) at both lengths, as the attribution's reference."])]
    if args.attribution_pairs:
        lines += ["", "Attributed (less sensitive to the machine's load than the whole run): "
                  "the training thread's CPU time inside every call Lightning makes to a "
                  "callback's hook (its profiler context and the name it builds included), "
                  f"per epoch as the slope between {args.short} and {args.long} epochs, "
                  f"median of {args.attribution_pairs} pair(s) of separate runs, against the "
                  "plain Trainer's training-thread CPU per epoch (the slope above):", "",
                  *attributed(credit, data, args.short, args.long)]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()

"""Overhead of TrainingInvariants on the digits CNN (issue 20, item 5: at most 2%).

The digits CNN (``DigitsClassifier(arch="cnn")``, digits, batch 64, 23 steps per epoch,
validation every epoch) trains with a TensorBoardLogger and one intra-op thread. Three figures:

1. Whole-run ratio: a plain Trainer against one with ``TrainingInvariants()`` at its defaults,
   the two arms interleaved in one process (which goes first alternates each repeat); wall and
   process-CPU time of the long run over the plain one of the same repeat (median, range).
2. Slope: the same pairs at two run lengths; the extra time per optimizer step,
   ``((arm_long - arm_short) - (plain_long - plain_short)) / extra steps``, leaves out what a fit
   pays once (setup, the summary at the end); its share of the plain run's own time per step.
3. Attributed time: the training thread's CPU time spent inside the callback's hooks and its
   gradient hook (each wrapped with a thread-CPU clock, whose own reads are counted too, so this
   overstates), as a share of the whole fit's thread CPU time; at the defaults and with
   ``every_n_steps=1`` (every step checked). A machine shared with other jobs slows both alike,
   so this share holds where the ratios of 1 and 2 drown in its noise.

Usage:
    python benchmarks/bench_invariants.py --repeats 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag.callbacks._optimizer_watch import OptimizerSteps
from lightning_diag.callbacks.invariants import TrainingInvariants
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule

HOOKS = ("setup", "on_train_start", "on_before_optimizer_step", "on_train_batch_end",
         "on_train_epoch_end", "on_train_epoch_start", "on_train_end", "teardown")


def fit(callbacks: list[pl.Callback], epochs: int) -> tuple[float, float, float, int, set[str]]:
    """(wall s, process CPU s, thread CPU s, optimizer steps, WARN/FAIL codes) of one fit."""
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
            logger=TensorBoardLogger(root, name="bench"), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
            default_root_dir=root)
        model, data = DigitsClassifier(arch="cnn"), DigitsDataModule(64)
        start, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
        trainer.fit(model, datamodule=data)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        thread = time.thread_time() - thread
    found = {f.code for cb in callbacks for f in getattr(cb, "findings", [])
             if f.severity >= "warn"}
    return wall, cpu, thread, trainer.global_step, found


def _timed(fn: Callable[..., Any], spent: list[int]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.thread_time_ns() - start

    return wrapper


def attributed(every_n_steps: int, epochs: int) -> tuple[float, float, int]:
    """(share of the fit's thread CPU inside the callback, seconds inside it, steps)."""
    spent = [0]
    cb = TrainingInvariants(every_n_steps=every_n_steps)
    for hook in HOOKS:
        setattr(cb, hook, _timed(getattr(cb, hook), spent))
    real = OptimizerSteps._on_backward
    OptimizerSteps._on_backward = staticmethod(_timed(real, spent))  # type: ignore[method-assign]
    try:
        _, _, thread, steps, _ = fit([cb], epochs)
    finally:
        OptimizerSteps._on_backward = staticmethod(real)  # type: ignore[method-assign]
    return spent[0] / 1e9 / thread, spent[0] / 1e9, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs=2, default=[5, 30],
                        help="the short and the long run")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--attribution-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/invariants.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # spinning OpenMP workers make timings meaningless
    short, long = args.epochs
    load = os.getloadavg()
    fit([], 1)  # warm-up, discarded: the first fit of a process pays one-off costs
    runs: dict[tuple[bool, int], list[tuple[float, float]]] = {}
    steps: dict[int, int] = {}
    found: set[str] = set()
    for r in range(args.repeats):
        for epochs in (short, long):
            for watched in ((False, True) if r % 2 == 0 else (True, False)):
                wall, cpu, _, steps[epochs], codes = fit(
                    [TrainingInvariants()] if watched else [], epochs)
                found |= codes
                runs.setdefault((watched, epochs), []).append((wall, cpu))
                print(f"  invariants={watched} epochs={epochs} wall {wall:.2f}s cpu {cpu:.2f}s "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    load_mid = os.getloadavg()
    shares = {every: [attributed(every, long) for _ in range(args.attribution_repeats)]
              for every in (100, 1)}
    load_end = os.getloadavg()
    extra = steps[long] - steps[short]
    rows = []
    for k, what in ((0, "wall"), (1, "CPU")):
        ratio = [a[k] / p[k] for a, p in zip(runs[True, long], runs[False, long], strict=True)]
        slope, share = [], []
        for i in range(args.repeats):
            plain = runs[False, long][i][k] - runs[False, short][i][k]
            arm = runs[True, long][i][k] - runs[True, short][i][k]
            slope.append((arm - plain) / extra)
            share.append((arm - plain) / plain)
        rows.append(
            f"| {what} | {statistics.median(p[k] for p in runs[False, long]):.2f} | "
            f"{statistics.median(a[k] for a in runs[True, long]):.2f} | "
            f"**{statistics.median(ratio):.3f}x** | {min(ratio):.3f}-{max(ratio):.3f} | "
            f"{statistics.median(slope) * 1e6:+.0f} us | **{statistics.median(share):+.2%}** | "
            f"{min(share):+.2%} to {max(share):+.2%} |")
    plain_step = statistics.median((runs[False, long][i][1] - runs[False, short][i][1]) / extra
                                   for i in range(args.repeats))
    attribution = [
        f"| `TrainingInvariants({'' if every == 100 else 'every_n_steps=1'})` | "
        f"**{statistics.median(s for s, _, _ in shares[every]):.2%}** | "
        f"{min(s for s, _, _ in shares[every]):.2%}-{max(s for s, _, _ in shares[every]):.2%} | "
        f"{statistics.median(t / n for _, t, n in shares[every]) * 1e6:.0f} us |"
        for every in (100, 1)]
    lines = [
        "## TrainingInvariants on the digits CNN (issue 20, item 5)", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s), machine shared with other jobs; 1-minute load "
        f"average {load[0]:.2f} at the start, {load_mid[0]:.2f} after the pairs, "
        f"{load_end[0]:.2f} at the end. Command: `python benchmarks/bench_invariants.py "
        f"--repeats {args.repeats} --epochs {short} {long}`.", "",
        f"`DigitsClassifier(arch=\"cnn\")` on digits (1437 train images, batch 64, "
        f"{steps[long] // long} steps per epoch, validation every epoch), TensorBoardLogger in "
        f"both arms, arms interleaved (which goes first alternates), {args.repeats} repeats. "
        f"Ratio: the {long}-epoch run ({steps[long]} steps) over the plain one of the same "
        f"repeat. Slope: the extra time per step between the {short}- and the {long}-epoch "
        f"runs ({extra} steps apart); the plain run takes {plain_step * 1e3:.2f} ms of CPU per "
        "step; share: the extra over the plain run's own time for those steps.", "",
        "| clock | plain (s, median) | with TrainingInvariants() (s, median) | ratio (median) | "
        "range | extra per step (slope, median) | extra share (slope, median) | range |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Attributed: the training thread's CPU time inside the callback (hooks and gradient "
        f"hook, clock reads included) over the fit's, {long} epochs, median of "
        f"{args.attribution_repeats}:", "",
        "| callback | share of the fit's thread CPU | range | per step |", "|---|---|---|---|",
        *attribution, "",
        f"WARN/FAIL findings in these runs: {sorted(found) or 'none'}.", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    previous = ""
    if os.path.exists(args.out):
        with open(args.out) as fh:
            previous = fh.read()
    if previous:
        old = previous.split("# Earlier runs (kept for comparison)\n\n")
        previous = "\n# Earlier runs (kept for comparison)\n\n" + "\n".join(
            ["#" + old[0], *old[1:]])
    with open(args.out, "w") as fh:
        fh.write(text + previous)


if __name__ == "__main__":
    main()

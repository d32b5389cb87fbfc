"""Overhead of the four step-5 monitors at their defaults (issue 3).

Part 1 trains the digits CNN (``DigitsClassifier(arch="cnn")``, digits, 30 epochs) and a
~10M-parameter MLP (64-3072-3072-10 on synthetic 8x8 "images", 2 epochs of 4096 samples) with a
plain Trainer and with ActivationHistogram, UpdateRatioMonitor, FirstLayerVisualization and
LearningCurves at their defaults, a TensorBoardLogger in both arms, alternating the arms
(plain first, then monitored first) ``--repeats`` times, one intra-op thread. It reports the
median and the range of the wall-time and process-CPU-time ratios.

Part 2 measures each monitor's cost per event, in CPU time (the training thread's and the
whole process's):
- a logging step of ActivationHistogram / UpdateRatioMonitor: a fit of ``--cost-batches``
  batches logging on every step minus the same fit logging only on step 0, divided by the
  extra logging steps (this includes the work done inside forward and backward by the hooks);
- a draw (the summary figure, the filter grid, the learning-curve figure) and LearningCurves'
  per-epoch work: the time spent inside the callback's own hook, measured by wrapping it.

Usage:
    python benchmarks/bench_monitors.py --repeats 3
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
import matplotlib

matplotlib.use("Agg")
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.callbacks.first_layer import FirstLayerVisualization
from lightning_diag.callbacks.learning_curves import LearningCurves
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule

Data = Callable[[], Any]


def big_mlp(width: int = 3072) -> DigitsClassifier:
    model = DigitsClassifier(arch="mlp", dropout=0.0)
    model.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                              nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return model


def synthetic(n: int = 4096, n_val: int = 512) -> tuple[DataLoader, DataLoader]:
    """Separable 10-class 8x8 'images' (class means + noise), batch 64."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(10, 1, 8, 8, generator=gen)

    def split(size: int) -> TensorDataset:
        y = torch.randint(0, 10, (size,), generator=gen)
        return TensorDataset(means[y] + torch.randn(size, 1, 8, 8, generator=gen), y)

    return (DataLoader(split(n), batch_size=64, shuffle=True, generator=gen),
            DataLoader(split(n_val), batch_size=64))


MODELS: dict[str, tuple[Callable[[], DigitsClassifier], Data, dict, str]] = {
    "digits CNN": (lambda: DigitsClassifier(arch="cnn"), lambda: (DigitsDataModule(64),), {},
                   "digits (1437 train images, batch 64, 23 steps/epoch)"),
    "MLP 64-3072-3072-10 (10.0M params)": (big_mlp, synthetic, {"input_shape": (8, 8)},
                                           "synthetic (4096 samples, batch 64, 64 steps/epoch)"),
}


def monitors(first_layer_kw: dict) -> list[pl.Callback]:
    return [ActivationHistogram(), UpdateRatioMonitor(), FirstLayerVisualization(**first_layer_kw),
            LearningCurves()]


def fit(name: str, callbacks: list[pl.Callback], epochs: int,
        batches: int | None = None) -> tuple[float, float, int, float]:
    """(wall seconds, process CPU seconds, optimizer steps, training-thread CPU seconds) of one
    ``trainer.fit``; the training thread's excludes the monitors' background worker."""
    make, data, _, _ = MODELS[name]
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
            logger=TensorBoardLogger(root, name="bench"), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
            default_root_dir=root, limit_train_batches=batches,
            limit_val_batches=0 if batches else None)
        model, loaders = make(), data()
        start, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
        trainer.fit(model, *loaders)
        return (time.perf_counter() - start, time.process_time() - cpu, trainer.global_step,
                time.thread_time() - thread)


def overhead(name: str, epochs: int, repeats: int) -> dict:
    plain: list[tuple[float, float]] = []
    watched: list[tuple[float, float]] = []
    steps, found = 0, set()
    fit(name, [], 1, 4)  # warm-up, discarded: the first fit of a process pays one-off costs
    for r in range(repeats):
        for with_monitors in ([False, True] if r % 2 == 0 else [True, False]):
            cbs = monitors(MODELS[name][2]) if with_monitors else []
            seconds, cpu_seconds, steps, _ = fit(name, cbs, epochs)
            found |= {f.code for cb in cbs for f in getattr(cb, "findings", [])
                      if f.severity >= "warn"}
            (watched if with_monitors else plain).append((seconds, cpu_seconds))
            print(f"  {name} monitors={with_monitors} wall {seconds:.2f}s cpu {cpu_seconds:.2f}s "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    wall = [w[0] / p[0] for w, p in zip(watched, plain, strict=True)]
    cpu = [w[1] / p[1] for w, p in zip(watched, plain, strict=True)]
    return {"plain": statistics.median(p[0] for p in plain),
            "watched": statistics.median(w[0] for w in watched), "wall": wall, "cpu": cpu,
            "steps": steps, "found": sorted(found) or "none"}


def timed(cb: pl.Callback, hook: str) -> list[float]:
    """Wrap ``cb.<hook>`` to record the process CPU time of each call."""
    orig, times = getattr(cb, hook), []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        out = orig(*args, **kwargs)
        times.append(time.process_time() - start)
        return out

    setattr(cb, hook, wrapper)
    return times


def event_costs(name: str, repeats: int, batches: int) -> dict[str, float]:
    """Median CPU seconds per event of each monitor."""
    out: dict[str, list[float]] = {}
    fl_kw = MODELS[name][2]
    fit(name, [UpdateRatioMonitor(every_n_steps=1), ActivationHistogram(every_n_steps=1)], 1, 4)
    for _ in range(repeats):
        for label, make in (("ActivationHistogram: one logging step", ActivationHistogram),
                            ("UpdateRatioMonitor: one logging step", UpdateRatioMonitor)):
            every = fit(name, [make(every_n_steps=1)], 1, batches)
            once = fit(name, [make(every_n_steps=10**9)], 1, batches)
            out.setdefault(f"{label}, training thread", []).append(
                (every[3] - once[3]) / (batches - 1))
            out.setdefault(f"{label}, whole process", []).append(
                (every[1] - once[1]) / (batches - 1))
        hist, first, curves = (ActivationHistogram(), FirstLayerVisualization(**fl_kw),
                               LearningCurves())
        draws = {"ActivationHistogram: summary figure (once, at fit end)":
                 timed(hist, "on_train_end"),
                 "FirstLayerVisualization: one filter grid (epoch 10, 20, ... and fit end)":
                 timed(first, "on_train_end"),
                 "LearningCurves: per-epoch scalars and layout":
                 timed(curves, "on_train_epoch_end"),
                 "LearningCurves: figure and PNG (once, at fit end)":
                 timed(curves, "on_train_end")}
        fit(name, [hist, first, curves], 2, batches)
        for label, times in draws.items():
            out.setdefault(label, []).append(statistics.mean(times))
    return {label: statistics.median(v) for label, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs=2, default=[30, 2],
                        help="epochs of the CNN and of the MLP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cost-repeats", type=int, default=3)
    parser.add_argument("--cost-batches", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/monitors.md")
    args = parser.parse_args()
    # One intra-op thread: on a shared machine, spinning OpenMP workers make timings meaningless.
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    rows = []
    for name, epochs in zip(MODELS, args.epochs, strict=True):
        r = overhead(name, epochs, args.repeats)
        rows.append(
            f"| {name} | {MODELS[name][3]} | {epochs} | {r['steps']} | {r['plain']:.2f} | "
            f"{r['watched']:.2f} | **{statistics.median(r['wall']):.3f}x** | "
            f"{min(r['wall']):.3f}-{max(r['wall']):.3f} | {statistics.median(r['cpu']):.3f}x | "
            f"{min(r['cpu']):.3f}-{max(r['cpu']):.3f} | {r['found']} |")
        print(rows[-1], flush=True)
    load_mid = os.getloadavg()
    costs = {name: event_costs(name, args.cost_repeats, args.cost_batches) for name in MODELS}
    load_end = os.getloadavg()
    lines = [
        "## Step-5 monitors (issue 3)", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s), machine shared with other jobs; 1-minute load "
        f"average {load[0]:.2f} at the start, {load_mid[0]:.2f} after part 1, {load_end[0]:.2f} "
        "at the end. Command: `python benchmarks/bench_monitors.py --repeats "
        f"{args.repeats} --cost-repeats {args.cost_repeats}`.", "",
        "All four monitors at their defaults vs a plain Trainer (TensorBoardLogger in both arms, "
        f"validation every epoch), arms alternated, {args.repeats} pairs; ratio = monitored / "
        "plain of the same pair:", "",
        "| model | data | epochs | steps | plain wall (s, median) | monitored wall (s, median) "
        "| wall ratio (median) | wall ratio range | CPU ratio (median) | CPU ratio range | "
        "WARN findings |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Cost per event, CPU time, median of "
        f"{args.cost_repeats} (logging steps: fit of {args.cost_batches} batches logging every "
        "step minus the same fit logging once, in the training thread's CPU time and in the "
        "whole process's, which adds ActivationHistogram's background worker on CPU; draws and "
        "per-epoch work: process CPU time inside the callback's hook):", "",
        "| event | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for label in next(iter(costs.values())):
        lines.append(f"| {label} | " + " | ".join(f"{costs[n][label] * 1e3:.1f} ms"
                                                 for n in MODELS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()

"""Overhead of the four step-5 monitors at their defaults (issue 3).

Trains the digits CNN and a ~10M-parameter MLP with a plain Trainer and with ActivationHistogram,
UpdateRatioMonitor, FirstLayerVisualization and LearningCurves at their defaults, alternating the
two (plain first, then monitored first) ``--repeats`` times, and reports the median wall-time
ratio. Then it measures the cost of one logging step of each monitor: a fit with that monitor
logging on every step (or drawing every epoch) minus a plain fit, divided by the number of
logging steps (draws).

Usage:
    python benchmarks/bench_monitors.py --epochs 20 4 --repeats 3
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

import lightning.pytorch as pl
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.callbacks.first_layer import FirstLayerVisualization
from lightning_diag.callbacks.learning_curves import LearningCurves
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.examples import DigitsClassifier, DigitsDataModule


def big_mlp(width: int = 3072) -> DigitsClassifier:
    model = DigitsClassifier(arch="mlp", dropout=0.0)
    model.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                              nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return model


MODELS: dict[str, tuple[Callable[[], DigitsClassifier], dict]] = {
    "digits CNN": (lambda: DigitsClassifier(arch="cnn"), {}),
    "MLP 64-3072-3072-10": (big_mlp, {"input_shape": (8, 8)}),
}


def monitors(first_layer_kw: dict) -> list[pl.Callback]:
    return [ActivationHistogram(), UpdateRatioMonitor(), FirstLayerVisualization(**first_layer_kw),
            LearningCurves()]


def fit_seconds(make: Callable[[], DigitsClassifier], callbacks: list[pl.Callback],
                epochs: int, batches: int | None = None) -> tuple[float, float, int]:
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
            logger=TensorBoardLogger(root, name="bench"), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
            default_root_dir=root, limit_train_batches=batches)
        model, data = make(), DigitsDataModule(batch_size=64)
        start, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, data)
        return time.perf_counter() - start, time.process_time() - cpu, trainer.global_step


def overhead(name: str, epochs: int, repeats: int) -> dict:
    make, fl_kw = MODELS[name]
    plain, watched = [], []
    steps, found = 0, set()
    for r in range(repeats):
        order = [False, True] if r % 2 == 0 else [True, False]
        for with_monitors in order:
            cbs = monitors(fl_kw) if with_monitors else []
            wall, cpu, steps = fit_seconds(make, cbs, epochs)
            found |= {f.code for cb in cbs for f in getattr(cb, "findings", [])
                      if f.severity >= "warn"}
            (watched if with_monitors else plain).append((wall, cpu))
    ratios = [w[0] / p[0] for w, p in zip(watched, plain, strict=True)]
    cpu_ratios = [w[1] / p[1] for w, p in zip(watched, plain, strict=True)]
    return {"plain": statistics.median(p[0] for p in plain),
            "watched": statistics.median(w[0] for w in watched),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "cpu_ratio": statistics.median(cpu_ratios), "steps": steps,
            "found": sorted(found) or "none"}


def per_log_cost(name: str, epochs: int, repeats: int, batches: int) -> dict[str, float]:
    make, fl_kw = MODELS[name]
    variants: dict[str, Callable[[], pl.Callback]] = {
        "ActivationHistogram (per logging step)":
            lambda: ActivationHistogram(every_n_steps=1, figure_every_n_logs=0),
        "ActivationHistogram summary figure (per draw)":
            lambda: ActivationHistogram(every_n_steps=1, figure_every_n_logs=1),
        "UpdateRatioMonitor (per logging step)": lambda: UpdateRatioMonitor(every_n_steps=1),
        "FirstLayerVisualization (per draw)":
            lambda: FirstLayerVisualization(every_n_epochs=1, **fl_kw),
        "LearningCurves (per epoch, figure every epoch)":
            lambda: LearningCurves(figure_every_n_epochs=1),
    }
    plain_runs = [fit_seconds(make, [], epochs, batches) for _ in range(repeats)]
    plain = statistics.median(r[1] for r in plain_runs)
    steps = plain_runs[0][2]
    seconds = {label: statistics.median(fit_seconds(make, [cb()], epochs, batches)[1]
                                        for _ in range(repeats))
               for label, cb in variants.items()}
    out = {label: (t - plain) / (steps if "step" in label else epochs)
           for label, t in seconds.items()}
    # the figure variant logs on every step too: its extra cost over the plain logging step
    label = "ActivationHistogram summary figure (per draw)"
    out[label] = (seconds[label] - seconds["ActivationHistogram (per logging step)"]) / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 4],
                        help="epochs per model, in the order of --models")
    parser.add_argument("--cost-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cost-repeats", type=int, default=1)
    parser.add_argument("--cost-batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results/monitors.md")
    args = parser.parse_args()
    # One intra-op thread: on a shared machine, spinning OpenMP workers make CPU time meaningless.
    torch.set_num_threads(args.threads)
    lines = [
        "## Step-5 monitors (issue 3)", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, shared with "
        f"other jobs (load average at start {os.getloadavg()[0]:.1f}); "
        "`python benchmarks/bench_monitors.py --epochs "
        f"{' '.join(map(str, args.epochs))} --repeats {args.repeats} --cost-batches "
        f"{args.cost_batches} --threads {args.threads}`.",
        "", "All four monitors at their defaults vs a plain Trainer (TensorBoardLogger in both), "
        "digits train split (1437 images, batch 64, 23 steps/epoch), runs alternated:", "",
        "| model | epochs | steps | plain (s) | with monitors (s) | wall ratio (median) | "
        "wall ratios | CPU-time ratio (median) | WARN findings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, epochs in zip(args.models, args.epochs, strict=True):
        r = overhead(name, epochs, args.repeats)
        ratios = ", ".join(f"{x:.3f}" for x in r["ratios"])
        lines.append(f"| {name} | {epochs} | {r['steps']} | {r['plain']:.2f} | "
                     f"{r['watched']:.2f} | **{r['ratio']:.3f}x** | {ratios} | "
                     f"{r['cpu_ratio']:.3f}x | {r['found']} |")
        print(lines[-1], flush=True)
    lines += ["", "Cost of one logging step (or draw) of each monitor: process CPU time of a "
              f"fit of {args.cost_epochs} epoch(s) of {args.cost_batches} batches logging on every "
              "step (drawing every epoch) "
              f"minus a plain fit, per event (median of {args.cost_repeats}):", "",
              "| monitor | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    costs = {name: per_log_cost(name, args.cost_epochs, args.cost_repeats, args.cost_batches)
             for name in MODELS}
    for label in next(iter(costs.values())):
        cells = " | ".join(f"{costs[n][label] * 1e3:.1f} ms" for n in MODELS)
        lines.append(f"| {label} | {cells} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()

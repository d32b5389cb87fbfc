"""Cost of the end-of-fit figures and of CheckpointEnsemble's fit-end evaluation (issue 23).

Times, in one process and interleaved, this tree's code against a baseline tree's
(``--baseline``, e.g. a checkout of ``main``), loaded under other module names:

- each figure of the eleven callbacks' defaults on the digits CNN, built and rendered as
  ``log_figure`` renders it (the class counts of DataInspection, the ensemble's bars, the
  activation summary of 10 layers, the learning curves of 10 epochs), and DataInspection's
  grid of 8 samples per class (``annotated_grid``; new captions each time);
- ``CheckpointEnsemble.on_fit_end`` on one trainer fitted for ``--epochs`` epochs (3 kept
  checkpoints): the members loaded, evaluated with the ensemble, the figure and the finding.

Medians of ``--repeats`` of the training thread's CPU time (``time.thread_time``) and of wall
time. A process that already drew one figure (fonts loaded) is measured: the first draw of a
process is printed apart.

Usage:
    python benchmarks/bench_figures.py --baseline /path/to/main [--repeats 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch

matplotlib.use("Agg")
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag.callbacks import checkpoint_ensemble
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.tensorboard import figures, grids, writer


def _load(tree: Path, relative: str, name: str) -> ModuleType:
    """The module at ``tree/relative`` under the name ``name`` (its own imports resolve to
    this tree's package)."""
    spec = importlib.util.spec_from_file_location(name, tree / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _inputs() -> dict[str, tuple[str, tuple[Any, ...]]]:
    """Each figure's function name and arguments, as the digits CNN's fit gives them."""
    layers = [("net.0", "Conv2d"), ("net.1", "BatchNorm2d"), ("net.2", "ReLU"),
              ("net.3", "Conv2d"), ("net.4", "BatchNorm2d"), ("net.5", "ReLU"),
              ("net.6", "MaxPool2d"), ("net.9", "Linear"), ("net.10", "ReLU"),
              ("net.11", "Linear")]
    stats = {}
    for k, (name, kind) in enumerate(layers):
        counts = [float(int(1000 * math.exp(-((b - 32) / (6 + k)) ** 2))) for b in range(64)]
        stats[f"{name} ({kind})"] = {"mean": 0.1 * k - 0.4, "std": 0.3 + 0.1 * k,
                                     "act_hist": [-3.0, 3.0, sum(counts), 0.0, 0.0, *counts]}
    history = {f"{what}/{split}": [(e, f(e)) for e in range(10)]
               for split in ("train", "val")
               for what, f in (("loss", lambda e: 2.3 * math.exp(-e / 2) + 0.05),
                               ("accuracy", lambda e: 1 - 0.9 * math.exp(-e / 2)))}
    members = [(7, {"val_loss": 0.0912, "val_acc": 0.972}),
               (8, {"val_loss": 0.0871, "val_acc": 0.975}),
               (9, {"val_loss": 0.0850, "val_acc": 0.9778})]
    return {
        "class counts (DataInspection)": ("class_counts_figure", (
            {"train": [143, 146, 142, 146, 145, 145, 145, 143, 139, 143],
             "val": [35, 36, 35, 37, 36, 37, 36, 36, 35, 37]},)),
        "ensemble (CheckpointEnsemble)": ("ensemble_figure", (
            members, {"val_loss": 0.0801, "val_acc": 0.9806})),
        "layer summary (ActivationHistogram)": ("layer_summary_figure", (stats, 64)),
        "curves (LearningCurves)": ("curves_figure", (history,)),
    }


def _grid(module: ModuleType, repeat: int) -> Any:
    """DataInspection's samples per class: 10 rows of 8 digits, captioned by index."""
    rows = [[module.Cell(torch.rand(1, 8, 8), (f"#{repeat * 1000 + 8 * i + j}",))
             for j in range(8)] for i in range(10)]
    return module.annotated_grid(rows, "training samples per class: one row per class, up to "
                                 "8 samples", [f"class {i}" for i in range(10)])


def _clock(run: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    run()
    return time.thread_time() - cpu, time.perf_counter() - wall


def _fitted(epochs: int, root: str) -> tuple[pl.Trainer, pl.LightningModule, Any]:
    callback = checkpoint_ensemble.CheckpointEnsemble()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[callback],
                         logger=TensorBoardLogger(root, name="bench"), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    model = DigitsClassifier(arch="cnn")
    trainer.fit(model, DigitsDataModule(64))
    return trainer, model, callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, required=True, help="the tree to compare with")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    old_grids = _load(args.baseline, "lightning_diag/tensorboard/grids.py", "_old_grids")
    old_figures = _load(args.baseline, "lightning_diag/tensorboard/figures.py", "_old_figures")
    old_writer = _load(args.baseline, "lightning_diag/tensorboard/writer.py", "_old_writer")
    old_ens = _load(args.baseline, "lightning_diag/inference/ensemble.py", "_old_ensemble")
    old_cb = _load(args.baseline, "lightning_diag/callbacks/checkpoint_ensemble.py", "_old_cb")
    old_cb.evaluate_members = old_ens.evaluate_members  # type: ignore[attr-defined]
    old_cb.ensemble_figure = old_figures.ensemble_figure  # type: ignore[attr-defined]
    old_cb.log_figure = lambda trainer, tag, fig, step, png_name=None: writer.log_image(  # type: ignore[attr-defined]
        trainer, tag, old_writer.figure_to_array(fig), step, png_name)
    arms = {"baseline": (old_figures, old_writer.figure_to_array),
            "this tree": (figures, writer.figure_to_array)}
    grid_modules = {"baseline": old_grids, "this tree": grids}
    grid_item = "samples per class grid (DataInspection)"
    inputs = _inputs()
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    print("first draw in this process (thread CPU, wall):")
    for arm, (module, render) in arms.items():
        for item, (name, fargs) in inputs.items():
            cpu, wall = _clock(lambda: render(getattr(module, name)(*fargs)))  # noqa: B023
            print(f"  {arm:9s} {item}: {1e3 * cpu:.1f} / {1e3 * wall:.1f} ms")
    with tempfile.TemporaryDirectory() as root:
        trainer, model, new = _fitted(args.epochs, root)
        old = old_cb.CheckpointEnsemble()
        old.kept = [dict(m) for m in new.kept]
        ends = {"baseline": old, "this tree": new}
        for repeat in range(args.repeats):
            for arm, (module, render) in arms.items():
                for item, (name, fargs) in inputs.items():
                    times.setdefault((item, arm), []).append(
                        _clock(lambda: render(getattr(module, name)(*fargs))))  # noqa: B023
                times.setdefault((grid_item, arm), []).append(
                    _clock(partial(_grid, grid_modules[arm], repeat)))
                times.setdefault(("CheckpointEnsemble.on_fit_end", arm), []).append(
                    _clock(lambda: ends[arm].on_fit_end(trainer, model)))  # noqa: B023
    print(f"\nmedian of {args.repeats}, interleaved (thread CPU ms, wall ms):\n")
    print("| item | baseline | this tree | ratio (CPU) |\n|---|---|---|---|")
    for item in [*inputs, grid_item, "CheckpointEnsemble.on_fit_end"]:
        base, mine = (times[(item, arm)] for arm in arms)
        b_cpu, m_cpu = (statistics.median(c for c, _ in t) for t in (base, mine))
        b_wall, m_wall = (statistics.median(w for _, w in t) for t in (base, mine))
        print(f"| {item} | {1e3 * b_cpu:.1f} / {1e3 * b_wall:.1f} | {1e3 * m_cpu:.1f} / "
              f"{1e3 * m_wall:.1f} | {m_cpu / b_cpu:.2f} |")


if __name__ == "__main__":
    main()

"""Our lr_sweep pick vs Lightning's Tuner.lr_find suggestion on the digits demo.

Runs both on DigitsClassifier + DigitsDataModule (same seed, same data), trains a fresh model for
a few epochs at each suggestion, and writes the table to benchmarks/results/tuning.md.

    .venv/bin/python benchmarks/bench_tuning.py --arch cnn --epochs 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import time
import warnings
from pathlib import Path

from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.tuning.sweep import compare_with_lr_find


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tuning.md"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    factory = functools.partial(DigitsClassifier, arch=args.arch)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        cmp = compare_with_lr_find(factory, DigitsDataModule(seed=seed), steps=args.steps,
                                   epochs=args.epochs, seed=seed, accelerator="cpu")
        secs = time.perf_counter() - start
        print(cmp.table(), f"({secs:.0f} s)", flush=True)
        rows.append((seed, cmp, secs))
        _write(args, rows)


def _write(args: argparse.Namespace, rows: list) -> None:
    """Write the table (after every seed, so a partial run still leaves its numbers)."""
    lines = [
        "## Tuning: learning-rate sweep vs `Tuner.lr_find`",
        "",
        f"Measured {datetime.date.today()} on a shared machine with {os.cpu_count()} CPU cores "
        "(CPU only; wall times are indicative, the cores were shared with other jobs). "
        f"Digits demo: `DigitsClassifier(arch={args.arch!r})` + `DigitsDataModule`, "
        f"Adam, weight decay 1e-5; sweep over (1e-1, 1e-2, 1e-3, 1e-4) with {args.steps} "
        f"iterations each; `lr_find` over [1e-5, 1] with {args.steps} iterations; then a fresh "
        f"model trained {args.epochs} epochs at each suggestion (val_acc after the last epoch).",
        "",
        "| seed | lr_sweep pick | val_acc | lr_find suggestion | val_acc | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for seed, c, secs in rows:
        lf = f"{c.lr_find_lr:.2e}" if c.lr_find_lr else "none"
        lfs = f"{c.lr_find_score:.4f}" if c.lr_find_score is not None else "n/a"
        lines.append(f"| {seed} | {c.sweep_lr:.0e} | {c.sweep_score:.4f} | {lf} | {lfs} | "
                     f"{secs:.0f} |")
    lines += ["", f"Command: `.venv/bin/python benchmarks/bench_tuning.py --arch {args.arch} "
              f"--epochs {args.epochs} --steps {args.steps} --seeds "
              f"{' '.join(map(str, args.seeds))}`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()

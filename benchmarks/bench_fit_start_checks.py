"""Time the three fit-start checks on the digits CNN (issue 2, target: < 10 s together).

Run: ``.venv/bin/python benchmarks/bench_fit_start_checks.py [--threads N] [--repeats R]``.
Prints a markdown table: each check alone (Trainer-free function, median of R runs), and the
extra wall time of a one-batch ``Trainer.fit`` with all three callbacks attached.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import lightning.pytorch as pl
import torch

from lightning_diag.callbacks import GradientCheck, InitialLossCheck, OverfitSmallBatch
from lightning_diag.checks.gradients import check_gradients
from lightning_diag.checks.initial_loss import check_initial_loss
from lightning_diag.checks.overfit import overfit_small_batch
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.isolation import first_batches

T = TypeVar("T")


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def fit_seconds(callbacks: list[pl.Callback]) -> float:
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                         accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(DigitsClassifier(arch="cnn"), DigitsDataModule(batch_size=64))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = first_batches(loader, 5, torch.device("cpu"))
    model = DigitsClassifier(arch="cnn")
    rows = []
    t, found = timed(lambda: check_initial_loss(model, batches[:3]), args.repeats)
    rows.append(("InitialLossCheck (3 batches of 64, forward only)", t, found[0].message))
    t, found = timed(lambda: check_gradients(model, batches[0]), args.repeats)
    rows.append(("GradientCheck (4 samples, 3-10 coords + 1 direction per tensor)", t,
                 found[0].message))
    t, result = timed(lambda: overfit_small_batch(model, loader), args.repeats)
    rows.append(("OverfitSmallBatch (5 batches of 64, up to 1000 steps)", t,
                 result.findings()[0].message))
    total = sum(r[1] for r in rows)
    fit_without = statistics.median(fit_seconds([]) for _ in range(args.repeats))
    fit_with = statistics.median(
        fit_seconds([InitialLossCheck(), GradientCheck(), OverfitSmallBatch()])
        for _ in range(args.repeats))
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats} (median)\n")
    print("| check | seconds | result |\n|---|---|---|")
    for name, seconds, message in rows:
        print(f"| {name} | {seconds:.2f} | {message} |")
    print(f"| **the three together** | **{total:.2f}** | |")
    print(f"\nOne-batch `Trainer.fit`: {fit_without:.2f} s without, {fit_with:.2f} s with the "
          f"three callbacks (+{fit_with - fit_without:.2f} s).")


if __name__ == "__main__":
    main()

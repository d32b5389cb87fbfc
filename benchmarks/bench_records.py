"""Bytes the library writes per training step: ``findings.jsonl`` and the TensorBoard events.

A 202-layer MLP (101 ``Linear`` + 101 ``ReLU``, width 32) whose every other hidden ReLU is dead
(bias -10 before it: its units are zero on every sample, so ``activations.dead_units`` is found
again for those layers at every logging step) trains on random 8x8 inputs with
``ActivationHistogram(every_n_steps=1)`` (histograms, statistics and findings on every step;
``--every 200`` for its default) and
a ``TensorBoardLogger``. Two runs, of ``--short`` and ``--long`` steps, give the bytes per step
as a slope (what one more step costs, fixed costs such as the first records left out) and the
last step's own bytes (read from the file sizes after each step).

Usage:
    python benchmarks/bench_records.py --short 100 --long 300 [--every 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.findings import FINDINGS_FILE

LAYERS = 101  # Linear + ReLU pairs: 202 layers


class DeepMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        parts: list[nn.Module] = [nn.Flatten()]
        width = 32
        for i in range(LAYERS - 1):
            linear = nn.Linear(64 if i == 0 else width, width)
            if i % 2 == 1:  # its ReLU is dead on every sample
                with torch.no_grad():
                    linear.bias.fill_(-10.0)
            parts += [linear, nn.ReLU()]
        parts += [nn.Linear(width, 10), nn.ReLU()]
        self.net = nn.Sequential(*parts)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Sizes(pl.Callback):
    """The byte sizes of findings.jsonl and of the run's event files after each step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        root = Path(trainer.logger.log_dir)
        record = root / FINDINGS_FILE
        events = sum(p.stat().st_size for p in root.rglob("events.out.tfevents.*"))
        self.rows.append((record.stat().st_size if record.exists() else 0, events))


def run(steps: int, root: Path, every: int = 1) -> list[tuple[int, int]]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * 8, 1, 8, 8), torch.randint(0, 10, (steps * 8,)))
    sizes = Sizes()
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=1, logger=TensorBoardLogger(str(root), name="tb"),
        callbacks=[ActivationHistogram(every_n_steps=every, log_charts=True), sizes],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(DeepMLP(), DataLoader(data, batch_size=8))
    sizes.on_train_batch_end(trainer, None, None, None, 0)  # after the fit-end records
    return sizes.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=100)
    parser.add_argument("--long", type=int, default=300)
    parser.add_argument("--every", type=int, default=1,
                        help="ActivationHistogram's every_n_steps (1: every step; 200: default)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        short = run(args.short, Path(tmp) / "short", args.every)
        long = run(args.long, Path(tmp) / "long", args.every)
    span = args.long - args.short
    record_slope = (long[-1][0] - short[-1][0]) / span
    events_slope = (long[-1][1] - short[-1][1]) / span
    last = long[-2][0] - long[-3][0]  # the last training step's own append
    first = long[1][0] - long[0][0]
    lines = [
        "## Bytes written per step (`findings.jsonl`, TensorBoard events)", "",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}: a 202-layer MLP (101 Linear + 101 ReLU, half the ReLUs dead), "
        "`ActivationHistogram(every_n_steps=1)`, TensorBoardLogger, batch 8.", "",
        "| measure | value |", "|---|---|",
        f"| findings.jsonl after {args.short} / {args.long} steps | {short[-1][0]:,} / "
        f"{long[-1][0]:,} bytes |",
        f"| findings.jsonl per step (slope) | {record_slope:,.0f} bytes |",
        f"| findings.jsonl: step 1's append / the last step's append | {first:,} / {last:,} "
        "bytes |",
        f"| event files after {args.short} / {args.long} steps | {short[-1][1]:,} / "
        f"{long[-1][1]:,} bytes |",
        f"| event files per step (slope) | {events_slope:,.0f} bytes |", "",
        f"Command: `python benchmarks/bench_records.py --short {args.short} --long {args.long} "
        f"--every {args.every}`",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

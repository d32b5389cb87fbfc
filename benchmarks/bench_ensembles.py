"""Quality of recipe step 7 on the digits demo: raw vs EMA weights, checkpoints vs their
ensemble, seeds vs their ensemble, top configurations vs their ensemble (validation accuracy).

    .venv/bin/python benchmarks/bench_ensembles.py [--epochs 15] [--arch cnn]

Prints a markdown section (pasted into benchmarks/results/ema_ensembles.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.callbacks.ema import EMAWeights
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.inference.ensemble import evaluate_members, train_ensemble, train_top_configs


def _row(name: str, members: list[dict[str, float]], ensemble: dict[str, float]) -> str:
    # the numbers DigitsClassifier's own validation_step logs, for each member and the ensemble
    accs = ", ".join(f"{m['val_acc']:.4f}" for m in members)
    best = max(m["val_acc"] for m in members)
    mean = sum(m["val_acc"] for m in members) / len(members)
    best_loss = min(m["val_loss"] for m in members)
    mean_loss = sum(m["val_loss"] for m in members) / len(members)
    acc, loss = ensemble["val_acc"], ensemble["val_loss"]
    return (f"| {name} | {accs} | {mean:.4f} | {best:.4f} | {acc:.4f} | {acc - mean:+.4f} | "
            f"{acc - best:+.4f} | {mean_loss:.4f} | {best_loss:.4f} | {loss:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--arch", default="cnn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ensembles_") as tmp:
        run(args.arch, args.epochs, tmp)


def run(arch: str, epochs: int, tmp: str) -> None:
    t0 = time.time()
    torch.set_num_threads(1)
    trainer_kw: dict[str, Any] = {"max_epochs": epochs, "accelerator": "cpu",
                                  "deterministic": True, "default_root_dir": tmp}
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    val = dm.val_dataloader()

    # EMA and checkpoint ensemble on one run (seed 0)
    pl.seed_everything(0, workers=True, verbose=False)
    model = DigitsClassifier(arch=arch)
    ema = EMAWeights(decay=0.99, evaluate="both")
    ckpts = CheckpointEnsemble(k=5, dirpath=f"{tmp}/ckpt")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ema, ckpts], **trainer_kw)
    trainer.fit(model, datamodule=dm)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    seeds = train_ensemble(lambda: DigitsClassifier(arch=arch), dm, seeds=(0, 1, 2, 3, 4),
                           **trainer_kw)
    seed_res = evaluate_members(list(seeds.members), val)
    configs = [{"arch": arch, "lr": 1e-3}, {"arch": arch, "lr": 3e-3},
               {"arch": arch, "lr": 1e-3, "width": 128, "dropout": 0.2}]
    tops = train_top_configs(DigitsClassifier, configs, dm, k=3, **trainer_kw)
    top_res = evaluate_members(list(tops.members), val)

    print(f"Digits demo ({arch}, {epochs} epochs, Adam lr 1e-3, batch 64, 360 val "
          f"images), CPU, 1 thread; {time.time() - t0:.0f} s in all. Ensemble loss: NLL of the "
          "mean probabilities.\n")
    print(f"- EMA (`decay=0.99`, warm-up on): val accuracy raw {m['val_acc']:.4f}, EMA "
          f"{m['val_acc_ema']:.4f} ({m['val_acc_ema'] - m['val_acc']:+.4f}); val loss raw "
          f"{m['val_loss']:.4f}, EMA {m['val_loss_ema']:.4f}.\n")
    print("| ensemble (mean of softmax) | members' val acc | mean | best | ensemble | "
          "ens - mean | ens - best | members' mean val loss | best member's loss | "
          "ensemble loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(_row(f"last {len(ckpts.kept)} epoch checkpoints of one run", ckpts.results["members"],
               ckpts.results["ensemble"]))
    print(_row("5 seeds, same configuration", seed_res["members"], seed_res["ensemble"]))
    print(_row("3 configurations (one model each)", top_res["members"], top_res["ensemble"]))


if __name__ == "__main__":
    main()

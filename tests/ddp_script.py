"""Lightning DDP on CPU (gloo, 2 processes) with every diagnostic attached; run by test_distributed.

Usage: ``python tests/ddp_script.py OUT_DIR``. Lightning's "ddp" launcher re-executes this script
for rank 1, so it must be a standalone script. Each rank logs under ``OUT_DIR/rank<r>/`` (only rank
0 may write files) and writes ``OUT_DIR/rank<r>.json`` (its findings' codes per callback, a few
counters) and ``OUT_DIR/ema_rank<r>.pt`` (its EMA average and final parameters; the live
BatchNorm buffers are left out: DDP syncs them from rank 0 only at the next forward).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_diag.base import DiagnosticCallback
from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.callbacks.data_inspection import DataInspection
from lightning_diag.callbacks.ema import EMAWeights
from lightning_diag.callbacks.first_layer import FirstLayerVisualization
from lightning_diag.callbacks.gradient_check import GradientCheck
from lightning_diag.callbacks.initial_loss import InitialLossCheck
from lightning_diag.callbacks.invariants import TrainingInvariants
from lightning_diag.callbacks.learning_curves import LearningCurves
from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.callbacks.overfit import OverfitSmallBatch
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from tests.helpers import Classifier, cnn, digits


class SyncedClassifier(Classifier):
    """Logs epoch metrics with ``sync_dist=True``, so that every rank reads the same curves."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_step=False,
                 on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)


def callbacks() -> dict[str, DiagnosticCallback]:
    return {
        "InitialLossCheck": InitialLossCheck(num_batches=1),
        "GradientCheck": GradientCheck(num_samples=2, coords_per_tensor=2),
        "OverfitSmallBatch": OverfitSmallBatch(num_batches=1, max_steps=10, progress_bar=False),
        "DataInspection": DataInspection(max_images=2),
        "ActivationHistogram": ActivationHistogram(every_n_steps=2, figure_every_n_logs=0),
        "UpdateRatioMonitor": UpdateRatioMonitor(every_n_steps=2),
        "TrainingInvariants": TrainingInvariants(every_n_steps=2),
        # a layer with no weights and a metric never logged: the info findings must agree too
        "FirstLayerVisualization": FirstLayerVisualization(layer="net.4"),
        "LearningCurves": LearningCurves(val_acc="val/accuracy"),
        "LRPlateauAdvisor": LRPlateauAdvisor(patience=1, min_epochs=1),
        "EMAWeights": EMAWeights(decay=0.9, evaluate="ema"),
        "CheckpointEnsemble": CheckpointEnsemble(k=2),
    }


def main(out: Path) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by the launcher for rank 1
    root = out / f"rank{rank}"
    pl.seed_everything(0, workers=True)
    cbs = callbacks()
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, deterministic=True,
        callbacks=list(cbs.values()), logger=TensorBoardLogger(str(root), name="tb", version=0),
        default_root_dir=str(root), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    model = SyncedClassifier(cnn(dropout=0.2), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    train = DataLoader(digits(128), batch_size=16, shuffle=True, generator=gen)
    trainer.fit(model, train, DataLoader(digits(64), batch_size=32))
    assert trainer.global_rank == rank, (trainer.global_rank, rank)
    inspection = cbs["DataInspection"]
    summary = {
        "codes": {name: sorted(f.code for f in cb.findings) for name, cb in cbs.items()},
        "data_inspected": getattr(inspection, "report", None) is not None,
        "ema_updates": cbs["EMAWeights"].num_updates,  # type: ignore[attr-defined]
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
    }
    torch.save({"ema": cbs["EMAWeights"].ema_state_dict(),  # type: ignore[attr-defined]
                "weights": {n: p.detach() for n, p in model.named_parameters()}},
               out / f"ema_rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""random_search whose trials train under Lightning DDP (2 CPU processes, gloo); run by
tests/test_tuning_shared.py.

Usage: ``python tests/ddp_search_script.py OUT_DIR``. Lightning's DDP launcher runs this script
again for rank 1 at every trial, so it must be a standalone script. Each rank that trains a
configuration writes ``OUT_DIR/fits/rank<r>_lr<lr>`` (the world size); rank 0 writes the search's
rows to ``OUT_DIR/rows.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lightning_diag.examples.digits import DigitsClassifier
from lightning_diag.tuning.search import random_search
from tests.helpers import digits, loader


class RecordingClassifier(DigitsClassifier):
    """The demo MLP (its ``val_acc`` metric syncs across ranks) noting who trains what."""

    out = Path(".")

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__(arch="mlp", width=16, dropout=0.0, lr=lr, weight_decay=weight_decay)

    def on_fit_start(self) -> None:
        fits = self.out / "fits"
        fits.mkdir(parents=True, exist_ok=True)
        (fits / f"rank{self.global_rank}_lr{self.hparams['lr']!r}").write_text(
            str(self.trainer.world_size))


def main(out: Path) -> None:
    RecordingClassifier.out = out
    data: Any = (loader(digits(128), 32), loader(digits(64), 32, shuffle=False))
    # seed 20 draws lr 3.16 for trial 0 (its first update is larger than the weights: the
    # diagnosis ends it at step 0, on both ranks at once) and lr 1.02e-3 for trial 1 (healthy)
    found = random_search(RecordingClassifier, data, center_lr=1e-2, lr_span=1000.0, seed=20,
                          n_trials=2, epochs=(1, 1), run_dir=out / "runs", strategy="ddp",
                          devices=2, accelerator="cpu", limit_train_batches=2)
    (out / "rows.json").write_text(json.dumps(
        [{k: r[k] for k in ("number", "lr", "weight_decay", "value", "state", "ended_by",
                            "steps")} for r in found.rows]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Section 6 of issue 2: with the fit-start checks attached, the main run is bit-identical."""

import random

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_diag.callbacks.gradient_check import GradientCheck
from lightning_diag.callbacks.initial_loss import InitialLossCheck
from lightning_diag.callbacks.overfit import OverfitSmallBatch
from tests.helpers import Classifier, cnn, digits, loader, trainer


class BatchOrder(pl.Callback):
    def __init__(self):
        self.targets = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.targets.append(batch[1].clone())


def run(tmp_path, checks):
    pl.seed_everything(0, workers=True)
    model = Classifier(cnn(dropout=0.5), lr=1e-2, optimizer="sgd", weight_decay=1e-3)
    order = BatchOrder()
    dl = loader(digits(96), batch_size=16, shuffle=True, seed=3)
    t = trainer(tmp_path, [*checks, order], logger=False, deterministic=True, max_epochs=2,
                limit_train_batches=4)
    t.fit(model, dl)
    after = (torch.rand(3), np.random.rand(3), random.random(), dl.generator.get_state())
    return model, t.optimizers[0].state_dict(), order.targets, after


def test_fit_start_checks_leave_the_main_run_bit_identical(tmp_path):
    checks = [InitialLossCheck(), GradientCheck(coords_per_tensor=2),
              OverfitSmallBatch(num_batches=2, max_steps=30)]
    base_model, base_opt, base_order, base_rng = run(tmp_path / "a", [])
    model, opt, order, rng = run(tmp_path / "b", checks)
    assert all(len(c.findings) > 0 for c in checks)  # they did run
    for (name, a), b in zip(base_model.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm buffers
    for key, state in base_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], opt["state"][key]["momentum_buffer"])
    assert len(order) == len(base_order) == 8
    assert all(torch.equal(a, b) for a, b in zip(base_order, order, strict=True))
    assert torch.equal(base_rng[0], rng[0]) and np.array_equal(base_rng[1], rng[1])
    assert base_rng[2] == rng[2] and torch.equal(base_rng[3], rng[3])

"""Issue 20 item 6: dead units, vanishing gradients, zero updates and loss jumps are judged over
at least ``min_samples`` samples, so that batches of 1-10 samples raise no false alarm while the
broken runs are still caught. The thresholds' measurements: ``benchmarks/bench_small_batches.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_diag.callbacks import ActivationHistogram, LRPlateauAdvisor, UpdateRatioMonitor
from tests.helpers import codes, digits, loader, mlp, trainer


class Hinge(pl.LightningModule):
    """A digits MLP trained with a multi-class hinge and plain SGD: a sample beyond the margin
    gives no gradient at all, a misclassified one a loss many times the median. At batch 1
    every per-batch rule fired on it (see ``test_one_sample_a_batch_was_judged_wrong``)."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.05,
                 jump_at: int | None = None) -> None:
        super().__init__()
        self.net, self.lr, self.jump_at = net or mlp(width=64), lr, jump_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.multi_margin_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.jump_at is None:
            return opt
        at = self.jump_at  # a real divergence: the learning rate jumps 1000x
        jump = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < at else 1000.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": jump, "interval": "step"}}


def monitors(**kw: Any) -> list[pl.Callback]:
    """The three rules' callbacks, the monitors logging every 10 steps (20x the default's
    chances of a false alarm for ActivationHistogram, 10x for UpdateRatioMonitor)."""
    return [ActivationHistogram(every_n_steps=10, **kw), UpdateRatioMonitor(every_n_steps=10, **kw),
            LRPlateauAdvisor(save_batch=False, **kw)]


def fit(tmp_path: Path, module: pl.LightningModule, batch_size: int, steps: int,
        **kw: Any) -> set[str]:
    """The WARN/FAIL codes of the monitors on ``steps`` steps of batches of ``batch_size``."""
    pl.seed_everything(0, verbose=False)
    cbs = monitors(**kw)
    t = trainer(tmp_path, cbs, logger=False, max_steps=steps, limit_val_batches=0)
    t.fit(module, loader(digits(512), batch_size=batch_size))
    return codes([f for cb in cbs for f in cb.findings])


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_a_healthy_run_on_small_batches_is_silent(tmp_path: Path, batch_size: int) -> None:
    assert fit(tmp_path, Hinge(), batch_size, steps=300) == set()


def test_one_sample_a_batch_was_judged_wrong(tmp_path: Path) -> None:
    """The same healthy run judged batch by batch (``min_samples=1``, as before): half its
    first layer looks dead on one sample, one hard sample's loss looks like a divergence."""
    found = fit(tmp_path, Hinge(), 1, steps=300, min_samples=1)
    assert {"activations.dead_units", "advisor.divergence"} <= found


def dead_relus() -> Hinge:
    net = mlp(width=64)
    with torch.no_grad():
        net[1].bias.fill_(-20.0)  # every first-layer ReLU off for inputs in [0, 1]
    return Hinge(net)


def sigmoid_stack() -> Hinge:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(8):
        layers += [nn.Linear(64 if i == 0 else 32, 32), nn.Sigmoid()]
    return Hinge(nn.Sequential(*layers, nn.Linear(32, 10)), lr=0.01)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize(("make", "expected"), [
    (dead_relus, {"activations.dead_units", "gradients.vanishing"}),
    (sigmoid_stack, {"gradients.vanishing"}),
    (lambda: Hinge(lr=0.0), {"update_ratio.zero_updates"}),
    (lambda: Hinge(jump_at=60), {"advisor.divergence"}),
], ids=["dead_relus", "sigmoid_stack", "zero_lr", "divergence"])
def test_broken_runs_on_small_batches_are_still_caught(
        tmp_path: Path, batch_size: int, make: Any, expected: set[str]) -> None:
    assert expected <= fit(tmp_path, make(), batch_size, steps=120)


def test_the_messages_say_how_many_samples_were_judged(tmp_path: Path) -> None:
    cbs = monitors()
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, cbs, logger=False, max_steps=120, limit_val_batches=0).fit(
        dead_relus(), loader(digits(512), batch_size=4))
    (dead,) = [f for f in cbs[0].findings if f.code == "activations.dead_units"]
    assert "zero on every sample of the 32 samples of 8 batches measured together" in dead.message
    assert (dead.details["samples"], dead.details["batches"]) == (32, 8)
    (still,) = [f for f in cbs[1].findings if f.code == "update_ratio.zero_updates"]
    assert "(each over 8 batches, 32 samples)" in still.message

    adv = LRPlateauAdvisor(save_batch=False)
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path / "jump", [adv], logger=False, max_steps=120, limit_val_batches=0).fit(
        Hinge(jump_at=60), loader(digits(512), batch_size=4, shuffle=False))
    (jump,) = [f for f in adv.findings if f.code == "advisor.divergence"]
    assert jump.message.startswith("Mean loss of the last 8 batches (32 samples, judged "
                                   "together: one small batch is too few to judge a jump)")
    assert (jump.details["samples"], jump.details["batches"]) == (32, 8)
    assert jump.details["batch_indices"] == list(range(jump.details["batch_idx"] - 7,
                                                       jump.details["batch_idx"] + 1))
    assert len(jump.indices) == 32  # the group's samples, from the sequential loader


class Sparse(pl.LightningModule):
    """A linear model whose loss has a gradient on batches 1, 5, 9, ... only (the others are
    multiplied by 0): on the logging steps' own batches (0, 8, 16, ...) its weights do not
    move at all, over any 4 batches they do."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net, self.lr = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y) * float(batch_idx % 4 == 1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize(("lr", "min_samples", "still"), [
    (0.1, 1, True),  # judged batch by batch: still on 3 logging steps in a row
    (0.1, 32, False),  # over 32 samples the weights moved
    (0.0, 32, True),  # a learning rate of 0: still however many samples
])
def test_a_weight_is_still_only_if_it_did_not_move_over_enough_samples(
        tmp_path: Path, lr: float, min_samples: int, still: bool) -> None:
    ur = UpdateRatioMonitor(every_n_steps=8, early_steps=False, min_samples=min_samples)
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, [ur], logger=False, max_steps=40, limit_val_batches=0).fit(
        Sparse(lr), loader(digits(256), batch_size=8, shuffle=False))
    assert ("update_ratio.zero_updates" in codes(ur.findings)) == still
    # the charts keep the logging step's own (first-step) ratios
    assert [s for s, _ in ur.medians] == [0, 8, 16, 24, 32][:len(ur.medians)]

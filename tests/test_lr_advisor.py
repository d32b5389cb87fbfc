"""LRPlateauAdvisor: scripted streams for each verdict, a real divergence, state round trip."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.checks.divergence import batch_indices
from lightning_diag.functional.curves import (
    diverged,
    is_jump,
    pick_learning_rate,
    plateau_length,
    running_median,
    smooth_ema,
)
from tests.families import FAMILIES
from tests.helpers import Classifier, codes, digits, events, loader, mlp, text_events, trainer

N_BATCHES = 4


class Scripted(pl.LightningModule):
    """Returns scripted step losses and logs scripted epoch metrics (train in the step, val in
    validation, so epoch-end validation precedes on_train_epoch_end as in real runs)."""

    def __init__(self, epochs: list[dict[str, float]], step_losses: list[float] | None = None,
                 on_step: bool = False) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.epochs, self.step_losses, self.on_step = epochs, step_losses, on_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        m = self.epochs[self.current_epoch]
        i = self.current_epoch * N_BATCHES + batch_idx
        value = self.step_losses[i] if self.step_losses else m["train_loss"]
        for k in ("train_loss", "train_acc"):
            self.log(k, m[k], on_step=self.on_step, on_epoch=True)
        return (self.p * 0).sum() + value

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        m = self.epochs[self.current_epoch]
        self.log("val_loss", m["val_loss"])
        self.log("val_acc", m["val_acc"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(N_BATCHES, 1)), batch_size=1)


def _run(tmp_path, epochs, advisor, step_losses=None, on_step=False):
    model = Scripted(epochs, step_losses, on_step)
    t = trainer(tmp_path, [advisor], max_epochs=len(epochs))
    t.fit(model, _data(), _data())
    return t, model


def _stream(train_loss, val_loss, train_acc, val_acc):
    return [dict(train_loss=a, val_loss=b, train_acc=c, val_acc=d)
            for a, b, c, d in zip(train_loss, val_loss, train_acc, val_acc, strict=True)]


HEALTHY = _stream([1.5, 0.8, 0.5, 0.3, 0.2, 0.15], [1.6, 0.9, 0.6, 0.4, 0.3, 0.25],
                  [0.6, 0.8, 0.9, 0.95, 0.97, 0.98], [0.55, 0.78, 0.88, 0.93, 0.95, 0.96])


def _verdicts(adv: LRPlateauAdvisor) -> list[Any]:
    """The findings other than the one saying which metric names are read."""
    return [f for f in adv.findings if f.code != "advisor.keys"]


def test_healthy_stream_is_silent(tmp_path):
    adv = LRPlateauAdvisor()
    _run(tmp_path, HEALTHY, adv)
    assert codes(adv.findings, "info") == {"advisor.keys"}
    (keys,) = adv.findings
    assert keys.details == {"keys": {r: r for r in ("train_loss", "val_loss", "train_acc",
                                                     "val_acc")}, "missing": []}
    assert adv.history["val_acc"] == pytest.approx([e["val_acc"] for e in HEALTHY])


def test_plateau_while_high_advises_and_acts(tmp_path):
    stream = _stream([2.0, 1.5, 1.2] + [1.2] * 4, [2.0, 1.5, 1.2] + [1.21] * 4, [0.5] * 7,
                     [0.5] * 7)
    adv = LRPlateauAdvisor(patience=3, act=True, factor=0.5, min_epochs=99)
    t, _ = _run(tmp_path, stream, adv)
    plateau = [f for f in adv.findings if f.code == "advisor.plateau"]
    assert len(plateau) == 1 and plateau[0].epoch == 5  # 3 epochs (3, 4, 5) without improvement
    assert "Scaled the learning rate" in plateau[0].message
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
    assert adv.lr_changes[0]["old"] == pytest.approx(0.1)


def test_plateau_advice_only_by_default_and_not_when_low(tmp_path):
    stream = _stream([2.0, 1.5, 1.2] + [1.2] * 4, [2.0, 1.5, 1.2] + [1.21] * 4, [0.5] * 7,
                     [0.5] * 7)
    adv = LRPlateauAdvisor(patience=3, min_epochs=99)
    t, _ = _run(tmp_path, stream, adv)
    assert codes(adv.findings) == {"advisor.plateau"}
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)
    low = _stream([2.0, 0.1] + [0.1] * 4, [2.0, 0.1] + [0.1] * 4, [0.99] * 6, [0.98] * 6)
    adv = LRPlateauAdvisor(patience=3)
    _run(tmp_path / "low", low, adv)
    assert codes(adv.findings, "info") == {"advisor.keys"}


def test_underfit(tmp_path):
    stream = _stream([1.5, 1.3, 1.2, 1.1, 1.05, 1.0], [1.5, 1.3, 1.2, 1.1, 1.05, 1.0],
                     [0.5, 0.55, 0.6, 0.62, 0.64, 0.65], [0.5, 0.55, 0.6, 0.61, 0.63, 0.64])
    adv = LRPlateauAdvisor(min_epochs=5)
    _run(tmp_path, stream, adv, on_step=True)  # read back as train_acc_epoch
    assert codes(adv.findings) == {"advisor.underfit"}
    (f,) = _verdicts(adv)
    assert f.value == pytest.approx(0.64) and f.epoch == 4 and "bigger model" in f.advice


def test_overfit(tmp_path):
    stream = _stream([1.0, 0.5, 0.2, 0.1, 0.05, 0.02], [1.0, 0.8, 0.8, 0.9, 1.0, 1.1],
                     [0.7, 0.85, 0.95, 0.99, 1.0, 1.0], [0.65, 0.75, 0.78, 0.8, 0.8, 0.79])
    adv = LRPlateauAdvisor(min_epochs=5, monitor="train_loss")
    _run(tmp_path, stream, adv)
    assert codes(adv.findings) == {"advisor.overfit"}
    (f,) = _verdicts(adv)
    assert f.value == pytest.approx(0.2) and "weight decay" in f.advice
    acc = events(tmp_path / "tb" / "version_0")
    texts = text_events(acc, "diagnostics/LRPlateauAdvisor")
    assert "advisor.keys" in texts[0] and "advisor.overfit" in texts[-1]


def test_scripted_divergence_jump_and_nan(tmp_path):
    losses = [2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.8, 1.7, 1.7, 1.6, 1.6, 1.5, 30.0, 1.5, 1.4, 1.4]
    epochs = _stream([1.0] * 4, [1.0] * 4, [0.5] * 4, [0.5] * 4)
    adv = LRPlateauAdvisor(min_epochs=99, patience=9)
    _run(tmp_path, epochs, adv, step_losses=losses)
    (f,) = [f for f in adv.findings if f.code == "advisor.divergence"]
    assert f.step == 12 and f.details["batch_idx"] == 0 and f.epoch == 3
    assert f.indices == (0,) and f.details["indices_source"] == "sequential sampler"
    saved = torch.load(f.details["batch_path"])
    assert torch.equal(saved[0], torch.zeros(1, 1))
    # noise near zero loss (0.01 -> 0.2) is no divergence; a NaN is, at once
    assert not is_jump(0.2, [0.01] * 20, 5.0, 0.5 * 2.3)
    adv = LRPlateauAdvisor(min_epochs=99, patience=9, save_batch=False)
    _run(tmp_path / "nan", epochs, adv, step_losses=[2.3, float("nan")] + [1.0] * 14)
    (f,) = _verdicts(adv)
    assert f.severity == "fail" and f.step == 1 and math.isnan(f.value)
    assert f.details["batch_path"] is None


def test_loss_at_exactly_zero_then_a_jump_reads_well_and_never_divides_by_zero(tmp_path):
    # a median of 0 used to raise ZeroDivisionError inside on_train_batch_end (5.0 / 0), and a
    # start loss of 0 inside the plateau verdict at epoch end (0 / 0)
    epochs = _stream([0.0] * 4, [0.0] * 4, [1.0] * 4, [1.0] * 4)
    adv = LRPlateauAdvisor(min_epochs=99, patience=2, save_batch=False)
    _run(tmp_path, epochs, adv, step_losses=[0.0] * 12 + [5.0] + [0.0] * 3)
    (f,) = _verdicts(adv)  # no plateau: a loss that sits at 0 has converged
    assert f.code == "advisor.divergence" and f.severity == "warn" and f.step == 12
    assert f.message.startswith("Step loss jumped to 5 from a running median of 0 at global step "
                                "12, batch 0 of epoch 3; dataset indices [0] (sequential "
                                "sampler)."), f.message
    assert f.value == 5.0 and f.expected == (0.0, 0.0)


class Indexed(Dataset):
    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return (*self.base[i], i)


def test_real_divergence_sgd_huge_lr(tmp_path):
    torch.manual_seed(0)
    model = Classifier(mlp(), lr=50.0, optimizer="sgd")
    adv = LRPlateauAdvisor()
    t = trainer(tmp_path, [adv], max_epochs=2, limit_train_batches=8, limit_val_batches=0)
    t.fit(model, loader(digits(256), batch_size=32, shuffle=False))
    (f,) = [f for f in adv.findings if f.code == "advisor.divergence"]
    assert f.step is not None and f.step == f.details["batch_idx"] + 8 * f.epoch
    b = f.details["batch_idx"]
    assert f.indices == tuple(range(32 * b, 32 * b + 32))
    assert (tmp_path / "tb" / "version_0" / f"advisor_divergence_step{f.step}.pt").exists()


def test_indices_carried_by_batch_and_unknown_when_shuffled(tmp_path):
    shuffled = loader(digits(64), batch_size=16, shuffle=True)
    t = trainer(tmp_path, [], max_epochs=1, limit_train_batches=1)
    t.fit(Classifier(mlp()), shuffled)
    x = torch.zeros(3, 64)
    carried = batch_indices(t, (x, x, torch.tensor([5, 9, 2])), 0)
    assert carried == ((5, 9, 2), "carried by the batch")
    assert batch_indices(t, {"x": x, "index": torch.tensor([1, 4])}, 3)[0] == (1, 4)
    assert batch_indices(t, (x, torch.tensor([1, 2, 3])), 0) == ((), "")
    batch = next(iter(DataLoader(Indexed(digits(8)), batch_size=4)))
    assert batch_indices(t, batch, 0)[0] == (0, 1, 2, 3)


def test_healthy_real_run_silent_and_no_hooks_left(tmp_path):
    torch.manual_seed(0)
    model = Classifier(mlp(width=64), lr=1e-2)
    adv = LRPlateauAdvisor(min_epochs=3)
    t = trainer(tmp_path, [adv], max_epochs=4)
    t.fit(model, loader(digits(256), batch_size=32), loader(digits(128), 128, shuffle=False))
    assert codes(adv.findings, "info") == {"advisor.keys"}, [f.format() for f in adv.findings]
    assert len(adv.history["train_acc"]) == 4 and len(adv.hooks) == 0
    assert not list(tmp_path.rglob("*.pt"))


def test_state_dict_round_trip_and_checkpoint(tmp_path):
    adv = LRPlateauAdvisor(act=True)
    _run(tmp_path, HEALTHY, adv)
    state = adv.state_dict()
    other = LRPlateauAdvisor()
    other.load_state_dict(state)
    assert other.state_dict() == state and other.history == adv.history
    assert len(other.step_losses) == len(adv.step_losses) and other.start_loss == adv.start_loss


@pytest.mark.parametrize("kwargs", [dict(patience=0), dict(factor=2.0), dict(jump_factor=1.0),
                                    dict(monitor=""), dict(act="yes"), dict(min_lr=-1.0),
                                    dict(min_history=60, window=50)])
def test_arguments_validated(kwargs):
    name = next(iter(kwargs))
    with pytest.raises((ValueError, TypeError), match=name):
        LRPlateauAdvisor(**kwargs)


def test_curve_maths_against_direct_expressions():
    v = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], dtype=torch.float64)
    alpha = 0.3
    expect = [3.0]
    for x in v[1:].tolist():
        expect.append((1 - alpha) * expect[-1] + alpha * x)
    assert torch.allclose(smooth_ema(v, alpha), torch.tensor(expect, dtype=torch.float64))
    med = running_median(v, 3)
    assert med.tolist() == [torch.median(v[max(0, i - 2): i + 1]).item() for i in range(len(v))]
    assert plateau_length([5.0, 4.0, 3.0], 0.01) == 0
    assert plateau_length([5.0, 4.0, 4.0, 3.99], 0.01) == 2
    assert diverged([2.3, 2.0, float("inf")]) and not diverged([2.3, 5.0, 1.0])
    assert diverged([2.3] + [50.0] * 20)
    lr, scores, bad = pick_learning_rate({1.0: [2.3, 50.0, 80.0, 90.0], 0.1: [2.3, 1.0, 0.5, 0.4],
                                          0.01: [2.3, 2.0, 1.8, 1.7]}, alpha=0.5, tail=0.5)
    assert lr == 0.1 and bad == {1.0} and scores[0.01] > scores[0.1]
    # a noisy curve whose last raw value is lowest does not win over a steadily lower one
    noisy = [2.3, 0.9, 1.1, 0.9, 1.1, 0.3]
    steady = [2.3, 0.7, 0.6, 0.55, 0.5, 0.5]
    assert pick_learning_rate({0.1: noisy, 0.01: steady}, alpha=0.3, tail=0.34)[0] == 0.01
    with pytest.raises(ValueError, match="alpha"):
        smooth_ema([1.0], 0.0)


def test_advice_only_leaves_the_run_bit_identical(tmp_path):
    def final_weights(callbacks):
        pl.seed_everything(0, verbose=False)
        model = Classifier(mlp(), lr=1e-2)
        t = trainer(tmp_path, callbacks, logger=False, max_epochs=2, limit_train_batches=3,
                    deterministic=True)
        t.fit(model, loader(digits(96), batch_size=32), loader(digits(32), shuffle=False))
        return [p.detach().clone() for p in model.parameters()]

    plain = final_weights([])
    advised = final_weights([LRPlateauAdvisor(min_epochs=1, patience=1)])
    assert all(torch.equal(a, b) for a, b in zip(plain, advised, strict=True))


def test_names_of_the_dict_batches_family_are_found_and_judged(tmp_path):
    pl.seed_everything(0)
    fam = FAMILIES["dict_batches"]()  # train/loss, train/acc, val/loss, val/acc (torchmetrics)
    # any accuracy is "low", any gap "close" or "large": one verdict on the accuracies fires
    adv = LRPlateauAdvisor(min_epochs=1, low_acc=1.0, close_gap=1.0)
    t = trainer(tmp_path, [adv], max_epochs=2, limit_train_batches=2, limit_val_batches=2)
    t.fit(fam.module, fam.train, fam.val)
    (keys,) = [f for f in adv.findings if f.code == "advisor.keys"]
    assert keys.details == {"keys": {"train_loss": "train/loss", "val_loss": "val/loss",
                                     "train_acc": "train/acc", "val_acc": "val/acc"},
                            "missing": []}
    assert adv.history["val/acc"][-1] == pytest.approx(float(t.callback_metrics["val/acc"]))
    assert len(adv.history["train/loss"]) == 2
    (verdict,) = _verdicts(adv)
    assert verdict.code in ("advisor.underfit", "advisor.overfit")
    assert verdict.epoch == 0
    assert f"Training accuracy {adv.history['train/acc'][0]:.3f}" in verdict.message
    assert f"validation accuracy {adv.history['val/acc'][0]:.3f}" in verdict.message


def test_explicit_key_wins_and_only_unfound_names_are_reported(tmp_path):
    fam = FAMILIES["regression"]()  # train_loss and val_loss only: no accuracy to find
    adv = LRPlateauAdvisor(train_loss_key="val_loss")
    t = trainer(tmp_path, [adv], max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                logger=False)
    t.fit(fam.module, fam.train, fam.val)
    (keys,) = [f for f in adv.findings if f.code == "advisor.keys"]
    assert keys.details == {"keys": {"train_loss": "val_loss", "val_loss": "val_loss"},
                            "missing": ["train_acc", "val_acc"]}
    assert "the training accuracy, the validation accuracy" in keys.message

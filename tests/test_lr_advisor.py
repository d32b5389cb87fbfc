"""LRPlateauAdvisor: scripted streams for each verdict, a real divergence, state round trip."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_diag.callbacks.data_inspection import DataInspection
from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.checks.advisor import (
    Curves,
    GapRule,
    fit_gap_verdict,
    loss_floor,
    plateau_verdict,
)
from lightning_diag.checks.divergence import batch_indices
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.curves import (
    diverged,
    is_jump,
    pick_learning_rate,
    plateau_length,
    running_median,
    smooth_ema,
)
from lightning_diag.tensorboard.tags import FINDINGS_TABLE
from tests.families import FAMILIES
from tests.helpers import Classifier, codes, digits, events, loader, mlp, text_events, trainer
from tests.shared_cases import Shared, T, V

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
    """The verdicts: WARN and FAIL findings (not the infos on the names read or the summary)."""
    return [f for f in adv.findings if f.severity >= Severity.WARN]


def test_healthy_stream_is_silent(tmp_path):
    adv = LRPlateauAdvisor()
    _run(tmp_path, HEALTHY, adv)
    assert codes(adv.findings, "info") == {"advisor.keys", "advisor.summary"}
    keys, summary = adv.findings  # the names read, then the verdict at the end
    assert summary.code == "advisor.summary" and summary.value == 0.0
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
    assert codes(adv.findings, "info") == {"advisor.keys", "advisor.summary"}


def test_underfit(tmp_path):
    # both accuracies low and close, the training loss still falling but 1.6% an epoch: it
    # would not halve in 20 epochs
    stream = _stream([1.5, 1.45, 1.42, 1.40, 1.38, 1.36], [1.5, 1.45, 1.42, 1.40, 1.38, 1.36],
                     [0.5, 0.55, 0.6, 0.62, 0.64, 0.65], [0.5, 0.55, 0.6, 0.61, 0.63, 0.64])
    adv = LRPlateauAdvisor(min_epochs=5)
    _run(tmp_path, stream, adv, on_step=True)  # read back as train_acc_epoch
    assert codes(adv.findings) == {"advisor.underfit"}
    (f,) = _verdicts(adv)
    assert f.value == pytest.approx(0.64) and f.epoch == 4 and "bigger model" in f.advice
    assert "falls 1.6% per epoch" in f.message and f.details["basis"] == "accuracy"


def test_low_close_accuracies_while_the_loss_falls_fast_are_early_training_not_underfit():
    # measured: a 150-sample MLP at epoch 5 (train 0.687, val 0.672) whose loss fell 10% an
    # epoch went on to 100% training accuracy
    curves = Curves([2.30, 2.17, 2.05, 1.90, 1.71, 1.48], [2.25, 2.19, 2.09, 1.94, 1.75, 1.51],
                    [0.12, 0.19, 0.2, 0.29, 0.59, 0.687], [0.09, 0.08, 0.11, 0.38, 0.52, 0.672])
    assert fit_gap_verdict(curves, GapRule(), set()) is None


def test_underfit_and_overfit_from_the_loss_curves_alone():
    # no accuracy logged (a regression): the verdicts come from the two loss curves
    slow = Curves([2.37, 2.34, 2.29, 2.24, 2.20, 2.16], [2.40, 2.35, 2.29, 2.25, 2.22, 2.18])
    under = fit_gap_verdict(slow, GapRule(), set())
    assert under is not None and under.code == "advisor.underfit"
    assert under.details["basis"] == "loss curves" and under.details["rate"] < 0.034
    apart = Curves([2.3, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02], [2.3, 1.1, 0.7, 0.6, 0.62, 0.64, 0.66])
    over = fit_gap_verdict(apart, GapRule(start_loss=2.3), set())
    assert over is not None and over.code == "advisor.overfit"
    assert "33.0x the training loss" in over.message and "fell from 0.2 to 0.02" in over.message
    # a gap under 2% of the start loss is no finding (a healthy CNN: val 0.029, train 0.005)
    tight = Curves([2.3, 0.2, 0.09, 0.011, 0.0075, 0.0054, 0.0053],
                   [2.3, 0.13, 0.08, 0.0296, 0.0431, 0.0318, 0.0294])
    assert fit_gap_verdict(tight, GapRule(start_loss=2.3), set()) is None


#: The healthy corpus' two-tower InfoNCE (batch 32, temperature 0.5) at seed 1, measured: its
#: epoch losses, its first step loss, and the floor the overfit test reached on its batches.
INFONCE_SEED_1 = Curves([3.3832, 2.9851, 2.623, 2.4921, 2.4099, 2.3641],
                        [3.2537, 2.8052, 2.5768, 2.505, 2.4416, 2.414])
INFONCE_START, INFONCE_FLOOR = 3.4798, 1.705


def _overfit(code: str, value: float, floor: dict[str, Any] | None = None) -> Finding:
    return Finding("OverfitSmallBatch", code, Severity.INFO, "...", value=value,
                   details={} if floor is None else {"floor": floor})


def test_the_loss_floor_is_what_the_overfit_test_measured_and_nothing_else():
    assert loss_floor([_overfit("overfit.floor", 1.705)]) == 1.705
    smoothing = {"value": 0.5, "squashed": False, "margins": [0.0], "losses": [0.5]}
    assert loss_floor([_overfit("overfit.reached", 0.52, smoothing)]) == 0.5
    # a squashed output's loss, a failed overfit test, a reached one without a measured floor:
    # no floor (measured from 0, as without the overfit test)
    assert loss_floor([_overfit("overfit.reached", 1.5, {**smoothing, "squashed": True})]) is None
    assert loss_floor([_overfit("overfit.not_reached", 1.5)]) is None
    assert loss_floor([_overfit("overfit.reached", 0.01)]) is None
    assert loss_floor([_overfit("overfit.floor", math.nan)]) is None


def test_underfit_and_plateau_are_judged_above_the_loss_floor():
    # InfoNCE's floor is far above 0 (cosines bounded by the temperature, 31 negatives): from 0
    # its loss, 68% of its start and falling 3.4% an epoch, read as underfitting; above the
    # floor the overfit test reached on its batches it is 37% of the way and falls 10% an epoch
    from_zero = fit_gap_verdict(INFONCE_SEED_1, GapRule(start_loss=INFONCE_START), set())
    assert from_zero is not None and from_zero.code == "advisor.underfit"
    rule = GapRule(start_loss=INFONCE_START, floor=INFONCE_FLOOR)
    assert fit_gap_verdict(INFONCE_SEED_1, rule, set()) is None
    # the same slow fall above a floor near 0 is still underfitting, said with the floor
    slow = Curves([2.37, 2.34, 2.29, 2.24, 2.20, 2.16], [2.40, 2.35, 2.29, 2.25, 2.22, 2.18])
    under = fit_gap_verdict(slow, GapRule(floor=0.05), set())
    assert under is not None and under.code == "advisor.underfit"
    assert "floor 0.05 (measured by the overfit test)" in under.message
    assert under.details["floor"] == 0.05 and under.expected == (0.0, pytest.approx(0.514, 1e-3))
    # a floor at or above the start loss says nothing: measured from 0
    assert fit_gap_verdict(slow, GapRule(floor=3.0), set()) == fit_gap_verdict(slow, GapRule(),
                                                                               set())
    # a plateau just above the floor is the end of training; far above it, a plateau
    flat = [3.4, 1.76, 1.75, 1.75, 1.75]
    args: dict[str, Any] = dict(plateau_from=0, start_loss=3.48, patience=3, min_rel_delta=0.01,
                                high_fraction=0.2)
    assert plateau_verdict("val_loss", flat, **args) is not None
    assert plateau_verdict("val_loss", flat, **args, floor=1.705) is None
    high = plateau_verdict("val_loss", [3.4, 3.0, 3.0, 3.0, 3.0], **args, floor=1.705)
    assert high is not None and "73% as far above the loss's floor 1.705" in high.message


@pytest.mark.slow
def test_the_advisor_reads_the_floor_the_overfit_test_measured_in_the_same_run(tmp_path):
    """The healthy InfoNCE program at seed 1: underfitting for the advisor alone (it measures
    from 0), silent with the overfit test in the same Trainer (it measures from its floor)."""
    from lightning_diag.callbacks.overfit import OverfitSmallBatch
    from tests.corpus.healthy import HEALTHY

    program = dataclasses.replace(HEALTHY["infonce"], seed=1)
    found = {}
    for arm, extra in (("alone", []), ("with_overfit", [OverfitSmallBatch()])):
        module, train, val = program.build()
        advisor = LRPlateauAdvisor()
        program.trainer_for(tmp_path / arm, [*extra, advisor]).fit(module, train, val)
        found[arm] = {f.code for f in advisor.findings}
    assert "advisor.underfit" in found["alone"]
    assert not {"advisor.underfit", "advisor.plateau"} & found["with_overfit"]


@pytest.mark.parametrize("name", ["fast", "slow"])
def test_healthy_runs_that_converge_fast_or_slow_are_silent(tmp_path, name):
    streams = {
        # converged in 3 epochs, then both curves flat and close, accuracies high
        "fast": _stream([1.0, 0.2, 0.08, 0.07, 0.069, 0.068, 0.068, 0.068],
                        [1.0, 0.25, 0.11, 0.10, 0.099, 0.1, 0.099, 0.1],
                        [0.7, 0.95, 0.985, 0.99, 0.99, 0.99, 0.99, 0.99],
                        [0.68, 0.94, 0.975, 0.98, 0.98, 0.98, 0.98, 0.98]),
        # still falling 6-9% an epoch after 10 epochs, both curves close (lr 1e-4, measured)
        "slow": _stream([2.3, 2.0, 1.8, 1.62, 1.47, 1.34, 1.23, 1.13, 1.04, 0.96],
                        [2.28, 1.98, 1.78, 1.6, 1.45, 1.32, 1.21, 1.11, 1.02, 0.94],
                        [0.3, 0.45, 0.55, 0.62, 0.68, 0.72, 0.75, 0.78, 0.8, 0.82],
                        [0.32, 0.46, 0.56, 0.63, 0.69, 0.73, 0.76, 0.79, 0.81, 0.83]),
    }
    adv = LRPlateauAdvisor()
    _run(tmp_path, streams[name], adv)
    assert _verdicts(adv) == []


def test_overfit_by_the_loss_curves_with_a_small_accuracy_gap(tmp_path):
    # the case the 0.1 accuracy gap missed: 100% training accuracy, training loss near 0 and
    # still falling, validation loss many times it and no better for several epochs, 6 points
    stream = _stream([2.0, 0.8, 0.3, 0.1, 0.05, 0.03, 0.02, 0.012],
                     [2.0, 0.9, 0.45, 0.3, 0.28, 0.29, 0.30, 0.31],
                     [0.5, 0.8, 0.95, 0.99, 1.0, 1.0, 1.0, 1.0],
                     [0.5, 0.78, 0.9, 0.93, 0.94, 0.94, 0.94, 0.94])
    adv = LRPlateauAdvisor()
    _run(tmp_path, stream, adv)
    (f,) = _verdicts(adv)
    assert f.code == "advisor.overfit" and f.epoch == 7 and f.details["basis"] == "curves"
    assert f.value == pytest.approx(0.06) and f.details["share_of_error"] == pytest.approx(1.0)
    assert "has not improved on its best for 3 epochs" in f.message
    assert "fell from 0.05 to 0.012" in f.message and "weight decay" in f.advice


@pytest.mark.slow
def test_real_runs_healthy_overfitting_and_underfitting(tmp_path):
    """Digits, measured: a healthy CNN stays silent; 150 samples and a wide MLP overfit (100%
    training accuracy, validation about 93%); a 2-unit MLP underfits."""
    from lightning_diag.examples.digits import DigitsClassifier, load_digits_tensors

    x, y = load_digits_tensors()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=256)

    def verdicts(n, epochs, **model):
        pl.seed_everything(0, verbose=False)
        adv = LRPlateauAdvisor(save_batch=False)
        t = trainer(tmp_path, [adv], logger=False, max_epochs=epochs)
        t.fit(DigitsClassifier(**model), loader(TensorDataset(x[:n], y[:n]), batch_size=32), val)
        return [(f.code, f.epoch) for f in _verdicts(adv)]

    assert verdicts(1400, 12, arch="cnn", lr=1e-3) == []
    (over,) = verdicts(150, 30, arch="mlp", lr=1e-3, dropout=0.0, width=256)
    assert over[0] == "advisor.overfit" and 20 <= over[1] < 30
    (under,) = verdicts(1400, 8, arch="mlp", lr=1e-3, dropout=0.0, width=2)
    assert under == ("advisor.underfit", 4)


def test_overfit(tmp_path):
    stream = _stream([1.0, 0.5, 0.2, 0.1, 0.05, 0.02], [1.0, 0.8, 0.8, 0.9, 1.0, 1.1],
                     [0.7, 0.85, 0.95, 0.99, 1.0, 1.0], [0.65, 0.75, 0.78, 0.8, 0.8, 0.79])
    adv = LRPlateauAdvisor(min_epochs=5, monitor="train_loss")
    _run(tmp_path, stream, adv)
    assert codes(adv.findings) == {"advisor.overfit"}
    (f,) = _verdicts(adv)
    assert f.value == pytest.approx(0.2) and "weight decay" in f.advice
    acc = events(tmp_path / "tb" / "version_0")
    texts = text_events(acc, FINDINGS_TABLE)
    assert "advisor.keys" in texts[0] and "advisor.overfit" in texts[-1]


def test_scripted_divergence_jump_and_nan(tmp_path):
    losses = [2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.8, 1.7, 1.7, 1.6, 1.6, 1.5, 30.0, 1.5, 1.4, 1.4]
    epochs = _stream([1.0] * 4, [1.0] * 4, [0.5] * 4, [0.5] * 4)
    adv = LRPlateauAdvisor(min_epochs=99, patience=9, min_samples=1)  # batches of 1 sample
    _run(tmp_path, epochs, adv, step_losses=losses)
    (f,) = [f for f in adv.findings if f.code == "advisor.divergence"]
    assert f.step == 12 and f.details["batch_idx"] == 0 and f.epoch == 3
    assert f.indices == (0,) and f.details["indices_source"] == "sequential sampler"
    saved = torch.load(f.details["batch_path"])
    assert torch.equal(saved[0], torch.zeros(1, 1))
    # noise near zero loss (0.01 -> 0.2) is no divergence; a NaN is, at once
    assert not is_jump(0.2, [0.01] * 20, 5.0, 0.5 * 2.3)
    adv = LRPlateauAdvisor(min_epochs=99, patience=9, save_batch=False, min_samples=1)
    _run(tmp_path / "nan", epochs, adv, step_losses=[2.3, float("nan")] + [1.0] * 14)
    (f,) = _verdicts(adv)
    assert f.severity == "fail" and f.step == 1 and math.isnan(f.value)
    assert f.details["batch_path"] is None


@pytest.mark.parametrize(("later", "stalled"), [(1.99, True), (1.97, False)])
def test_a_loss_that_does_not_move_is_stalled_once(tmp_path, later, stalled):
    # 20 step losses: the first 10 at 2.0, then `later`: a 0.5% drop stalls, a 1.5% one moves
    losses = [2.0] * 10 + [later] * 14
    epochs = _stream([1.0] * 6, [1.0] * 6, [0.5] * 6, [0.5] * 6)
    adv = LRPlateauAdvisor(min_epochs=99, patience=9, stall_steps=20, save_batch=False)
    _run(tmp_path, epochs, adv, step_losses=losses)
    found = [f for f in adv.findings if f.code == "advisor.stalled"]
    assert len(found) == stalled
    if stalled:
        (f,) = found
        assert f.step == 19 and f.value == pytest.approx((2.0 - 1.99) / 2.0)
        assert f.expected == (0.01, 1.0) and f.severity == "warn"
        assert "after 20 steps, +0.50% below the median 2 of the first 10" in f.message
    off = LRPlateauAdvisor(min_epochs=99, patience=9, save_batch=False)  # the default: off
    _run(tmp_path / "off", epochs, off, step_losses=[2.0] * 24)
    assert "advisor.stalled" not in {f.code for f in off.findings}


def test_loss_at_exactly_zero_then_a_jump_reads_well_and_never_divides_by_zero(tmp_path):
    # a median of 0 used to raise ZeroDivisionError inside on_train_batch_end (5.0 / 0), and a
    # start loss of 0 inside the plateau verdict at epoch end (0 / 0)
    epochs = _stream([0.0] * 4, [0.0] * 4, [1.0] * 4, [1.0] * 4)
    adv = LRPlateauAdvisor(min_epochs=99, patience=2, save_batch=False, min_samples=1)
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
    assert codes(adv.findings, "info") == {"advisor.keys", "advisor.summary"}, [
        f.format() for f in adv.findings]
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
                                    dict(min_history=60, window=50), dict(stall_steps=15),
                                    dict(stall_steps=2.5)])
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


def test_a_divergence_on_a_batch_holding_a_corrupted_sample_names_it(tmp_path):
    x, y = digits(64, flatten=True).tensors
    x[37, 5] = float("nan")  # batch 2 of 16 holds samples 32-47
    inspect, adv = DataInspection(max_images=1), LRPlateauAdvisor(save_batch=False)
    t = trainer(tmp_path, [inspect, adv], max_epochs=1, limit_val_batches=0)
    t.fit(Classifier(mlp(), lr=1e-3), loader(TensorDataset(x, y), batch_size=16, shuffle=False))
    (f,) = [f for f in adv.findings if f.code == "advisor.divergence"]
    assert f.severity == "fail" and f.details["batch_idx"] == 2
    assert f.details["flagged_in_batch"] == {"data.non_finite": [37]}
    assert "The batch holds 1 sample(s) the data inspection flagged: 37 (data.non_finite)." \
        in f.message
    assert "Remove or repair these samples" in f.advice


def test_a_divergence_on_a_clean_batch_points_at_the_model_and_the_learning_rate(tmp_path):
    torch.manual_seed(0)
    inspect, adv = DataInspection(max_images=1), LRPlateauAdvisor(save_batch=False)
    t = trainer(tmp_path, [inspect, adv], max_epochs=1, limit_train_batches=8,
                limit_val_batches=0)
    t.fit(Classifier(mlp(), lr=50.0, optimizer="sgd"),
          loader(digits(256), batch_size=32, shuffle=False))
    (f,) = [f for f in adv.findings if f.code == "advisor.divergence"]
    assert f.indices and f.details == {**f.details, "flagged_in_batch": {},
                                       "data_checked": True}
    assert "None of its samples was flagged by the data inspection" in f.message
    assert f.advice.startswith("The batch holds no abnormal sample, so the model or the "
                               "learning rate is the likely cause")
    # without a data inspection it says so rather than guess
    adv = LRPlateauAdvisor(save_batch=False)
    torch.manual_seed(0)
    trainer(tmp_path / "alone", [adv], max_epochs=1, limit_train_batches=8,
            limit_val_batches=0).fit(Classifier(mlp(), lr=50.0, optimizer="sgd"),
                                     loader(digits(256), batch_size=32, shuffle=False))
    (f,) = [f for f in adv.findings if f.code == "advisor.divergence"]
    assert "No data inspection ran in this fit" in f.message and not f.details["data_checked"]


SHARED = Shared(
    LRPlateauAdvisor,
    # thresholds no short run meets, so that the real run finds underfitting
    run={"min_epochs": 2, "low_acc": 0.999, "close_gap": 1.0},
    guard={"patience": 1, "min_epochs": 1, "min_history": 2, "save_batch": False},
    bad=[("monitor", "", V), ("monitor", 3, T), ("train_loss_key", 0, T),
         ("val_loss_key", "", V), ("train_acc_key", 1, T), ("val_acc_key", "", V),
         ("patience", 0, V), ("min_rel_delta", -0.1, V), ("high_fraction", 1.5, V),
         ("act", "yes", T), ("factor", 0.0, V), ("factor", 1.0, V), ("factor", 2.0, V),
         ("min_lr", -1.0, V), ("min_epochs", 0, V), ("low_acc", 2, V), ("close_gap", -1, V),
         ("overfit_gap", "x", T), ("rel_gap", 1.5, V), ("halving_epochs", 0, V),
         ("jump_factor", 1.0, V), ("min_jump_fraction", -0.5, V), ("window", 0, V),
         ("window", 10**6, V), ("min_history", 60, V), ("save_batch", None, T),
         ("stall_steps", 5, V), ("stall_steps", 30.0, T), ("strict", 1, T),
         ("min_samples", -1, V), ("min_samples", "32", T)],
    state=(lambda d: (LRPlateauAdvisor(window=2, min_history=1, save_batch=False),
                      LRPlateauAdvisor(window=50, save_batch=False)),
           lambda cb: len(cb.step_losses), None),
)

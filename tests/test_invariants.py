"""TrainingInvariants: each code on a broken program, silence on the healthy look-alikes
(gradient accumulation, zero_grad before or after the step, a GAN, a frozen teacher, a frozen
backbone, frozen batch-norm statistics, a learning-rate warm-up from 0, a group at lr 0, bf16,
percentages, Lightning's own epoch means), the maths and rules without a Trainer, no hook left
behind, and the main run bit-identical with the callback attached.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.callbacks.invariants import CHECKS, TrainingInvariants
from lightning_diag.checks.epoch_loss import (
    EpochSteps,
    check_epoch_loss,
    epoch_loss_names,
    matching_reductions,
)
from lightning_diag.checks.invariants import check_modes, mode_layers
from lightning_diag.checks.metric_range import (
    check_metric_ranges,
    known_classes,
    label_counts,
    metric_bound,
)
from lightning_diag.checks.target_leak import (
    LeakEvidence,
    LeakWatch,
    check_target_leak,
    leak_counts,
)
from lightning_diag.findings import Severity
from lightning_diag.functional.invariants import (
    carried_over,
    collision_rate,
    conditional_entropy,
    float_position,
    movable,
    moved,
    prefix_keys,
    repeat_share,
    target_matches,
)
from tests.families import FAMILIES, Family
from tests.helpers import Classifier, cnn, codes, digits, events, loader, mlp, text_events, trainer
from tests.shared_cases import Shared, T, V


def fit(tmp_path: Path, model: pl.LightningModule, cb: TrainingInvariants | None = None,
        epochs: int = 2, n: int = 192, batch_size: int = 32, val: bool = True,
        **kw: Any) -> TrainingInvariants:
    cb = cb or TrainingInvariants(every_n_steps=4)
    t = trainer(tmp_path, [cb], max_epochs=epochs, logger=False, **kw)
    t.fit(model, loader(digits(n), batch_size=batch_size),
          loader(digits(64), shuffle=False) if val else None)
    assert len(cb.hooks) == 0
    return cb


def problems(cb: TrainingInvariants) -> set[str]:
    return codes(cb.findings)


def only(cb: TrainingInvariants, code: str) -> Any:
    (found,) = [f for f in cb.findings if f.code == code]
    return found


# -- gradients zeroed between optimizer steps --------------------------------------------------
class Manual(Classifier):
    """One optimizer under manual optimization; ``zero``: where zero_grad goes (None: nowhere),
    ``every``: step and zero every this many batches (accumulation by hand)."""

    def __init__(self, zero: str | None = "before", set_to_none: bool = True, every: int = 1,
                 clip: float | None = None) -> None:
        super().__init__(mlp(), lr=0.05, optimizer="sgd")
        self.automatic_optimization = False
        self.zero, self.set_to_none, self.every, self.clip = zero, set_to_none, every, clip

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = cast(Any, self.optimizers())
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.zero == "before" and batch_idx % self.every == 0:
            opt.zero_grad(set_to_none=self.set_to_none)
        self.manual_backward(loss / self.every)
        if (batch_idx + 1) % self.every == 0:
            if self.clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.clip,
                                    gradient_clip_algorithm="norm")
            opt.step()
            if self.zero == "after":
                opt.zero_grad(set_to_none=self.set_to_none)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss


@pytest.mark.parametrize("model", [
    lambda: Manual("before", set_to_none=True),
    lambda: Manual("before", set_to_none=False),
    lambda: Manual("after", set_to_none=True),
    lambda: Manual("after", set_to_none=False),
    lambda: Manual("before", every=3),  # accumulation by hand
], ids=["before-none", "before-zeros", "after-none", "after-zeros", "accumulate-by-hand"])
def test_manual_zero_grad_anywhere_is_sound(tmp_path, model):
    cb = fit(tmp_path, model(), TrainingInvariants(every_n_steps=1))
    assert problems(cb) == set()
    assert cb._counts["grad_not_zeroed"] >= 3


def test_lightning_accumulation_is_sound(tmp_path):
    pl.seed_everything(0)
    cb = fit(tmp_path, Classifier(cnn()), TrainingInvariants(every_n_steps=1),
             accumulate_grad_batches=3)
    assert problems(cb) == set() and cb._counts["grad_not_zeroed"] >= 2


@pytest.mark.parametrize("clip", [None, 0.01])
def test_missing_zero_grad_is_proven(tmp_path, clip):
    model = Manual(zero=None, clip=clip)
    cb = fit(tmp_path, model, epochs=1)
    assert not any(p._backward_hooks for p in model.parameters())  # the gradient hook is gone
    f = only(cb, "invariants.grad_not_zeroed")
    assert f.severity is Severity.FAIL and f.step == 1  # the first window, steps 0 to 1
    assert "previous step's gradient" in f.message and f.value > 0
    assert f.expected == (0.0, 0.0) and "zero_grad" in f.advice


def test_automatic_optimization_with_zero_grad_turned_off_is_flagged(tmp_path):
    model = Classifier(mlp(), lr=0.01, optimizer="sgd")
    model.optimizer_zero_grad = lambda *args, **kwargs: None  # type: ignore[method-assign]
    cb = fit(tmp_path, model, epochs=1)
    assert only(cb, "invariants.grad_not_zeroed").severity is Severity.FAIL


class GAN(pl.LightningModule):
    """Two optimizers, the discriminator's loss NOT detached from the generator (its gradients
    reach the generator and are cleared by the generator's own zero_grad): sound."""

    def __init__(self, detach: bool = False, zero_generator: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.detach, self.zero_generator = detach, zero_generator
        self.generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))
        self.discriminator = nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.2),
                                           nn.Dropout(0.2), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        g_opt, d_opt = cast(Any, self.optimizers())
        real = batch[0].flatten(1)
        z = torch.randn(len(real), 8)
        fake = self.generator(z)
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        if self.zero_generator:
            g_opt.zero_grad()
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        self.manual_backward(g_loss)
        g_opt.step()
        d_opt.zero_grad()
        fake_in = fake.detach() if self.detach else self.generator(z)
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake_in), zeros)) / 2
        self.manual_backward(d_loss)
        d_opt.step()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss}, on_epoch=True, on_step=False)

    def configure_optimizers(self) -> Any:
        return (torch.optim.Adam(self.generator.parameters(), lr=2e-4),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-4))


@pytest.mark.parametrize("detach", [False, True])
def test_gan_with_two_optimizers_is_sound(tmp_path, detach):
    pl.seed_everything(0)
    cb = fit(tmp_path, GAN(detach=detach), TrainingInvariants(every_n_steps=1), val=False)
    assert problems(cb) == set()
    assert cb._counts["grad_not_zeroed"] >= 10 and len(cb._optim.watches) == 2


def test_gan_missing_generator_zero_grad_is_flagged_on_its_optimizer(tmp_path):
    pl.seed_everything(0)
    cb = fit(tmp_path, GAN(detach=True, zero_generator=False), val=False, epochs=1)
    f = only(cb, "invariants.grad_not_zeroed")
    assert f.subject == "optimizer 0 (Adam)" and "generator" in f.details["parameter"]


# -- every trainable parameter in an optimizer -------------------------------------------------
class HeadForgotten(Classifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        net = cast(nn.Sequential, self.net)
        return torch.optim.Adam(net[:-1].parameters(), lr=1e-3)  # the last layer is left out


def test_parameter_in_no_optimizer_is_named(tmp_path):
    cb = fit(tmp_path, HeadForgotten(mlp()), epochs=1)
    f = only(cb, "invariants.param_not_in_optimizer")
    assert f.severity is Severity.WARN and f.value == 2
    assert f.details["parameters"] == ["net.5.weight", "net.5.bias"]
    assert "`net.5.weight`" in f.message and "requires_grad_(False)" in f.advice
    assert (f.epoch, f.step) == (0, 1)  # found after the first batch


class Distilled(Classifier):
    """A student trained against a frozen teacher kept in eval mode, run under no_grad, its
    parameters still requiring a gradient (nobody set them otherwise) and in no optimizer."""

    def __init__(self, teacher_requires_grad: bool = True) -> None:
        super().__init__(cnn(dropout=0.2), lr=1e-2)
        self.teacher = cnn(dropout=0.5)
        self.teacher.requires_grad_(teacher_requires_grad)

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            soft = self.teacher(x).div(2.0).softmax(1)
        logits = self(x)
        loss = F.cross_entropy(logits, y) + F.kl_div(logits.div(2.0).log_softmax(1), soft,
                                                     reduction="batchmean")
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_frozen_teacher_in_eval_mode_is_sound(tmp_path, requires_grad):
    pl.seed_everything(0)
    cb = fit(tmp_path, Distilled(requires_grad), TrainingInvariants(every_n_steps=1))
    assert problems(cb) == set()
    assert cb._counts["eval_mode_in_training"] > 0
    summary = only(cb, "invariants.summary")
    assert ("got no gradient" in summary.message) == requires_grad


# -- parameters change after optimizer.step ---------------------------------------------------
class Forgetful(torch.optim.SGD):
    """A hand-written optimizer bug: the last tensor of the last group is never updated."""

    def step(self, closure: Any = None) -> Any:
        last = self.param_groups[-1]["params"][-1]
        saved = last.detach().clone()
        out = super().step(closure)
        with torch.no_grad():
            last.copy_(saved)
        return out


class Configured(Classifier):
    def __init__(self, make: Any, **kw: Any) -> None:
        super().__init__(mlp(), **kw)
        self.make = make

    def configure_optimizers(self) -> Any:
        return self.make(self)


def test_parameter_the_optimizer_does_not_update_is_flagged(tmp_path):
    model = Configured(lambda m: Forgetful(m.parameters(), lr=0.05))
    cb = fit(tmp_path, model, TrainingInvariants(every_n_steps=2, patience=2), epochs=1)
    f = only(cb, "invariants.param_not_updated")
    assert f.details["parameters"] == ["net.5.bias"] and f.subject == "optimizer 0 (Forgetful)"
    assert "2 checked steps in a row" in f.message


def _warmup(m: Any) -> Any:
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, step / 5)), "interval": "step"}}


def _frozen_group(m: Any) -> Any:
    net = m.net
    return torch.optim.SGD([{"params": net[1].parameters(), "lr": 0.0},
                            {"params": list(net[3].parameters()) + list(net[5].parameters())}],
                           lr=0.05)


@pytest.mark.parametrize("make", [_warmup, _frozen_group,
                                  lambda m: torch.optim.SGD(m.parameters(), lr=1e-12)],
                         ids=["warmup-from-0", "group-at-lr-0", "below-float-precision"])
def test_learning_rates_that_cannot_move_a_weight_are_not_judged(tmp_path, make):
    cb = fit(tmp_path, Configured(make), TrainingInvariants(every_n_steps=1, patience=1),
             epochs=1)
    assert problems(cb) == set()


class SkipsNonFinite(torch.optim.SGD):
    """Skips a step whose gradients are not finite, as AMP's GradScaler does."""

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            super().step()
        return loss


class SometimesInf(Configured):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if batch_idx % 2 else loss


def test_a_skipped_step_with_non_finite_gradients_is_not_judged(tmp_path):
    model = SometimesInf(lambda m: SkipsNonFinite(m.parameters(), lr=0.05))
    cb = fit(tmp_path, model, TrainingInvariants(every_n_steps=1, patience=1), epochs=1,
             val=False)
    assert "invariants.param_not_updated" not in problems(cb)


class Clipped(pl.LightningModule):
    """WGAN-style weight clipping after each step, with gradients that push every weight the
    same way (non-negative inputs, a target far above the output): the weights that get a
    gradient sit at the bound from the first step on, the others (blank pixels) never move."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return ((self.net(batch[0].flatten(1)) - 100.0) ** 2).mean()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            for p in self.parameters():
                p.clamp_(-0.01, 0.01)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_weights_clipped_at_their_bound_are_not_judged(tmp_path, monkeypatch):
    import lightning_diag.callbacks._optimizer_watch as module

    seen: list[bool] = []
    real = module._at_a_bound
    monkeypatch.setattr(module, "_at_a_bound", lambda p: seen.append(real(p)) or seen[-1])
    cb = fit(tmp_path, Clipped(), TrainingInvariants(every_n_steps=1, patience=1), epochs=1,
             val=False)
    assert problems(cb) == set()
    assert len(seen) >= 6 and all(seen)  # both tensors stayed put on every checked step


def test_bf16_mixed_precision_is_sound(tmp_path):
    pl.seed_everything(0)
    cb = fit(tmp_path, Classifier(cnn(), lr=1e-2), TrainingInvariants(every_n_steps=1),
             precision="bf16-mixed")
    assert problems(cb) == set() and cb._counts["param_not_updated"] > 5


# -- the module in train mode inside training_step ---------------------------------------------
class LeftInEval(Classifier):
    """Draws samples in eval mode at each epoch end and forgets to switch back."""

    def __init__(self, part: str | None = None) -> None:
        super().__init__(cnn(dropout=0.3), lr=1e-2)
        self.part = part

    def on_train_epoch_end(self) -> None:
        target = self if self.part is None else self.net
        target.eval()


@pytest.mark.parametrize("part", [None, "net"])
def test_module_left_in_eval_mode_is_flagged(tmp_path, part):
    cb = fit(tmp_path, LeftInEval(part), TrainingInvariants(every_n_steps=2), epochs=2)
    f = only(cb, "invariants.eval_mode_in_training")
    assert f.epoch == 1 and f.severity is Severity.WARN
    assert f.details["module_training"] is (part is not None)
    assert "net.5" in f.details["layers"] and "self.train()" in f.advice


class NormEval(Classifier):
    """Batch-norm statistics frozen on purpose (``norm_eval``) and a frozen backbone in eval
    mode: the root stays in train mode."""

    def __init__(self) -> None:
        super().__init__(cnn(dropout=0.3), lr=1e-2)
        self.backbone = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.BatchNorm1d(64))
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> NormEval:
        super().train(mode)
        self.backbone.eval()
        cast(nn.Sequential, self.net)[1].eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0 * self.backbone(x.flatten(1)).mean())


def test_frozen_statistics_and_frozen_backbone_are_sound(tmp_path):
    cb = fit(tmp_path, NormEval(), TrainingInvariants(every_n_steps=1))
    assert problems(cb) == set()


def test_dropout_off_from_the_first_step_is_a_choice_not_a_bug(tmp_path):
    model = Classifier(cnn(dropout=0.3), lr=1e-2)
    model.on_train_epoch_start = lambda: cast(nn.Sequential, model.net)[5].eval()  # type: ignore
    cb = fit(tmp_path, model, TrainingInvariants(every_n_steps=1))
    assert problems(cb) == set()


def test_mode_rules_without_a_trainer():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4),
                        nn.MultiheadAttention(4, 1, dropout=0.1), nn.Dropout(0.0))
    layers = mode_layers(net, {id(net[0].weight)})
    assert [(x.name, x.dropout) for x in layers] == [("1", True), ("2", False), ("3", True)]
    seen: set[str] = set()
    assert check_modes(net, layers, seen) is None and seen == {"1", "2", "3"}
    net[2].eval()  # statistics frozen, root in train mode
    assert check_modes(net, layers, seen) is None
    net[1].eval()  # dropout seen in train mode before
    f = check_modes(net, layers, seen)
    assert f is not None and f.details["layers"] == ["1"]
    assert check_modes(net, layers, set()) is None  # off from the start: a choice


# -- bounded metrics ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind,high", [
    ("val_acc", "accuracy", 1.0), ("train/accuracy_epoch", "accuracy", 1.0),
    ("val_top1", "accuracy", 1.0), ("val/f1_macro", "f1", 1.0), ("test_auroc", "auroc", 1.0),
    ("val_miou", "iou", 1.0), ("val/recall@10", "recall", 1.0), ("dice_score", "dice", 1.0),
    ("val_map50", "map", 1.0),
    ("val_acc_pct", "accuracy", 100.0), ("accuracy %", "accuracy", 100.0),
    ("val_loss", None, None), ("acc_gap", None, None), ("train_minus_val_accuracy", None, None),
    ("num_correct", None, None), ("val_error_rate", None, None), ("lr-Adam", None, None),
])
def test_bounded_metrics_are_found_by_name(name, kind, high):
    bound = metric_bound(name)
    assert (bound.kind, bound.high) == (kind, high) if bound else kind is None


def test_metric_range_rules():
    found, _ = check_metric_ranges({"val_acc": [-0.1]})
    assert [f.subject for f in found] == ["val_acc"] and found[0].value == -0.1
    found, _ = check_metric_ranges({"val_acc": [12.0, 340.0]})  # no scale explains 340
    assert found[0].value == 340.0 and found[0].expected == (0.0, 100.0)
    assert check_metric_ranges({"val_acc": [math.nan, 0.5]}) == ([], [])
    found, _ = check_metric_ranges({"val_f1": [math.inf]})
    assert found and found[0].value == math.inf
    # a percentage when every accuracy of the run is on that scale; not against a fraction
    assert check_metric_ranges({"train_acc": [20.0], "val_acc": [31.0]}) == (
        [], ["train_acc", "val_acc"])
    found, _ = check_metric_ranges({"train_acc": [0.4], "val_acc": [31.0], "val_f1": [44.0]})
    assert [f.subject for f in found] == ["val_acc"] and found[0].expected == (0.0, 1.0)
    assert check_metric_ranges({"val_acc": [31.0]}, percent=["val_acc"]) == ([], [])


def test_an_accuracy_far_below_chance_as_a_percentage_is_no_percentage():
    # 4 classes: chance 25%, so 2.8 is no percentage once the loss fell (a wrong divisor)
    (f,), _ = check_metric_ranges({"val_acc": [1.9, 2.8]}, classes=4, loss_ratio=0.6)
    assert f.subject == "val_acc" and f.value == 2.8 and f.expected == (0.0, 1.0)
    assert f.details["classes"] == 4 and "25%" in f.message
    # each condition alone is no evidence: a percentage is read, as before
    assert check_metric_ranges({"val_acc": [2.8]}, classes=4, loss_ratio=0.95) == (
        [], ["val_acc"])  # the loss did not fall: an untrained model may be below chance
    assert check_metric_ranges({"val_acc": [2.8]}, loss_ratio=0.6) == ([], ["val_acc"])
    assert check_metric_ranges({"val_acc": [13.0]}, classes=4, loss_ratio=0.6) == (
        [], ["val_acc"])  # below chance, above half of it: a weak model on the 0-100 scale
    assert check_metric_ranges({"val_acc": [0.1]}, classes=4, loss_ratio=0.6) == ([], [])
    assert check_metric_ranges({"val_f1": [2.8]}, classes=4, loss_ratio=0.6) == (
        [], ["val_f1"])  # an F1 has no chance level of 1 / classes
    # the class count: every class from 0 to the largest seen, each at least twice
    assert label_counts((torch.zeros(3, 2), torch.tensor([2, 0, 2]))).tolist() == [1, 0, 2]
    assert label_counts((torch.zeros(3, 2), torch.tensor([-1, 0, 2]))) is None
    assert label_counts({"x": torch.zeros(2, 3), "labels": torch.zeros(2, 3).long()}) is None
    assert known_classes([torch.tensor([2, 1]), torch.tensor([1, 3, 2])]) == 3
    assert known_classes([torch.tensor([2, 1, 2])]) is None  # class 1 seen once
    assert known_classes([]) is None


class DividedAccuracy(Classifier):
    """Accuracy divided by a hard-coded 8 on batches of 32 (up to 4: issue 20's accuracy
    above 1, which would read as a percentage far below chance)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log("train_acc", (logits.argmax(1) == y).float().sum() / 8, on_epoch=True,
                 on_step=False)
        return F.cross_entropy(logits, y)


def test_an_accuracy_with_a_wrong_divisor_is_out_of_range(tmp_path):
    cb = fit(tmp_path, DividedAccuracy(mlp(), lr=1e-2), epochs=3)
    f = only(cb, "invariants.metric_out_of_range")
    assert f.subject == "train_acc" and 1 < f.value <= 4 and f.details["classes"] == 10
    assert f.details["loss_ratio"] <= 0.9


class SummedAccuracy(Classifier):
    """The validation accuracy summed over the batch instead of averaged."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().sum())


class PercentAccuracy(Classifier):
    """Both accuracies logged on the 0-100 scale, on purpose."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log("train_acc", 100.0 * (logits.argmax(1) == y).float().mean(), on_epoch=True,
                 on_step=False)
        return F.cross_entropy(logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", 100.0 * (self(x).argmax(1) == y).float().mean())


def test_summed_accuracy_is_out_of_range(tmp_path):
    cb = fit(tmp_path, SummedAccuracy(mlp(), lr=1e-2), epochs=2)
    f = only(cb, "invariants.metric_out_of_range")
    assert f.subject == "val_acc" and f.value > 1 and f.expected == (0.0, 1.0)
    assert "train_acc" not in {x.subject for x in cb.findings}


def test_percentages_on_purpose_are_in_range(tmp_path):
    cb = fit(tmp_path, PercentAccuracy(mlp(), lr=1e-2), epochs=2)
    assert problems(cb) == set()
    assert only(cb, "invariants.summary").details["percent_metrics"] == ["train_acc", "val_acc"]


# -- the epoch loss ---------------------------------------------------------------------------
class RunningLoss(Classifier):
    """An epoch loss kept by hand; ``reset``: which of the running sum and count are reset."""

    def __init__(self, reset: tuple[str, ...] = ("sum", "count"), weighted: bool = False) -> None:
        super().__init__(mlp(), lr=1e-2)
        self.reset, self.weighted = reset, weighted
        self.total, self.count = 0.0, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        n = len(batch[1]) if self.weighted else 1
        self.total += float(loss.detach()) * n
        self.count += n
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("epoch_loss", self.total / self.count)
        if "sum" in self.reset:
            self.total = 0.0
        if "count" in self.reset:
            self.count = 0


@pytest.mark.parametrize("reset,cause", [
    (("count",), "sum_not_reset"), (("sum",), "count_not_reset"), ((), "neither_reset")])
def test_running_totals_never_reset_are_inconsistent(tmp_path, reset, cause):
    cb = fit(tmp_path, RunningLoss(reset), epochs=3, n=200)
    f = only(cb, "invariants.epoch_loss_inconsistent")
    assert f.subject == "epoch_loss" and f.details["cause"] == cause and f.epoch == 1
    assert f.details["reduction"] in ("mean", "batch_mean") and f.step == 14


@pytest.mark.parametrize("weighted", [True, False])
def test_epoch_means_weighted_or_not_are_consistent(tmp_path, weighted):
    # 200 samples in batches of 32: the last batch has 8, so the two means differ
    cb = fit(tmp_path, RunningLoss(weighted=weighted), epochs=3, n=200)
    assert problems(cb) == set()
    assert cb._counts["epoch_loss_inconsistent"] >= 4  # epoch_loss and train_loss, 2 epochs each
    reductions, *_ = cb._series["epoch_loss"]
    assert ("mean" if weighted else "batch_mean") in reductions


class OtherQuantity(Classifier):
    """Logs the cross-entropy, returns it plus an L2 term; and a sum-reduced epoch loss."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        ce = F.cross_entropy(self(x), y)
        self.log("train_loss", ce, on_epoch=True, on_step=False)
        loss = ce + 1e-2 * sum((p**2).sum() for p in self.parameters())
        self.log("loss_total", loss, on_epoch=True, on_step=False, reduce_fx="sum")
        return loss


def test_other_quantities_and_reductions_are_not_misread(tmp_path):
    cb = fit(tmp_path, OtherQuantity(mlp(), lr=1e-2), epochs=3, n=200,
             accumulate_grad_batches=2)
    assert problems(cb) == set()
    assert "train_loss" in cb._not_loss and cb._series["loss_total"][0] == ["sum"]


class SaveAt(pl.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_a_run_resumed_mid_epoch_is_not_misread(tmp_path):
    # The resumed epoch's first steps ran before the checkpoint: its logged epoch loss cannot be
    # compared with the steps seen after it; the series and streaks come back from the checkpoint.
    ckpt = tmp_path / "mid.ckpt"
    first = TrainingInvariants(every_n_steps=1)
    t = trainer(tmp_path / "a", [first, SaveAt(9, ckpt)], max_epochs=2, logger=False)
    t.fit(RunningLoss(), loader(digits(192)), loader(digits(64), shuffle=False))
    second = TrainingInvariants(every_n_steps=1)
    t = trainer(tmp_path / "b", [second], max_epochs=3, logger=False)
    t.fit(RunningLoss(), loader(digits(192)), loader(digits(64), shuffle=False),
          ckpt_path=str(ckpt))
    assert problems(second) == set() and len(second.hooks) == 0
    assert second._series["epoch_loss"][2][0].epoch == 0  # the series kept from epoch 0
    assert 1 not in second._epochs and 2 in second._epochs  # epoch 1 resumed: not compared


def test_epoch_loss_rules():
    h = [EpochSteps(0, 200.0, 20.0, 100, 10), EpochSteps(1, 100.0, 10.0, 100, 10)]
    assert matching_reductions(2.0, h[0]) == ["mean", "batch_mean"]
    assert check_epoch_loss("l", [2.0, 1.0], h, ["mean"]) is None
    assert check_epoch_loss("l", [2.0, 3.0], h, ["mean"]).details["cause"] == "sum_not_reset"
    drift = check_epoch_loss("l", [2.0, 2.5], h, ["mean"])  # rose while the steps fell
    assert drift.details["cause"] == "drift" and "rose" in drift.message
    assert check_epoch_loss("l", [2.0, 0.7], h, ["mean"]) is None  # fell with them
    assert check_epoch_loss("l", [2.0, 0.5], h, ["mean"]).details["cause"] == "count_not_reset"
    assert epoch_loss_names(["loss", "val_loss", "train_loss_step", "g_loss", "test/loss"]) == [
        "loss", "g_loss"]


# -- target leak ------------------------------------------------------------------------------
VOCAB, SEQ = 16, 12


def _sequences(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)


class _LossFit(pl.LightningModule):
    """Trains on ``self._loss(batch)`` with Adam at ``LR``, logging the epoch train loss and the
    validation loss (the leak rules read both)."""

    LR = 1e-2

    def _loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.LR)


class TinyLM(_LossFit):
    """A GRU language model on ``(inputs, targets)`` batches."""

    LR = 2e-2

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.out = nn.Linear(32, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.embed(x))[0])

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())


def _lm_fit(tmp_path: Path, pair: Any, train: torch.Tensor, val: torch.Tensor,
            epochs: int = 2) -> TrainingInvariants:
    cb = TrainingInvariants()
    t = trainer(tmp_path, [cb], max_epochs=epochs, logger=False)
    t.fit(TinyLM(), DataLoader(TensorDataset(*pair(train)), batch_size=32, shuffle=True),
          DataLoader(TensorDataset(*pair(val)), batch_size=64))
    return cb


def test_a_shifted_input_that_holds_the_target_is_a_leak(tmp_path):
    torch.manual_seed(0)
    cb = _lm_fit(tmp_path, lambda s: (s[:, 1:], s[:, 1:]), _sequences(640, 0), _sequences(128, 1))
    f = only(cb, "invariants.target_leak")
    assert f.details["lag"] == 0 and f.details["source"] == "val_loss"
    assert f.value < 0.05 and f.epoch == 0 and "x[:, :-1]" in f.advice


def test_random_sequences_learned_honestly_are_no_leak(tmp_path):
    torch.manual_seed(0)
    cb = _lm_fit(tmp_path, lambda s: (s[:, :-1], s[:, 1:]), _sequences(640, 0),
                 _sequences(128, 1))
    assert problems(cb) == set()


def test_a_memorizable_dataset_learned_to_zero_loss_is_no_leak(tmp_path):
    # 4 sequences repeated: the model learns them by heart, the validation is the same 4
    torch.manual_seed(0)
    seqs = _sequences(4, 0).repeat(160, 1)
    cb = _lm_fit(tmp_path, lambda s: (s[:, :-1], s[:, 1:]), seqs, seqs[:64], epochs=3)
    assert problems(cb) == set()
    assert "target_leak" in only(cb, "invariants.summary").details["stepped_aside"]


class HFStyleLM(TinyLM):
    """Hugging Face's causal-LM convention: ``labels`` is a copy of ``input_ids`` and the model
    shifts inside (position t predicts label t + 1)."""

    def _loss(self, batch: Any) -> torch.Tensor:
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, seqs: torch.Tensor) -> None:
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.seqs[i], "labels": self.seqs[i].clone()}


def test_hugging_face_labels_equal_to_the_inputs_are_no_leak(tmp_path):
    torch.manual_seed(0)
    seqs = _sequences(4, 0).repeat(160, 1)  # memorized: the loss collapses, honestly
    cb = TrainingInvariants()
    t = trainer(tmp_path, [cb], max_epochs=2, logger=False)
    t.fit(HFStyleLM(), DataLoader(_Dicts(seqs), batch_size=32, shuffle=True),
          DataLoader(_Dicts(seqs[:64]), batch_size=64))
    assert problems(cb) == set()
    assert cb._leak.evidence[("input_ids", 1, None)].share < 0.5
    # lag 0 holds every label, but the data allows the collapse: 4 sequences known by heart
    same = cb._leak.evidence[("input_ids", 0, None)]
    assert same.share == 1.0 and same.shifted_inside
    assert same.next_token_floor() < 0.05


class ScoredOnItsOwnToken(HFStyleLM):
    """Hugging Face's batches, but the loss never shifts: position t is scored on label t,
    the token it reads (issue 20's off-by-one, whether or not a model would shift)."""

    def _loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"]).flatten(0, 1),
                               batch["labels"].flatten())


def _markov(n: int, seed: int, successors: int = 3) -> torch.Tensor:
    """Sequences of a Markov chain where each token has ``successors`` equally likely next
    tokens: next-token prediction cannot go below log(successors) nats."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, VOCAB, (VOCAB, successors), generator=torch.Generator().manual_seed(9))
    seqs = torch.zeros(n, SEQ + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ + 1):
        pick = torch.randint(0, successors, (n,), generator=g)
        seqs[:, t] = succ[seqs[:, t - 1], pick]
    return seqs


@pytest.mark.parametrize("model,leak", [(ScoredOnItsOwnToken, True), (HFStyleLM, False)])
def test_labels_equal_to_the_inputs_leak_when_the_loss_beats_next_token_prediction(
        tmp_path, model, leak):
    torch.manual_seed(0)
    cb = TrainingInvariants()
    t = trainer(tmp_path, [cb], max_epochs=2, logger=False)
    t.fit(model(), DataLoader(_Dicts(_markov(640, 0)), batch_size=32, shuffle=True),
          DataLoader(_Dicts(_markov(128, 1)), batch_size=64))
    same = cb._leak.evidence[("input_ids", 0, None)]
    floor = same.next_token_floor()
    assert same.shifted_inside and 0.1 < floor < math.log(3)  # a sample: below the entropy
    if leak:
        f = only(cb, "invariants.target_leak")
        assert f.details["next_token_floor"] == floor and f.details["loss"] < 0.5 * floor
        assert "`labels[:, 1:]`" in f.advice and "Hugging Face" in f.message
    else:
        assert problems(cb) == set()


WINDOW = 8


class WindowRegressor(_LossFit):
    """An MLP forecasting a float series from a window of it (or regressing a target from
    features), MSE."""

    def __init__(self, width: int = WINDOW) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(width, 32), nn.Tanh(), nn.Linear(32, 1))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y)


def _windows(series: torch.Tensor, late: bool) -> TensorDataset:
    """Windows of ``series`` with the value after each; ``late``: the windows start one step
    late and end with their own target (issue 20's "fed x[t + 1]")."""
    n = len(series) - WINDOW - 1
    first = torch.arange(n) + int(late)
    x = series[first[:, None] + torch.arange(WINDOW)]
    return TensorDataset(x[..., None], series[torch.arange(n) + WINDOW])


def _window_fit(tmp_path: Path, series: torch.Tensor, late: bool) -> TrainingInvariants:
    cb = TrainingInvariants()
    t = trainer(tmp_path, [cb], max_epochs=3, logger=False)
    t.fit(WindowRegressor(), DataLoader(_windows(series[:600], late), batch_size=32,
                                        shuffle=True),
          DataLoader(_windows(series[600:], late), batch_size=64))
    return cb


def _noisy_series(n: int = 760) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(n, dtype=torch.float32)
    return torch.sin(0.3 * t) + 0.5 * torch.sin(0.07 * t) + 0.2 * torch.randn(n, generator=g)


def test_a_window_that_ends_with_its_target_is_a_leak(tmp_path):
    torch.manual_seed(0)
    cb = _window_fit(tmp_path, _noisy_series(), late=True)
    f = only(cb, "invariants.target_leak")
    assert f.details["position"] == [WINDOW - 1, 0] and f.details["share"] == 1.0
    assert f.value < 0.05 and "series[i + w]" in f.advice


def test_honest_and_periodic_windows_are_no_leak(tmp_path):
    torch.manual_seed(0)
    assert problems(_window_fit(tmp_path, _noisy_series(), late=False)) == set()
    # a clean series of period 4: each window holds its target's value one period back, and
    # the loss collapses honestly; the window's own repetition explains the match
    periodic = torch.tensor([0.0, 1.0, 3.0, 2.0]).repeat(190)
    cb = _window_fit(tmp_path, periodic, late=False)
    assert problems(cb) == set()
    (e,) = cb._leak.evidence.values()
    assert e.position == (WINDOW - 4, 0) and e.share == 1.0 and e.chance == 1.0


def test_a_feature_that_is_the_target_is_a_leak(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(760, 6, generator=g)
    y = x[:, :5].sum(1) / 5**0.5 + 0.5 * torch.randn(760, generator=g)
    x[:, 3] = y  # the target left among the features
    torch.manual_seed(0)
    cb = TrainingInvariants()
    t = trainer(tmp_path, [cb], max_epochs=3, logger=False)
    t.fit(WindowRegressor(6), DataLoader(TensorDataset(x[:600], y[:600]), batch_size=32),
          DataLoader(TensorDataset(x[600:], y[600:]), batch_size=64))
    assert only(cb, "invariants.target_leak").details["position"] == [3]


def test_leak_rules():
    seq = torch.arange(26).reshape(2, 13) % VOCAB
    assert target_matches(seq[:, 1:], seq[:, 1:], 0) == (24, 24)
    assert target_matches(seq[:, :-1], seq[:, 1:], 1) == (0, 22)
    labels = seq.clone()
    labels[:, :3] = -100
    assert target_matches(seq, labels, 0) == (20, 20)  # ignored positions skipped
    # Hugging Face's causal-LM batches: labels == input_ids is the honest pairing when the
    # model shifts inside, a leak only with a loss below half the data's next-token floor
    hf = leak_counts({"input_ids": seq, "labels": seq.clone()})
    assert [(e.lag, e.shifted_inside) for e in hf] == [(0, True), (1, False)]
    assert hf[0].next_token_floor() == 0.0  # two distinct sequences: known by heart
    assert check_target_leak(hf[0], 2.0, 1e-4, "val_loss", 0, 0.05) is None
    forks = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 5, 7]])  # every label: 50/50
    (fork,) = [e for e in leak_counts({"input_ids": forks, "labels": forks.clone()})
               if e.lag == 0]
    assert fork.next_token_floor() == pytest.approx(math.log(2))
    assert check_target_leak(fork, 2.0, 0.1, "val_loss", 0, 0.05) is not None  # 0.1 < 0.35
    assert check_target_leak(fork, 2.0, 0.4, "val_loss", 0, 0.5) is None  # 0.4 > 0.35
    # judged by its own bound, not by how early the loss fell (15% of the initial loss)
    assert check_target_leak(fork, 2.0, 0.3, "val_loss", 7, 0.05) is not None
    watch = LeakWatch()
    watch.add({"input_ids": forks, "labels": forks.clone()})
    watch.add((seq[:, 1:], seq[:, 1:]))
    assert [e.shifted_inside for e in watch.strong()] == [True, False]
    assert [e.shifted_inside for e in watch.strong(early=False)] == [True]
    features = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    watch.add((features, features[:, 2].clone()))  # a float feature that is the target
    assert [e.position for e in watch.strong(early=False)] == [None, (2,)]
    assert watch.judge(2.0, 0.05, "val_loss", 7, 0.05, early=False).details["input"] == (
        "input_ids")
    # a float input holding a scalar float target, within float rounding
    x = torch.randn(16, 5, 2, generator=torch.Generator().manual_seed(0))
    y = x[:, 3, 1].double() * (1 + 1e-8)  # a float64 target, its float32 copy in the input
    assert float_position(x, y) == (7, 16, 16)  # step 3, channel 1
    assert float_position(x, y * (1 + 1e-6)) is None  # beyond float32's rounding
    (e,) = leak_counts((x, y))
    assert e.position == (3, 1) and e.chance == 1 / 16  # 16 distinct values
    assert repeat_share(x, 7) == 0.0  # the window does not repeat itself at distance 2
    assert leak_counts((x, x.clone())) == []  # a target per sample that is not a scalar
    # the entropy of each label given its prefix, reference values
    keys = prefix_keys(torch.tensor([[4, 4], [4, 9], [7, 4]]))
    assert keys[0, 0] == keys[1, 0] != keys[2, 0] and len(set(keys[:, 1].tolist())) == 3
    assert conditional_entropy(torch.tensor([0, 0, 0, 1]), torch.tensor([1, 2, 3, 1])) == (
        pytest.approx(3 * math.log(3) / 4))
    # a float image and an integer label: nothing to compare
    assert leak_counts((torch.zeros(4, 1, 8, 8), torch.arange(4))) == []
    assert collision_rate(torch.tensor([1, 1, 2, 2])) == 0.5
    e = LeakEvidence("batch[0]", 0, 100, 100, 0.1)
    assert check_target_leak(e, 2.0, 0.2, "val_loss", 0, 0.05) is None
    assert check_target_leak(None, 2.0, 0.0, "val_loss", 0, 0.05) is None


# -- the maths ---------------------------------------------------------------------------------
def test_moved_and_movable_reference_values():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    assert moved(w, [torch.tensor([1.0, 2.0 + 2.4e-7]), torch.tensor([3.0])]).tolist() == [
        True, False]
    # SGD with lr 1e-3 and |g| = 1 moves 1.0 by 1e-3 (resolution 1.2e-7): movable; lr 1e-8 not
    g = [torch.ones(2), torch.ones(1)]
    assert movable(w, g, [1e-3, 1e-8]).tolist() == [True, False]
    assert movable([torch.zeros(1)], [torch.ones(1)], [1e-30]).tolist() == [True]
    assert movable([torch.ones(1, dtype=torch.bfloat16)], [torch.ones(1)], [1e-3]).tolist() == [
        False]  # bf16 resolves 7.8e-3 at 1.0


def test_carried_over_reference_values():
    g = torch.tensor([1.0, -2.0, 0.5])
    assert carried_over(g, g) and carried_over(0.25 * g, g)
    assert not carried_over(2.0 * g, g)  # larger than the old gradient: something was added
    assert not carried_over(g + torch.tensor([0.0, 0.0, 1e-2]), g)


# -- everything together ----------------------------------------------------------------------
def test_bad_arguments_are_refused():
    for kwargs, error in [({"every_n_steps": 0}, ValueError), ({"patience": 1.5}, TypeError),
                          ({"percent_metrics": "val_acc"}, TypeError),
                          ({"percent_metrics": [""]}, ValueError),
                          ({"leak_fraction": 1.0}, ValueError),
                          ({"disable": ["zero_grad"]}, ValueError), ({"disable": [3]}, TypeError)]:
        with pytest.raises(error):
            TrainingInvariants(**kwargs)
    assert set(CHECKS) == {c.split(".")[1] for c in (
        "invariants.grad_not_zeroed", "invariants.param_not_in_optimizer",
        "invariants.param_not_updated", "invariants.eval_mode_in_training",
        "invariants.metric_out_of_range", "invariants.epoch_loss_inconsistent",
        "invariants.target_leak")}


def test_disabled_checks_do_not_run(tmp_path):
    cb = fit(tmp_path, Manual(zero=None), TrainingInvariants(disable=["grad_not_zeroed"]),
             epochs=1)
    assert problems(cb) == set() and not cb._optim.watches.get(0)
    assert only(cb, "invariants.summary").details["stepped_aside"]["grad_not_zeroed"] == (
        "disabled (`disable=`)")


def test_main_run_is_bit_identical(tmp_path):
    def run(cbs: list[pl.Callback], model: Any, kw: dict[str, Any]) -> list[torch.Tensor]:
        pl.seed_everything(0)
        net = model()
        t = trainer(tmp_path, cbs, max_epochs=2, deterministic=True, logger=False, **kw)
        t.fit(net, loader(digits(128), batch_size=16), loader(digits(32), shuffle=False))
        return [p.detach().clone() for p in net.parameters()]

    for model, kw in ((lambda: Classifier(cnn(), lr=1e-2), {"accumulate_grad_batches": 2}),
                      (lambda: Manual("after"), {})):
        plain = run([], model, kw)
        watched = run([TrainingInvariants(every_n_steps=1)], model, kw)
        assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def test_findings_reach_the_table_and_no_tag_of_its_own(tmp_path):
    cb = TrainingInvariants()
    t = trainer(tmp_path, [cb], max_epochs=1)
    t.fit(Manual(zero=None), loader(digits(96)))
    acc = events(t.logger.log_dir)
    assert acc.Tags()["scalars"] == ["train_loss"] or "train_loss" in acc.Tags()["scalars"]
    assert not [tag for tag in acc.Tags()["scalars"] if "invariants" in tag]
    assert "invariants.grad_not_zeroed" in text_events(acc, "0_findings/table")[-1]
    assert len(cb.hooks) == 0


# -- across model families ---------------------------------------------------------------------
def _drop_last_param(family: Family) -> None:
    module = family.module
    params = list(module.parameters())[:-1]
    module.configure_optimizers = lambda: torch.optim.Adam(params, lr=1e-3)  # type: ignore


def _no_zero_grad(family: Family) -> None:
    family.module.optimizer_zero_grad = lambda *a, **k: None  # type: ignore[method-assign]


def _forgetful(family: Family) -> None:
    module = family.module
    module.configure_optimizers = lambda: Forgetful(module.parameters(), lr=1e-3)  # type: ignore


PLANTED = {"param_not_in_optimizer": _drop_last_param, "grad_not_zeroed": _no_zero_grad,
           "param_not_updated": _forgetful}


def _family_fit(tmp_path: Path, family: Family, epochs: int = 2) -> TrainingInvariants:
    cb = TrainingInvariants(every_n_steps=2)
    t = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, limit_train_batches=6, limit_val_batches=3,
                   num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                   **family.trainer_kwargs)
    t.fit(family.module, family.train, family.val)
    assert len(cb.hooks) == 0
    return cb


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, *PLANTED])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_healthy_and_planted(tmp_path, name, bug):
    torch.manual_seed(0)
    family = FAMILIES[name]()
    if bug is not None:
        PLANTED[bug](family)
    cb = _family_fit(tmp_path, family)
    assert problems(cb) == (set() if bug is None else {f"invariants.{bug}"})


SHARED = Shared(
    TrainingInvariants,
    run={"every_n_steps": 2},
    guard={"every_n_steps": 1},
    bad=[("every_n_steps", 0, V), ("every_n_steps", 2.0, T), ("patience", True, T),
         ("patience", 0, V), ("percent_metrics", "val_acc", T), ("percent_metrics", [""], V),
         ("percent_metrics", [3], T), ("leak_fraction", 0.0, V), ("leak_fraction", 1.0, V),
         ("leak_fraction", "0.05", T), ("disable", ["zero_grad"], V),
         ("disable", "target_leak", T), ("disable", [None], T), ("strict", "no", T)],
    state=(lambda d: (TrainingInvariants(patience=2), TrainingInvariants(patience=3)),
           lambda cb: cb._optim.streaks,
           lambda cb: cb._optim.streaks.setdefault("optimizer 0 (Adam)", {})
           .update({"net.1.weight": 1})),
)

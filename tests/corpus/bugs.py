"""The planted-bug corpus: the silent bugs of issue 20 and the recipe's, one at a time.

Each bug is a small edit of a healthy program of :mod:`tests.corpus.healthy` (the same model,
data and run, with the one mistake people make), with the finding code(s) it must be flagged
with: a bug is caught when at least one of its codes is raised at WARN or FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.corpus.data import gaussian_classes, loader, split
from tests.corpus.healthy import (
    LM_VOCAB,
    Classifier,
    Forecaster,
    TinyLM,
    _argmax_accuracy,
    _lm_data,
    _mlp,
    forecast_data,
)
from tests.corpus.runner import Program

Tensor = torch.Tensor


@dataclass
class Bug:
    """A planted bug: the program that carries it and the codes that flag it."""

    program: Program
    #: Any one of these at WARN or FAIL catches the bug.
    codes: tuple[str, ...]
    #: Where the bug comes from: ``"issue 20"`` (the silent bugs users hit) or ``"recipe"``.
    source: str

    @property
    def name(self) -> str:
        return self.program.name


def _classes(n: int = 512, n_train: int = 384, **kw: Any) -> tuple[DataLoader, DataLoader]:
    return split(gaussian_classes(n, **kw), n_train)


def _bug(name: str, about: str, module: Any, codes: tuple[str, ...], source: str = "recipe",
         data: Any = _classes, **kw: Any) -> Bug:
    return Bug(Program(name, "bug", about, module, data, **kw), codes, source)


# --- the silent bugs of issue 20 -----------------------------------------------------------
class NoZeroGrad(Classifier):
    """Manual optimization without ``optimizer.zero_grad()``: gradients pile up across steps."""

    def __init__(self) -> None:
        super().__init__(_mlp(16, 32, 4))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)  # BUG: no opt.zero_grad() before (or after) the step
        opt.step()  # type: ignore[union-attr]
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


class ShiftedLM(TinyLM):
    """The next-token loss without the shift: position t is scored on token t, which it reads
    (the model sees its own target)."""

    def loss_of(self, out: Tensor, batch: dict[str, Tensor]) -> Tensor:
        # BUG: labels[:, :-1] where labels[:, 1:] was meant (off by one)
        return F.cross_entropy(out[:, :-1].reshape(-1, LM_VOCAB),
                               batch["labels"][:, :-1].reshape(-1), ignore_index=-100)


class AccuracyAboveOne(Classifier):
    """Accuracy divided by a hard-coded batch size of 8 on batches of 32: up to 4."""

    def accuracy(self, out: Tensor, batch: Any) -> Tensor:
        return (out.argmax(1) == batch[1]).float().sum() / 8  # BUG: len(batch) was meant


class RunningSum(Classifier):
    """An epoch loss kept by hand as a running sum that is never reset: the logged epoch loss
    rises while every step loss falls."""

    def __init__(self) -> None:
        super().__init__(_mlp(16, 32, 4))
        self.loss_sum = 0.0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.loss_sum += loss.item()
        return loss

    def on_train_epoch_end(self) -> None:
        # BUG: self.loss_sum is never set back to 0
        self.log("train_loss", self.loss_sum / self.trainer.num_training_batches)


# --- data bugs ------------------------------------------------------------------------------
def _with_duplicates() -> tuple[DataLoader, DataLoader]:
    x, y = gaussian_classes(512).tensors
    idx = torch.cat([torch.arange(384), torch.arange(0, 384, 6)])  # 64 copies
    return loader(TensorDataset(x[idx], y[idx])), loader(TensorDataset(x[384:], y[384:]), 64,
                                                         shuffle=False)


def _with_leak() -> tuple[DataLoader, DataLoader]:
    x, y = gaussian_classes(512).tensors
    val = torch.cat([torch.arange(384, 480), torch.arange(0, 32)])  # 32 training samples
    return loader(TensorDataset(x[:384], y[:384])), loader(TensorDataset(x[val], y[val]), 64,
                                                           shuffle=False)


def _with_conflicts() -> tuple[DataLoader, DataLoader]:
    x, y = gaussian_classes(512).tensors
    idx = torch.arange(0, 384, 8)  # 48 samples again, with another label
    xs, ys = torch.cat([x[:384], x[idx]]), torch.cat([y[:384], (y[idx] + 1) % 4])
    return loader(TensorDataset(xs, ys)), loader(TensorDataset(x[384:], y[384:]), 64,
                                                 shuffle=False)


def _one_based() -> tuple[DataLoader, DataLoader]:
    x, y = gaussian_classes(512).tensors
    return split(TensorDataset(x, y + 1), 384)  # BUG: labels 1..4 for a 4-way output


class BinaryModel(Classifier):
    def __init__(self) -> None:
        super().__init__(_mlp(16, 32, 1, nn.Tanh))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.binary_cross_entropy_with_logits(out, batch[1].float())

    def accuracy(self, out: Tensor, batch: Any) -> Tensor:
        return ((out > 0).long() == batch[1]).float().mean()


def _binary_with_label_2() -> tuple[DataLoader, DataLoader]:
    x, y = gaussian_classes(512, classes=2).tensors
    y = y.clone()
    y[torch.arange(0, 512, 10)] = 2  # BUG: "unknown" coded as 2 in a 0/1 label column
    return split(TensorDataset(x, y), 384)


def _shuffled_apart() -> tuple[DataLoader, DataLoader]:
    x, y = gaussian_classes(512).tensors
    g = torch.Generator().manual_seed(1)
    # BUG: features and labels shuffled with two different permutations
    x, y = x[torch.randperm(512, generator=g)], y[torch.randperm(512, generator=g)]
    return split(TensorDataset(x, y), 384)


# --- implementation bugs ------------------------------------------------------------------
class WrongSwishFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)  # BUG: the x * s * (1 - s) term is missing


class WrongSwish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return WrongSwishFn.apply(x)


class ScaledLastLayer(Classifier):
    def __init__(self) -> None:
        super().__init__(_mlp(16, 32, 4))
        with torch.no_grad():
            self.net[-1].weight.mul_(30.0)  # BUG: a last layer initialized 30x too large


class SoftmaxBeforeCE(Classifier):
    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(out.softmax(1), batch[1])  # BUG: cross_entropy applies it again


class DeadReLU(Classifier):
    def __init__(self) -> None:
        super().__init__(_mlp(16, 32, 4))
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                layer.bias.fill_(-3.0)  # BUG: a bias init that switches every ReLU off


class HeadNotOptimized(Classifier):
    def __init__(self) -> None:
        super().__init__(nn.Linear(32, 4))
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.body(x))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.body.parameters(), lr=self.lr)  # BUG: the head is left out


class ZeroLRGroup(HeadNotOptimized):
    def configure_optimizers(self) -> Any:
        # BUG: the body's rate from a setting nobody set: 0, so it never moves
        body_lr = getattr(self.hparams, "body_lr", 0.0)
        return torch.optim.Adam([{"params": self.body.parameters(), "lr": body_lr},
                                 {"params": self.net.parameters()}], lr=self.lr)


class EvalInTraining(Classifier):
    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                       nn.Dropout(0.3), nn.Linear(32, 4)))

    def batch_accuracy(self, batch: Any) -> Tensor:
        self.eval()  # BUG: never set back with self.train()
        with torch.no_grad():
            return _argmax_accuracy(self(batch[0]), batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", self.batch_accuracy(batch), on_step=False, on_epoch=True)
        return loss


def _classifier(lr: float) -> Classifier:
    return Classifier(_mlp(16, 32, 4), lr=lr)


BUG_LIST = [
    # issue 20: the silent bugs a new user hit
    _bug("no_zero_grad", "manual optimization without optimizer.zero_grad()", NoZeroGrad,
         ("invariants.grad_not_zeroed",), "issue 20"),
    _bug("target_leak_shift", "language model scored on the token it reads (labels not "
         "shifted: position t predicts x[t], fed x[t])", ShiftedLM, ("invariants.target_leak",),
         "issue 20", data=_lm_data),
    _bug("forecast_window_leak", "GRU forecaster whose input windows start one step late: "
         "each ends with its own target (fed x[t+1])", Forecaster, ("invariants.target_leak",),
         "issue 20", data=lambda: forecast_data(leak=True)),
    _bug("accuracy_above_one", "accuracy = correct / 8 on batches of 32 (logged up to 4)",
         lambda: AccuracyAboveOne(_mlp(16, 32, 4)), ("invariants.metric_out_of_range",),
         "issue 20"),
    _bug("running_sum_epoch_loss", "epoch loss logged from a running sum never reset (rises "
         "while the step losses fall)", RunningSum, ("invariants.epoch_loss_inconsistent",),
         "issue 20"),
    # the recipe's: data (step 1)
    _bug("duplicates", "64 of 448 training samples are copies", lambda: _classifier(3e-3),
         ("data.exact_duplicate",), data=_with_duplicates),
    _bug("train_val_leak", "32 of 128 validation samples are training samples",
         lambda: _classifier(3e-3), ("data.leakage",), data=_with_leak),
    _bug("conflicting_labels", "48 training inputs appear twice with two labels (corrupted "
         "labels)", lambda: _classifier(3e-3), ("data.conflicting_labels",),
         data=_with_conflicts),
    _bug("label_out_of_range", "labels 1..4 for a 4-way output (one-based; the run crashes at "
         "the first label 4)", lambda: _classifier(3e-3), ("data.label_out_of_range",),
         data=_one_based),
    _bug("binary_label_2", "a 0/1 label column with 'unknown' coded as 2, BCE-with-logits "
         "(silent: no crash)", BinaryModel, ("data.label_out_of_range",),
         data=_binary_with_label_2),
    _bug("shuffled_apart", "features and labels shuffled with two permutations: nothing to "
         "learn", lambda: _classifier(3e-3),
         ("advisor.underfit", "advisor.plateau", "overfit.not_reached", "advisor.stalled"),
         data=_shuffled_apart),
    # the implementation (steps 2-4)
    _bug("wrong_backward", "custom autograd Function (swish) whose backward misses a term",
         lambda: Classifier(_mlp(16, 32, 4, WrongSwish)), ("gradient_check.mismatch",)),
    _bug("scaled_last_layer", "last layer initialized 30x too large", ScaledLastLayer,
         ("initial_loss.mismatch",)),
    _bug("softmax_before_ce", "softmax applied before F.cross_entropy",
         lambda: SoftmaxBeforeCE(_mlp(16, 32, 4)), ("overfit.not_reached",
                                                    "initial_loss.mismatch")),
    # hyperparameters and initialization (step 5)
    _bug("lr_too_high", "Adam at lr 1.0", lambda: _classifier(1.0),
         ("update_ratio.too_high", "advisor.divergence")),
    _bug("lr_too_low", "Adam at lr 1e-7", lambda: _classifier(1e-7), ("update_ratio.too_low",)),
    _bug("dead_relu_init", "hidden biases initialized to -3: every ReLU is off",
         DeadReLU, ("activations.dead_units",)),
    # the training loop (issue 20.5's invariants)
    _bug("param_not_in_optimizer", "the optimizer holds the body's parameters, not the head's",
         HeadNotOptimized, ("invariants.param_not_in_optimizer",)),
    _bug("param_not_updated", "the body's parameter group has lr 0 (a setting nobody set)",
         ZeroLRGroup, ("invariants.param_not_updated", "update_ratio.zero_updates")),
    _bug("eval_mode_in_training", "training_step calls self.eval() (in an accuracy helper) "
         "and never self.train()", EvalInTraining, ("invariants.eval_mode_in_training",)),
]
#: Every planted bug by name.
BUGS: dict[str, Bug] = {b.name: b for b in BUG_LIST}

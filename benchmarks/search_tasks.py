"""Small search tasks for the guided-search benchmark and the pruning corpus (issue 24).

Each task is a model factory (``factory(lr=..., weight_decay=...)``, as the search takes) and a
datamodule on synthetic data generated once per process, so that a trial's fixed cost is the
library's and Lightning's, not the data's. The tasks differ where a pruning rule could be
fooled: the optimizer (SGD, SGD with momentum, Adam, AdamW), the learning-rate schedule (none,
linear warm-up, one-cycle, cosine, warm-up then cosine, all stepped every batch over the
trial's ``max_epochs``) and the architecture (a tanh or ReLU MLP, a CNN, a GRU).

- ``blobs``: 5 Gaussian classes in 20 dimensions that overlap (best accuracy ~0.8), 2000
  training samples.
- ``bars``: 12x12 images of a bar in one of 4 orientations at a random place, in noise.
- ``waves``: sequences of 24 steps of a noisy sine of one of 4 frequencies, random phase.
- ``digits``: scikit-learn's digits (the library's example data), cached once.

Example:
    >>> task = TASKS["blobs-tanh-sgdm"]
    >>> model = task.factory(lr=0.1, weight_decay=0.0)
    >>> type(model).__name__, task.arch, task.optimizer, task.schedule
    ('TaskModule', 'tanh_mlp', 'sgdm', 'none')
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TASKS", "Task", "TaskData", "TaskModule"]


@functools.cache
def _blobs() -> tuple[TensorDataset, TensorDataset, int, tuple[int, ...]]:
    gen = torch.Generator().manual_seed(1234)
    means = torch.randn(5, 20, generator=gen) * 0.55
    labels = torch.randint(0, 5, (2500,), generator=gen)
    x = means[labels] + torch.randn(2500, 20, generator=gen)
    return (TensorDataset(x[:2000], labels[:2000]), TensorDataset(x[2000:], labels[2000:]), 5,
            (20,))


@functools.cache
def _bars() -> tuple[TensorDataset, TensorDataset, int, tuple[int, ...]]:
    gen = torch.Generator().manual_seed(1234)
    n, size = 1500, 12
    labels = torch.randint(0, 4, (n,), generator=gen)
    pos = torch.randint(2, size - 2, (n,), generator=gen)
    images = torch.randn(n, 1, size, size, generator=gen) * 0.8
    idx = torch.arange(size)
    for i in range(n):
        p, k = int(pos[i]), int(labels[i])
        if k == 0:
            images[i, 0, p, :] += 1.0
        elif k == 1:
            images[i, 0, :, p] += 1.0
        else:  # a diagonal or an anti-diagonal, shifted by p
            shift = p - size // 2
            cols = idx + shift if k == 2 else size - 1 - idx + shift
            keep = (cols >= 0) & (cols < size)
            images[i, 0, idx[keep], cols[keep]] += 1.0
    return (TensorDataset(images[:1200], labels[:1200]),
            TensorDataset(images[1200:], labels[1200:]), 4, (1, size, size))


@functools.cache
def _waves() -> tuple[TensorDataset, TensorDataset, int, tuple[int, ...]]:
    gen = torch.Generator().manual_seed(1234)
    n, steps = 1500, 24
    labels = torch.randint(0, 4, (n,), generator=gen)
    freq = (0.25 + 0.12 * labels.float()).unsqueeze(1)
    phase = torch.rand(n, 1, generator=gen) * 2 * math.pi
    t = torch.arange(steps).float().unsqueeze(0)
    x = torch.sin(freq * t + phase) + torch.randn(n, steps, generator=gen) * 0.9
    x = x.unsqueeze(-1)
    return (TensorDataset(x[:1200], labels[:1200]), TensorDataset(x[1200:], labels[1200:]), 4,
            (steps, 1))


@functools.cache
def _digits() -> tuple[TensorDataset, TensorDataset, int, tuple[int, ...]]:
    from lightning_diag.examples.digits import load_digits_tensors

    images, labels = load_digits_tensors()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    return (TensorDataset(images[order[:cut]], labels[order[:cut]]),
            TensorDataset(images[order[cut:]], labels[order[cut:]]), 10, (1, 8, 8))


DATA = {"blobs": _blobs, "bars": _bars, "waves": _waves, "digits": _digits}


class TaskData(pl.LightningDataModule):
    """One task's cached tensors; the training order depends on ``seed`` only."""

    def __init__(self, data: str, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DATA[self.data]()[0], batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(DATA[self.data]()[1], batch_size=256)


class _GRU(nn.Module):
    def __init__(self, classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def make_net(arch: str, classes: int, shape: tuple[int, ...]) -> nn.Module:
    """A small network of ``arch`` for inputs of ``shape`` (without the batch dimension)."""
    flat = math.prod(shape)
    if arch in ("tanh_mlp", "relu_mlp"):
        act = nn.Tanh if arch == "tanh_mlp" else nn.ReLU
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, 64), act(), nn.Linear(64, 64), act(),
                             nn.Linear(64, classes))
    if arch == "cnn":
        side = shape[-1] // 2
        return nn.Sequential(nn.Conv2d(shape[0], 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(16 * side * side, 32), nn.ReLU(),
                             nn.Linear(32, classes))
    if arch == "gru":
        return _GRU(classes)
    raise ValueError(f"unknown arch {arch!r}")


def _schedule(name: str, optimizer: torch.optim.Optimizer, total: int) -> Any:
    """A per-step scheduler: ``none``, ``warmup`` (linear from 0 over the first 10% of the
    steps, then constant), ``onecycle``, ``cosine`` or ``warmup_cosine``."""
    warm = max(1, total // 10)
    if name == "warmup":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, s / warm))
    if name == "warmup_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
            s / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))))
    if name == "onecycle":
        lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    raise ValueError(f"unknown schedule {name!r}")


class TaskModule(pl.LightningModule):
    """A classifier of one task: logs ``train_loss``, ``val_loss`` and ``val_acc``."""

    def __init__(self, data: str, arch: str, optimizer: str, schedule: str, lr: float,
                 weight_decay: float) -> None:
        super().__init__()
        _, _, classes, shape = DATA[data]()
        self.net = make_net(arch, classes, shape)
        self.optimizer, self.schedule = optimizer, schedule
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        params, kw = self.parameters(), {"lr": self.lr, "weight_decay": self.weight_decay}
        opt: torch.optim.Optimizer
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, **kw)
        elif self.optimizer == "sgdm":
            opt = torch.optim.SGD(params, momentum=0.9, **kw)
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(params, **kw)
        elif self.optimizer == "adamw":
            opt = torch.optim.AdamW(params, **kw)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.schedule == "none":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": _schedule(self.schedule, opt, total), "interval": "step"}}


@dataclass(frozen=True)
class Task:
    """A search task: data, architecture, optimizer and schedule; ``clip`` for the GRU."""

    data: str
    arch: str
    optimizer: str
    schedule: str
    batch_size: int = 32
    clip: float | None = None

    def factory(self, lr: float, weight_decay: float) -> TaskModule:
        return TaskModule(self.data, self.arch, self.optimizer, self.schedule, lr, weight_decay)

    def datamodule(self, seed: int = 0) -> TaskData:
        return TaskData(self.data, self.batch_size, seed)

    def trainer_kwargs(self) -> dict[str, Any]:
        return {"gradient_clip_val": self.clip} if self.clip else {}


#: The corpus: every optimizer, schedule and architecture at least twice.
TASKS: dict[str, Task] = {
    "blobs-tanh-sgdm": Task("blobs", "tanh_mlp", "sgdm", "none"),  # the case of issue 24
    "blobs-tanh-sgd-cosine": Task("blobs", "tanh_mlp", "sgd", "cosine"),
    "blobs-relu-adam-warmup": Task("blobs", "relu_mlp", "adam", "warmup"),
    "bars-cnn-sgdm-onecycle": Task("bars", "cnn", "sgdm", "onecycle"),
    "bars-cnn-adamw-cosine": Task("bars", "cnn", "adamw", "cosine"),
    "bars-cnn-sgd-warmup": Task("bars", "cnn", "sgd", "warmup"),
    "waves-gru-adam-warmup_cosine": Task("waves", "gru", "adam", "warmup_cosine", clip=1.0),
    "waves-gru-sgdm": Task("waves", "gru", "sgdm", "none", clip=1.0),
    "waves-gru-adamw-onecycle": Task("waves", "gru", "adamw", "onecycle", clip=1.0),
    "digits-relu-adam": Task("digits", "relu_mlp", "adam", "none"),
    "digits-cnn-sgdm-warmup": Task("digits", "cnn", "sgdm", "warmup"),
}

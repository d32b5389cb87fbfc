"""The bundled example: scikit-learn's digits (real 8x8 images, shipped in its wheel) and two
small classifiers. Used by the demo, the tuning CLI's defaults, the docs and the tests.

Example:
    >>> from lightning_diag.examples.digits import DigitsDataModule, DigitsClassifier
    >>> dm = DigitsDataModule(batch_size=64)
    >>> model = DigitsClassifier(arch="mlp")
    >>> dm.setup("fit"); len(dm.train_set), len(dm.val_set)
    (1437, 360)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["DigitsClassifier", "DigitsDataModule", "load_digits_tensors", "make_digits_net"]

NUM_CLASSES = 10


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` float images in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # the demo extra is not installed
        raise ImportError(
            "The digits example needs scikit-learn: pip install 'lightning-diag[demo]'."
        ) from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


class DigitsDataModule(pl.LightningDataModule):
    """Digits split 80/20 into train and validation with a fixed permutation.

    Args:
        batch_size: Batch size of both loaders.
        flatten: Give ``(N, 64)`` vectors instead of ``(N, 1, 8, 8)`` images.
        seed: Seed of the split permutation and of the training loader's shuffling generator.
        num_workers: DataLoader workers.
    """

    def __init__(
        self, batch_size: int = 64, flatten: bool = False, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        self.batch_size = batch_size
        self.flatten = flatten
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset
        self.val_set: TensorDataset

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits_tensors()
        if self.flatten:
            images = images.flatten(1)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        cut = int(0.8 * len(labels))
        self.train_set = TensorDataset(images[order[:cut]], labels[order[:cut]])
        self.val_set = TensorDataset(images[order[cut:]], labels[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


def make_digits_net(arch: str = "cnn", width: int = 64, dropout: float = 0.1) -> nn.Module:
    """A small CNN (conv-BN-ReLU x2, max-pool, MLP head) or MLP for 8x8 digits."""
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(32 * 4 * 4, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES),
        )
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES),
        )
    raise ValueError(f"`arch` must be 'cnn' or 'mlp', got {arch!r}.")


class DigitsClassifier(pl.LightningModule):
    """A digits classifier that logs ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``.

    Args:
        arch: ``"cnn"`` or ``"mlp"``.
        lr: Learning rate.
        weight_decay: Optimizer weight decay.
        optimizer: ``"adam"`` or ``"sgd"`` (SGD uses momentum 0.9).
        width: Hidden width of the head.
        dropout: Dropout probability.
    """

    def __init__(
        self,
        arch: str = "cnn",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        width: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {optimizer!r}.")
        if not lr > 0:
            raise ValueError(f"`lr` must be positive, got {lr!r}.")
        self.save_hyperparameters()
        self.net = make_digits_net(arch, width, dropout)
        self.train_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp["optimizer"] == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp["lr"], momentum=0.9,
                                   weight_decay=hp["weight_decay"])
        return torch.optim.Adam(self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])

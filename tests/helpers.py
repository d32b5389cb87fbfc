"""Shared test fixtures: tiny data, tiny models, trainers and TensorBoard read-back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.examples.digits import load_digits_tensors

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits(n: int = 512, flatten: bool = False) -> TensorDataset:
    """The first ``n`` digits as a TensorDataset (cached)."""
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = load_digits_tensors()
    x, y = _DIGITS
    x = x[:n].flatten(1) if flatten else x[:n]
    return TensorDataset(x.clone(), y[:n].clone())


def loader(dataset: Any, batch_size: int = 32, shuffle: bool = True, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


class Classifier(pl.LightningModule):
    """A small classifier with switchable parts, for healthy and broken cases.

    Args:
        net: The network mapping inputs to logits.
        lr: Learning rate. optimizer: "adam" or "sgd" (momentum 0.9).
        weight_decay: Optimizer weight decay.
        softmax_before_ce: A classic bug: softmax applied before cross-entropy.
        reg_strength / reg_sign: an explicit L2 term ``reg_sign * reg_strength * sum(w**2)``.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, softmax_before_ce: bool = False,
                 reg_strength: float = 0.0, reg_sign: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.softmax_before_ce = softmax_before_ce
        self.reg_strength = reg_strength
        self.reg_sign = reg_sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.softmax_before_ce:
            logits = logits.softmax(dim=1)
        loss = F.cross_entropy(logits, y)
        if self.reg_strength:
            l2 = sum((p**2).sum() for p in self.parameters())
            loss = loss + self.reg_sign * self.reg_strength * l2
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9,
                                   weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def mlp(act: type[nn.Module] = nn.ReLU, width: int = 32, dropout: float = 0.0,
        in_features: int = 64, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width), act()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(width, width), act(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def cnn(act: type[nn.Module] = nn.ReLU, dropout: float = 0.1, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(8 * 4 * 4, 32), act(), nn.Linear(32, classes),
    )


def trainer(tmp_path: Path, callbacks: list[pl.Callback], logger: Any = True,
            **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer logging to TensorBoard under ``tmp_path``."""
    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    opts: dict[str, Any] = {
        "max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": logger,
        "callbacks": callbacks, "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "default_root_dir": str(tmp_path),
        "num_sanity_val_steps": 0,
    }
    opts.update(kwargs)
    return pl.Trainer(**opts)


def events(log_dir: str | Path) -> Any:
    """An EventAccumulator loaded with everything under ``log_dir`` (images, text, histograms)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0,
                                                          "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def text_events(acc: Any, tag: str) -> list[str]:
    """The strings logged with ``add_text`` under ``tag`` (stored as ``<tag>/text_summary``)."""
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def card_counts(image_event: Any, key: str = "counts") -> str:
    """The counts a findings card carries in its PNG (``fail=2 warn=7 info=14``), or its
    ``text``."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(image_event.encoded_image_string)).text[key]


def codes(findings: list[Any], min_severity: str = "warn") -> set[str]:
    from lightning_diag.findings import Severity

    level = Severity(min_severity)
    return {f.code for f in findings if f.severity >= level}

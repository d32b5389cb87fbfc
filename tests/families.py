"""Model families nobody on this project tuned the library on: each is a small but realistic
LightningModule with its data, a healthy variant and planted bugs.

Used by the model-family matrix (``tests/test_model_families.py``). Every family is tiny (a
few thousand parameters, a few hundred samples) so a fit with every callback takes a second or two.

Bugs (``broken=``):
    ``"scaled_last_layer"``: the last layer's weights multiplied by 30 (initial loss far too high).
    ``"softmax_before_loss"``: probabilities fed to a loss that expects logits/log-probs.
    ``"detached_layer"``: the first layer's output detached (its weights get no gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.helpers import digits

BUGS = ("scaled_last_layer", "softmax_before_loss", "detached_layer")


@dataclass
class Family:
    """One model family: a module, its loaders, the Trainer arguments its recipe needs."""

    name: str
    module: pl.LightningModule
    train: DataLoader
    val: DataLoader
    #: The initial loss a healthy, default-initialized model of this family should start at.
    expected_initial_loss: float
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Logged metric names (train loss, val loss, val accuracy or None).
    metric_names: tuple[str, str, str | None] = ("train_loss", "val_loss", "val_acc")
    #: How to read the target out of a batch, where the defaults cannot (bare tensors).
    batch_to_target: Callable[[Any], Any] | None = None


def _loader(dataset: Dataset, batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def _split(data: TensorDataset, start: int, stop: int) -> TensorDataset:
    return TensorDataset(*(t[start:stop] for t in data.tensors))


def _maybe_detach(x: torch.Tensor, broken: str | None) -> torch.Tensor:
    return x.detach() if broken == "detached_layer" else x


def _scale_last(layer: nn.Module, broken: str | None) -> None:
    if broken == "scaled_last_layer":
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(30.0)


class _TupleBatchModule(pl.LightningModule):
    """``body`` then ``out`` on ``(x, y)`` batches, a ``_loss(batch) -> (loss, accuracy)`` of
    the subclass, Adam at ``lr``: logs the training loss, the validation loss and accuracy."""

    lr: float

    def __init__(self, broken: str | None, body: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.broken, self.body, self.out = broken, body, out
        _scale_last(self.out, broken)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_maybe_detach(self.body(x), self.broken))

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log("val_loss", loss)
        self.log("val_acc", acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# --- 1. image classifier: (N, C) logits ------------------------------------------------------
class ImageClassifier(pl.LightningModule):
    def __init__(self, broken: str | None = None) -> None:
        super().__init__()
        self.broken = broken
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(),
                                  nn.Linear(32, 10))
        _scale_last(self.head[-1], broken)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_maybe_detach(self.conv(x), self.broken))

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(x)
        if self.broken == "softmax_before_loss":
            logits = logits.softmax(1)
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, acc = self._loss(*batch)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        self.log("train_acc", acc, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._loss(*batch)
        self.log("val_loss", loss)
        self.log("val_acc", acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def image_classifier(broken: str | None = None) -> Family:
    return Family("image_classifier", ImageClassifier(broken), _loader(_split(digits(512), 0, 384)),
                  _loader(_split(digits(512), 384, 512), shuffle=False), math.log(10))


# --- 2. per-pixel segmentation: (N, C, H, W) logits, (N, H, W) targets --------------------------
def _segmentation_data(start: int, stop: int) -> TensorDataset:
    x = digits(stop).tensors[0][start:]
    # Three classes per pixel from the ink level: background, faint stroke, dark stroke.
    y = torch.bucketize(x[:, 0], torch.tensor([0.2, 0.6]))
    return TensorDataset(x, y)


class Segmenter(_TupleBatchModule):
    lr = 1e-2

    def __init__(self, broken: str | None = None) -> None:
        super().__init__(broken, nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),
                         nn.Conv2d(8, 3, 1))

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        if self.broken == "softmax_before_loss":
            logits = logits.softmax(1)
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


def segmentation(broken: str | None = None) -> Family:
    return Family("segmentation", Segmenter(broken), _loader(_segmentation_data(0, 256)),
                  _loader(_segmentation_data(256, 320), shuffle=False), math.log(3))


# --- 3. token language model: forward(inputs, target) -> flattened log-probs ------------------
VOCAB, SEQ = 16, 12


def _token_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(SEQ + 1)
    start, stride, accel = (torch.randint(lo, hi, (n, 1), generator=g)
                            for lo, hi in ((0, VOCAB), (0, VOCAB), (1, 4)))
    # Learnable, yet no two samples alike: a quadratic walk over the vocabulary with one token
    # replaced at random (real text has no exact repeats either; the data inspection would
    # rightly flag copies).
    seq = (start + stride * pos + accel * pos * (pos + 1) // 2) % VOCAB
    where = torch.randint(0, SEQ, (n,), generator=g)  # in the inputs: the inputs differ
    seq[torch.arange(n), where] = torch.randint(0, VOCAB, (n,), generator=g)
    return TensorDataset(seq[:, :-1], seq[:, 1:])


class TokenLM(pl.LightningModule):
    """As in the word-language-model examples: ``forward(inputs, target)`` returns
    ``log_softmax`` over the vocabulary, flattened to ``(N * T, V)``."""

    def __init__(self, broken: str | None = None) -> None:
        super().__init__()
        self.broken = broken
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.GRU(16, 48, batch_first=True)
        self.decoder = nn.Linear(48, VOCAB)
        _scale_last(self.decoder, broken)

    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h, _ = self.mix(self.embed(inputs))
        logits = self.decoder(_maybe_detach(h, self.broken))
        out = logits.softmax(-1) if self.broken == "softmax_before_loss" else logits.log_softmax(-1)
        return out.reshape(-1, VOCAB)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        loss = F.nll_loss(self(inputs, target), target.reshape(-1))
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = batch
        out = self(inputs, target)
        self.log("val_loss", F.nll_loss(out, target.reshape(-1)))
        self.log("val_acc", (out.argmax(1) == target.reshape(-1)).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def token_lm(broken: str | None = None) -> Family:
    return Family("token_lm", TokenLM(broken), _loader(_token_data(256, 3)),
                  _loader(_token_data(64, 1), shuffle=False), math.log(VOCAB))


# --- 4. recurrent LM: hidden state carried between steps, SGD lr 5, clipping 0.25 -----------
class _Stream(Dataset):
    """Contiguous chunks of one long token stream, batchified as in the word-LM example, so
    that batch ``i`` continues batch ``i - 1`` and the hidden state may be carried over."""

    def __init__(self, length: int, batch_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        stride = torch.randint(1, 3, (length // 24 + 1,), generator=g).repeat_interleave(24)
        stream = torch.cumsum(stride[:length], 0) % VOCAB
        cols = length // batch_size
        self.data = stream[: cols * batch_size].view(batch_size, cols)

    def __len__(self) -> int:
        return (self.data.shape[1] - 1) // SEQ

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * SEQ
        return self.data[:, s: s + SEQ], self.data[:, s + 1: s + SEQ + 1]


class RecurrentLM(pl.LightningModule):
    def __init__(self, broken: str | None = None) -> None:
        super().__init__()
        self.broken = broken
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.decoder = nn.Linear(32, VOCAB)
        _scale_last(self.decoder, broken)
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor,
                hidden: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        out, hidden = self.rnn(self.embed(x), hidden)
        logits = self.decoder(_maybe_detach(out, self.broken))
        if self.broken == "softmax_before_loss":
            return logits.softmax(-1).reshape(-1, VOCAB), hidden
        return logits.log_softmax(-1).reshape(-1, VOCAB), hidden

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        # Truncated BPTT: the state carries over from the previous batch, detached.
        hidden = None if self.hidden is None else tuple(h.detach() for h in self.hidden)
        out, hidden = self(x, hidden)
        self.hidden = hidden  # type: ignore[assignment]
        loss = F.nll_loss(out, y.reshape(-1))
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self.hidden = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out, _ = self(x)
        self.log("val_loss", F.nll_loss(out, y.reshape(-1)))
        self.log("val_acc", (out.argmax(1) == y.reshape(-1)).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The word-LM example's SGD at lr 20 suits its 650-unit LSTM; on this 32-unit one it
        # moves the weights by ~30% a step (the update-ratio monitor rightly says too high).
        return torch.optim.SGD(self.parameters(), lr=5.0)


def recurrent_lm(broken: str | None = None) -> Family:
    # batch_size=None: each item already is a (batch, SEQ) chunk of the stream, in order.
    train = DataLoader(_Stream(4000, 8, 0), batch_size=None, shuffle=False)
    val = DataLoader(_Stream(800, 8, 1), batch_size=None, shuffle=False)
    return Family("recurrent_lm", RecurrentLM(broken), train, val, math.log(VOCAB),
                  trainer_kwargs={"gradient_clip_val": 0.25})


# --- 5. regression on bare-tensor batches, training_step returns {"loss": ...} ---------------
class _Rows(Dataset):
    """Each item is ONE tensor: 8 features then the target (a bare-tensor batch)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        w = torch.linspace(-1, 1, 8)
        y = x @ w + 0.5 * torch.sin(x[:, 0]) + 2.0 + 0.05 * torch.randn(n, generator=g)
        self.rows = torch.cat([x, y[:, None]], 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


class Regressor(pl.LightningModule):
    def __init__(self, broken: str | None = None) -> None:
        super().__init__()
        self.broken = broken
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.out = nn.Linear(32, 1)
        _scale_last(self.out, broken)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _maybe_detach(self.body(x), self.broken)
        out = self.out(h).squeeze(-1)
        return out.sigmoid() if self.broken == "softmax_before_loss" else out

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        loss = F.mse_loss(self(batch[:, :-1]), batch[:, -1])
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return {"loss": loss}

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self(batch[:, :-1]), batch[:, -1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def regression(broken: str | None = None) -> Family:
    train, val = _Rows(384, 0), _Rows(128, 1)
    y = train.rows[:, -1]
    # A default-initialized net outputs about 0: its initial MSE is about mean(y^2).
    return Family("regression", Regressor(broken), _loader(train), _loader(val, shuffle=False),
                  float((y**2).mean()), metric_names=("train_loss", "val_loss", None),
                  batch_to_target=lambda batch: batch[..., -1])


# --- 6. multi-label: (N, L) logits, same-shape 0/1 targets, BCE with logits ------------------
def _multilabel_data(start: int, stop: int) -> TensorDataset:
    x, y = (t[start:] for t in digits(stop).tensors)
    labels = torch.stack([y % 2 == 0, y >= 5, (y == 0) | (y == 8), x.flatten(1).mean(1) > 0.3], 1)
    return TensorDataset(x, labels.float())


class MultiLabel(_TupleBatchModule):
    lr = 3e-3

    def __init__(self, broken: str | None = None) -> None:
        super().__init__(broken, nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()),
                         nn.Linear(32, 4))

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        if self.broken == "softmax_before_loss":
            logits = logits.sigmoid()
        return (F.binary_cross_entropy_with_logits(logits, y),
                ((logits > 0).float() == y).float().mean())


def multilabel(broken: str | None = None) -> Family:
    return Family("multilabel", MultiLabel(broken), _loader(_multilabel_data(0, 384)),
                  _loader(_multilabel_data(384, 512), shuffle=False), math.log(2))


# --- 7. dict batches keyed as Hugging Face models expect; 8. metrics with "/" names ----------
class _DictDigits(Dataset):
    def __init__(self, n: int, offset: int = 0) -> None:
        x, y = digits(n + offset).tensors
        self.x, self.y = x[offset:], y[offset:]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class DictBatchClassifier(pl.LightningModule):
    """Dict batches (``pixel_values``, ``labels``); metrics logged as ``train/loss``,
    ``val/loss`` and ``val/acc`` through torchmetrics objects."""

    def __init__(self, broken: str | None = None) -> None:
        super().__init__()
        self.broken = broken
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.out = nn.Linear(32, 10)
        _scale_last(self.out, broken)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.out(_maybe_detach(self.body(pixel_values), self.broken))

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["pixel_values"])
        return logits.softmax(1) if self.broken == "softmax_before_loss" else logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self._logits(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        self.train_acc(logits, batch["labels"])
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        self.log("train/acc", self.train_acc, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._logits(batch)
        self.val_acc(logits, batch["labels"])
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]))
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def dict_batches(broken: str | None = None) -> Family:
    return Family("dict_batches", DictBatchClassifier(broken), _loader(_DictDigits(384)),
                  _loader(_DictDigits(128, offset=384), shuffle=False), math.log(10),
                  metric_names=("train/loss", "val/loss", "val/acc"))


FAMILIES: dict[str, Callable[..., Family]] = {
    "image_classifier": image_classifier,
    "segmentation": segmentation,
    "token_lm": token_lm,
    "recurrent_lm": recurrent_lm,
    "regression": regression,
    "multilabel": multilabel,
    "dict_batches": dict_batches,
}

"""Correct programs of many loss families, for the initial-loss and overfit checks.

Each program is tiny (a few hundred parameters to a few thousand, 160 samples in batches of
16), deterministic (seeded data and initialization) and correct: its loss is the one its
family's authors write, and :func:`reference_know_nothing` computes, in plain torch and without
the library, its loss at the know-nothing output (zero logits, uniform probabilities, zero
values) on given batches. ``tests/test_loss_programs.py`` checks those references by hand, that
each program learns, and that InitialLossCheck and OverfitSmallBatch at their defaults raise no
WARN or FAIL on any of them.

Families: a multi-task model (cross-entropy + MSE), knowledge distillation (KL to a frozen
teacher's softened logits + CE), label smoothing 0.1/0.2 with and without class weights (as a
``CrossEntropyLoss`` module and as a functional argument), mixup inside the step and mixup as soft
targets in the batch, a contrastive loss (InfoNCE over two noisy views), a VAE (reconstruction
+ KL), a margin ranking loss, Poisson and quantile regression, a density model (Gaussian NLL
with a predicted variance), a language model on partly random tokens, a small noisy regressor,
and multi-label BCE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import digits

N, BATCH = 160, 16
Tensor = torch.Tensor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(inputs: int, outputs: int, width: int = 32, act: type[nn.Module] = nn.ReLU,
         ) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), act(), nn.Linear(width, outputs))


class _Program(pl.LightningModule):
    """Adam at ``lr``; the training loss logged per epoch as people do."""

    lr = 1e-2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def loss(self, batch: Any) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


# --- classification with more than a cross-entropy ----------------------------------------------
def _teacher_classes(seed: int, classes: int = 4, dim: int = 8) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    x = torch.randn(N, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    return x, (x @ w).argmax(1)


class MultiTask(_Program):
    """A classification head and a regression head on shared features: CE + MSE."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.classes, self.value = nn.Linear(32, 4), nn.Linear(32, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.classes(h), self.value(h).squeeze(-1)

    def loss(self, batch: Any) -> Tensor:
        x, y, t = batch
        logits, value = self(x)
        return F.cross_entropy(logits, y) + F.mse_loss(value, t)


def multitask() -> tuple[_Program, TensorDataset]:
    x, y = _teacher_classes(1)
    t = x @ torch.linspace(-1, 1, 8) / 2
    return MultiTask(), TensorDataset(x, y, t)


class Distillation(_Program):
    """A student matching a frozen teacher's logits softened by T, plus the labels' CE."""

    T, alpha = 4.0, 0.5

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = _mlp(8, 4, width=16)

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        with torch.no_grad():
            soft = (self.teacher(x) / self.T).softmax(1)
        logits = self.student(x)
        kl = F.kl_div((logits / self.T).log_softmax(1), soft, reduction="batchmean")
        return self.alpha * self.T**2 * kl + (1 - self.alpha) * F.cross_entropy(logits, y)


def distillation() -> tuple[_Program, TensorDataset]:
    torch.manual_seed(11)
    teacher = _mlp(8, 4)
    with torch.no_grad():
        teacher[-1].weight.mul_(6.0)  # a trained teacher is confident: logits of a few units
    x = torch.randn(N, 8, generator=_gen(2))
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return Distillation(teacher), TensorDataset(x, y)


#: Class weights of the weighted label-smoothing programs.
CLASS_WEIGHTS = (1.0, 2.0, 0.5, 1.5, 1.0)


class Smoothing(_Program):
    """Cross-entropy with label smoothing, as a ``CrossEntropyLoss`` module or as the
    functional argument, with or without class weights."""

    def __init__(self, smoothing: float, weighted: bool, functional: bool) -> None:
        super().__init__()
        self.net = _mlp(8, 5)
        self.smoothing, self.functional = smoothing, functional
        weight = torch.tensor(CLASS_WEIGHTS) if weighted else None
        self.register_buffer("weight", weight)
        self.criterion = (None if functional else
                          nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing))

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        logits = self.net(x)
        if self.criterion is None:
            return F.cross_entropy(logits, y, weight=self.weight,
                                   label_smoothing=self.smoothing)
        return self.criterion(logits, y)


def smoothing(value: float, weighted: bool, functional: bool,
              ) -> Callable[[], tuple[_Program, TensorDataset]]:
    def make() -> tuple[_Program, TensorDataset]:
        return Smoothing(value, weighted, functional), TensorDataset(*_teacher_classes(3, 5))
    return make


class Mixup(_Program):
    """Mixup inside the step (as in the original code): the inputs mixed with a permutation
    of the batch, the loss mixed with the same weight."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(8, 4)

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        lam = float(torch.distributions.Beta(0.4, 0.4).sample())
        perm = torch.randperm(len(x))
        logits = self.net(lam * x + (1 - lam) * x[perm])
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])


def mixup() -> tuple[_Program, TensorDataset]:
    return Mixup(), TensorDataset(*_teacher_classes(4))


class SoftTargets(_Program):
    """Mixup done in the data pipeline (as timm does): the batch carries mixed inputs and soft
    class-probability targets, the loss is the cross-entropy to them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(8, 4)

    def loss(self, batch: Any) -> Tensor:
        x, target = batch
        return F.cross_entropy(self.net(x), target)


def soft_targets() -> tuple[_Program, TensorDataset]:
    x, y = _teacher_classes(5)
    g = _gen(6)
    lam = torch.rand(N, 1, generator=g)
    perm = torch.randperm(N, generator=g)
    onehot = F.one_hot(y, 4).float()
    return SoftTargets(), TensorDataset(lam * x + (1 - lam) * x[perm],
                                        lam * onehot + (1 - lam) * onehot[perm])


# --- representation and generative losses ----------------------------------------------------
class InfoNCE(_Program):
    """Two noisy views of each sample, L2-normalized embeddings, temperature 0.1: the other
    view of the same sample is the positive among the batch."""

    tau = 0.1

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(8, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> Tensor:
        (x,) = batch
        z1 = F.normalize(self(x + 0.1 * torch.randn_like(x)), dim=1)
        z2 = F.normalize(self(x + 0.1 * torch.randn_like(x)), dim=1)
        logits = z1 @ z2.T / self.tau
        return F.cross_entropy(logits, torch.arange(len(x), device=x.device))


def infonce() -> tuple[_Program, TensorDataset]:
    return InfoNCE(), TensorDataset(torch.randn(N, 8, generator=_gen(7)))


class VAE(_Program):
    """A VAE on the 8x8 digits (64 intensities in [0, 1]): Bernoulli reconstruction summed over
    pixels, KL to the standard normal prior, both averaged over the batch."""

    lr = 3e-3

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _mlp(64, 2 * 4)
        self.decoder = _mlp(4, 64)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return self.decoder(z), mu, logvar

    def loss(self, batch: Any) -> Tensor:
        (x,) = batch
        logits, mu, logvar = self(x)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
        return (recon + kl).mean()


def vae() -> tuple[_Program, TensorDataset]:
    return VAE(), TensorDataset(digits(N, flatten=True).tensors[0])


class Ranking(_Program):
    """Pairs ranked by a hidden score, ``margin_ranking_loss`` with margin 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(8, 1, width=16)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def loss(self, batch: Any) -> Tensor:
        first, second, order = batch
        return F.margin_ranking_loss(self(first), self(second), order, margin=1.0)


def ranking() -> tuple[_Program, TensorDataset]:
    g = _gen(8)
    first, second = torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g)
    w = torch.randn(8, generator=g)
    order = torch.sign(first @ w - second @ w)
    return Ranking(), TensorDataset(first, second, order)


# --- regression with other likelihoods, and natural floors ------------------------------------
class Poisson(_Program):
    """Counts from a log-linear rate; the network predicts the log-rate
    (``PoissonNLLLoss(log_input=True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(4, 1, width=16)
        self.criterion = nn.PoissonNLLLoss(log_input=True)

    def loss(self, batch: Any) -> Tensor:
        x, counts = batch
        return self.criterion(self.net(x).squeeze(-1), counts)


def poisson() -> tuple[_Program, TensorDataset]:
    g = _gen(9)
    x = torch.randn(N, 4, generator=g)
    rate = (0.5 * x @ torch.tensor([1.0, -0.5, 0.3, 0.8]) + 1.0).exp()
    return Poisson(), TensorDataset(x, torch.poisson(rate, generator=g))


QUANTILES = (0.1, 0.5, 0.9)


def pinball(pred: Tensor, y: Tensor) -> Tensor:
    """The quantile (pinball) loss of ``pred`` (N, 3) for the :data:`QUANTILES` of ``y``."""
    q = torch.tensor(QUANTILES, device=y.device)
    diff = y[:, None] - pred
    return torch.maximum(q * diff, (q - 1) * diff).mean()


class Quantile(_Program):
    """Three quantiles of a heteroscedastic target, the pinball loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(4, len(QUANTILES))

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return pinball(self.net(x), y)


def _heteroscedastic(seed: int) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    x = torch.randn(N, 4, generator=g)
    noise = 0.3 * (1 + x[:, 0].abs()) * torch.randn(N, generator=g)
    return x, torch.sin(x[:, 0]) + 0.5 * x[:, 1] + noise


def quantile() -> tuple[_Program, TensorDataset]:
    return Quantile(), TensorDataset(*_heteroscedastic(10))


class Density(_Program):
    """A conditional Gaussian density: the network predicts a mean and a log-variance,
    ``gaussian_nll_loss``; the noise is a floor no network goes below."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(4, 2)

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        out = self.net(x)
        return F.gaussian_nll_loss(out[:, 0], y, out[:, 1].exp())


def density() -> tuple[_Program, TensorDataset]:
    return Density(), TensorDataset(*_heteroscedastic(12))


VOCAB, SEQ = 8, 8


class RandomTokensLM(_Program):
    """A next-token model (an embedding and an MLP per position, a bigram model) on sequences
    whose every other token is random, the others following from the token before: half of
    the targets cannot be predicted, a floor of ``log V / 2`` no such model goes below.
    ``SEQ = VOCAB`` on purpose: its ``(N, T, V)`` scores fit two class layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, VOCAB))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens))

    def loss(self, batch: Any) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs).reshape(-1, VOCAB), targets.reshape(-1))


def random_tokens_lm() -> tuple[_Program, TensorDataset]:
    g = _gen(13)
    seq = torch.randint(0, VOCAB, (N, SEQ + 1), generator=g)
    seq[:, 1::2] = (seq[:, 0:-1:2] + 3) % VOCAB
    return RandomTokensLM(), TensorDataset(seq[:, :-1], seq[:, 1:])


class NoisyRegressor(_Program):
    """A small tanh network (8 units) on a noisy sine: MSE, the noise a floor it cannot fit."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(1, 1, width=8, act=nn.Tanh)

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y)


def noisy_regressor() -> tuple[_Program, TensorDataset]:
    g = _gen(14)
    x = 4 * torch.rand(N, 1, generator=g) - 2
    return NoisyRegressor(), TensorDataset(x, torch.sin(2 * x[:, 0])
                                           + 0.3 * torch.randn(N, generator=g))


class MultiLabelBCE(_Program):
    """Three independent labels per sample, ``BCEWithLogitsLoss``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(8, 3)
        self.criterion = nn.BCEWithLogitsLoss()

    def loss(self, batch: Any) -> Tensor:
        x, labels = batch
        return self.criterion(self.net(x), labels)


def multilabel_bce() -> tuple[_Program, TensorDataset]:
    g = _gen(15)
    x = torch.randn(N, 8, generator=g)
    return MultiLabelBCE(), TensorDataset(x, (x @ torch.randn(8, 3, generator=g) > 0).float())


# --- the set, and each program's know-nothing loss by hand -----------------------------------
@dataclass
class LossProgram:
    name: str
    module: _Program
    train: DataLoader
    #: The loss at the know-nothing output on given batches, in plain torch (no library).
    know_nothing: Callable[[_Program, list[Any]], float]
    #: What the know-nothing loss is, in words.
    closed_form: str


def _per_batch(f: Callable[[_Program, Any], Tensor]) -> Callable[[_Program, list[Any]], float]:
    def mean(module: _Program, batches: list[Any]) -> float:
        with torch.no_grad():
            return sum(float(f(module, b)) for b in batches) / len(batches)
    return mean


def _distillation_know_nothing(m: Any, b: Any) -> Tensor:
    x, _ = b
    soft = (m.teacher(x) / m.T).softmax(1)
    kl_to_uniform = (soft * soft.log()).sum(1).mean() + math.log(4)
    return m.alpha * m.T**2 * kl_to_uniform + (1 - m.alpha) * math.log(4)


def _smoothing_know_nothing(m: Any, b: Any) -> Tensor:
    # torch's weighted label smoothing at a uniform prediction, written out: the smoothed
    # target's cross-entropy with every -log p = log C, normalized by the targets' weights
    _, y = b
    w = m.weight if m.weight is not None else torch.ones(5)
    eps, c = m.smoothing, 5
    per_sample = (1 - eps) * w[y] * math.log(c) + eps / c * w.sum() * math.log(c)
    return per_sample.sum() / w[y].sum()


def _vae_know_nothing(m: Any, b: Any) -> Tensor:
    # the decoder's logits at 0: 64 pixels at log 2; the KL of the encoder's actual output
    (x,) = b
    mu, logvar = m.encoder(x).chunk(2, dim=1)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    return 64 * math.log(2) + kl.mean()


def _pinball_at_zero(m: Any, b: Any) -> Tensor:
    _, y = b
    return torch.stack([torch.maximum(q * y, (q - 1) * y).mean() for q in QUANTILES]).mean()


#: name -> (factory, know-nothing loss per batch, closed form in words)
PROGRAMS: dict[str, tuple[Callable[[], tuple[_Program, TensorDataset]],
                          Callable[[Any, Any], Tensor | float], str]] = {
    "multitask": (multitask, lambda m, b: math.log(4) + (b[2] ** 2).mean(),
                  "log 4 + mean(t^2)"),
    "distillation": (distillation, _distillation_know_nothing,
                     "a T^2 KL(teacher_T || uniform) + (1 - a) log 4"),
    "smoothing_0.1_module": (smoothing(0.1, False, False), _smoothing_know_nothing, "log 5"),
    "smoothing_0.2_functional": (smoothing(0.2, False, True), _smoothing_know_nothing,
                                 "log 5"),
    "smoothing_0.1_weighted_module": (smoothing(0.1, True, False), _smoothing_know_nothing,
                                      "log 5 (torch's weighted smoothing at uniform)"),
    "smoothing_0.2_weighted_functional": (smoothing(0.2, True, True),
                                          _smoothing_know_nothing,
                                          "log 5 (torch's weighted smoothing at uniform)"),
    "mixup": (mixup, lambda m, b: math.log(4), "log 4"),
    "soft_targets": (soft_targets, lambda m, b: math.log(4), "log 4"),
    "infonce": (infonce, lambda m, b: math.log(len(b[0])), "log N (all similarities 0)"),
    "vae": (vae, _vae_know_nothing, "64 log 2 + KL of the encoder's output"),
    "ranking": (ranking, lambda m, b: 1.0, "the margin, 1"),
    "poisson": (poisson, lambda m, b: 1.0, "exp(0) - y * 0 = 1"),
    "quantile": (quantile, _pinball_at_zero, "the pinball loss of predicting 0"),
    "density": (density, lambda m, b: 0.5 * (b[1] ** 2).mean(), "mean(y^2) / 2 (N(0, 1))"),
    "random_tokens_lm": (random_tokens_lm, lambda m, b: math.log(VOCAB), "log 8"),
    "noisy_regressor": (noisy_regressor, lambda m, b: (b[1] ** 2).mean(), "mean(y^2)"),
    "multilabel_bce": (multilabel_bce, lambda m, b: math.log(2), "log 2"),
}


def program(name: str, seed: int = 0) -> LossProgram:
    """A fresh program (its weights from ``seed``), with a shuffling training loader."""
    make, know_nothing, closed = PROGRAMS[name]
    torch.manual_seed(seed)  # the data come from their own generators, the weights from this
    module, data = make()
    train = DataLoader(data, batch_size=BATCH, shuffle=True, generator=_gen(seed))
    return LossProgram(name, module, train, _per_batch(know_nothing), closed)  # type: ignore[arg-type]

"""The healthy-program corpus: correct programs of many loss families and training setups.

Every program here is correct and healthy, and ``tests/test_corpus_healthy.py`` checks its
ground truth without the library (:func:`tests.corpus.runner.ground_truth`): its initial loss
is what its own loss gives at a know-nothing output (zero logits, uniform log-probabilities,
zero regression outputs, the prior of a VAE), and training improves it. On these, every
callback of the library at its defaults must raise no WARN or FAIL.

Each module derives from :class:`CorpusModule`: ``outputs(batch)`` runs the model,
``loss_of(outputs, batch)`` is the program's loss, ``accuracy`` (classification only) what it
logs as accuracy; ``know_nothing(outputs)`` the know-nothing prediction of the same shape.
Programs whose step does more (a GAN, manual optimization, a step reading ``self.trainer``)
override ``training_step`` as their authors would.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.corpus.data import digit_images, gaussian_classes, loader, split, teacher_logits
from tests.corpus.runner import Program

Tensor = torch.Tensor


def _zeros_like(out: Any) -> Any:
    if isinstance(out, Tensor):
        return torch.zeros_like(out)
    return type(out)(_zeros_like(o) for o in out)


class CorpusModule(pl.LightningModule):
    """A model, its loss and (for classifiers) its accuracy, logged as people log them:
    ``train_loss``/``train_acc`` per epoch, ``val_loss``/``val_acc``; Adam at ``lr``."""

    lr = 3e-3

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    def outputs(self, batch: Any) -> Any:
        return self(batch[0])

    def loss_of(self, out: Any, batch: Any) -> Tensor:
        raise NotImplementedError

    def val_loss_of(self, out: Any, batch: Any) -> Tensor:
        return self.loss_of(out, batch)

    def accuracy(self, out: Any, batch: Any) -> Tensor | None:
        return None

    def know_nothing(self, out: Any) -> Any:
        return _zeros_like(out)

    # --- ground truth (tests.corpus.runner.GroundTruth) ------------------------------------
    def ground_truth_loss(self, batch: Any) -> Tensor:
        return self.loss_of(self.outputs(batch), batch)

    def know_nothing_loss(self, batch: Any) -> Tensor:
        return self.loss_of(self.know_nothing(self.outputs(batch)), batch)

    # --- Lightning -------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.outputs(batch)
        loss = self.loss_of(out, batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        acc = self.accuracy(out, batch)
        if acc is not None:
            self.log("train_acc", acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = self.outputs(batch)
        self.log("val_loss", self.val_loss_of(out, batch))
        acc = self.accuracy(out, batch)
        if acc is not None:
            self.log("val_acc", acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _mlp(d_in: int, width: int, d_out: int, act: type[nn.Module] = nn.ReLU,
         dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width), act()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(width, width), act(), nn.Linear(width, d_out)]
    return nn.Sequential(*layers)


def _argmax_accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(1) == y).float().mean()


class Classifier(CorpusModule):
    """Cross-entropy on ``(x, y)`` batches; the base of the classification programs."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.cross_entropy(out, batch[1])

    def accuracy(self, out: Any, batch: Any) -> Tensor:
        logits = out[0] if isinstance(out, tuple) else out
        return _argmax_accuracy(logits, batch[1])


def _classes(n: int = 512, n_train: int = 384, batch_size: int = 32, **kw: Any,
             ) -> tuple[DataLoader, DataLoader]:
    return split(gaussian_classes(n, **kw), n_train, batch_size)


# --- 1. a CNN on real images ---------------------------------------------------------------
def _cnn() -> Classifier:
    return Classifier(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)))


def cnn_digits() -> Program:
    return Program("cnn_digits", "CNN", "conv-BN-ReLU CNN on the 8x8 digits, cross-entropy",
                   _cnn, digit_images)


# --- 2. a GRU over a sequence ----------------------------------------------------------------
class GRUClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(nn.Linear(24, 3), lr=1e-2)
        self.gru = nn.GRU(3, 24, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.net(h[-1])


def _channel_sums(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, 3, generator=g)
    return TensorDataset(x, x.sum(1).argmax(1))  # the channel with the largest sum


def gru_classifier() -> Program:
    return Program("gru_classifier", "RNN/GRU", "GRU over 10 steps of 3 channels: which "
                   "channel sums highest", GRUClassifier,
                   lambda: split(_channel_sums(512, 0), 384))


# --- 2b. a GRU forecaster on a time series --------------------------------------------------
WINDOW = 12


def forecast_windows(n: int, seed: int, leak: bool = False) -> TensorDataset:
    """Sliding windows of a noisy two-tone series, each with the value that follows it.
    ``leak``: the windows start one step late, so each ends with its own target (the
    off-by-one of issue 20: the model is fed x[t + 1])."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n + WINDOW + 1, dtype=torch.float32)
    series = (torch.sin(0.3 * t + 6.28 * torch.rand(1, generator=g)) + 0.5 * torch.sin(0.07 * t)
              + 0.2 * torch.randn(len(t), generator=g))
    first = torch.arange(n) + int(leak)
    x = series[first[:, None] + torch.arange(WINDOW)]
    return TensorDataset(x[..., None], series[torch.arange(n) + WINDOW])


class Forecaster(CorpusModule):
    lr = 1e-2

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 16, batch_first=True)
        self.head = nn.Linear(16, 1)
        with torch.no_grad():  # a small last layer: the forecast starts near 0 (recipe 3.1)
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.head(h[-1]).squeeze(-1)

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.mse_loss(out, batch[1])


def forecast_data(leak: bool = False) -> tuple[DataLoader, DataLoader]:
    return (loader(forecast_windows(384, 0, leak)),
            loader(forecast_windows(128, 1, leak), 64, shuffle=False))


def gru_forecaster() -> Program:
    return Program("gru_forecaster", "RNN/GRU", "GRU forecasting the next value of a noisy "
                   "two-tone series from a window of 12, MSE", Forecaster, forecast_data)


# --- 3. CE with an auxiliary head (deep supervision) -----------------------------------------
class AuxHead(Classifier):
    def __init__(self, aux_weight: float = 0.4) -> None:
        super().__init__(nn.Linear(32, 4))
        self.trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.aux = nn.Linear(32, 4)
        self.aux_weight = aux_weight

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.net(self.mid(h)), self.aux(h)

    def loss_of(self, out: tuple[Tensor, Tensor], batch: Any) -> Tensor:
        main, aux = out
        return F.cross_entropy(main, batch[1]) + self.aux_weight * F.cross_entropy(aux, batch[1])


def ce_aux_head() -> Program:
    return Program("ce_aux_head", "CE + auxiliary terms", "CE + 0.4 x CE of an auxiliary head "
                   "on the first hidden layer", AuxHead, _classes)


# --- 4. CE with a feature-norm penalty -------------------------------------------------------
class FeaturePenalty(Classifier):
    def __init__(self) -> None:
        super().__init__(nn.Linear(32, 4))
        self.features = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(x)
        return self.net(feats), feats

    def loss_of(self, out: tuple[Tensor, Tensor], batch: Any) -> Tensor:
        logits, feats = out
        return F.cross_entropy(logits, batch[1]) + 1e-3 * feats.pow(2).sum(1).mean()


def ce_feature_penalty() -> Program:
    return Program("ce_feature_penalty", "CE + auxiliary terms", "CE + 1e-3 x the squared norm "
                   "of the penultimate features", FeaturePenalty, _classes)


# --- 5. multi-task: a class head and a regression head ---------------------------------------
class MultiTask(CorpusModule):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.cls = nn.Linear(32, 4)
        self.reg = nn.Linear(32, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.cls(h), self.reg(h).squeeze(-1)

    def loss_of(self, out: tuple[Tensor, Tensor], batch: Any) -> Tensor:
        logits, value = out
        _, y, target = batch
        return F.cross_entropy(logits, y) + F.mse_loss(value, target)

    def accuracy(self, out: tuple[Tensor, Tensor], batch: Any) -> Tensor:
        return _argmax_accuracy(out[0], batch[1])


def _multitask_data() -> tuple[DataLoader, DataLoader]:
    x, y = gaussian_classes(512).tensors
    g = torch.Generator().manual_seed(5)
    v = torch.randn(16, generator=g) / 4.0
    target = x @ v + 0.3 * torch.sin(x[:, 1])
    return split(TensorDataset(x, y, target), 384)


def multitask_ce_mse() -> Program:
    return Program("multitask_ce_mse", "multi-task", "class head (CE) + regression head (MSE) "
                   "on one trunk, (x, y, target) batches", MultiTask, _multitask_data)


# --- 6. knowledge distillation -------------------------------------------------------------
class Distillation(Classifier):
    def __init__(self, teacher_weight: Tensor, temperature: float = 2.0, alpha: float = 0.5,
                 ) -> None:
        super().__init__(_mlp(16, 32, 4))
        self.teacher = nn.Linear(16, 4, bias=False)
        with torch.no_grad():
            self.teacher.weight.copy_(teacher_weight.T)
        self.teacher.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        x, y = batch
        t = self.temperature
        with torch.no_grad():
            soft = F.softmax(self.teacher(x) / t, dim=1)
        kd = F.kl_div(F.log_softmax(out / t, dim=1), soft, reduction="batchmean") * t * t
        return self.alpha * kd + (1 - self.alpha) * F.cross_entropy(out, y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


def distillation() -> Program:
    # The teacher is the linear rule that made the labels, twice as confident (a frozen
    # teacher trained to convergence): its softened targets are far from uniform.
    x, w, logits = teacher_logits(512, 16, 4, seed=0)
    g = torch.Generator().manual_seed(1)
    y = (logits + 0.3 * torch.randn(logits.shape, generator=g)).argmax(1)
    data = TensorDataset(x, y)
    return Program("distillation", "distillation", "student MLP: 0.5 x T^2 KL to a frozen "
                   "teacher's softened logits (T=2) + 0.5 x CE",
                   lambda: Distillation(4.0 * w), lambda: split(data, 384))


# --- 7-10. label smoothing, with and without class weights -----------------------------------
_PRIORS = [0.4, 0.3, 0.2, 0.1]


class Criterion(Classifier):
    """A classifier whose loss is a loss module (``self.criterion``), as most code has it."""

    def __init__(self, criterion: nn.Module, classes: int = 4) -> None:
        super().__init__(_mlp(16, 32, classes))
        self.criterion = criterion

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return self.criterion(out, batch[1])


def _class_weights() -> Tensor:
    y = gaussian_classes(512, priors=_PRIORS).tensors[1][:384]
    counts = torch.bincount(y, minlength=4).float()
    return counts.sum() / (4 * counts)  # inverse frequency, as sklearn's "balanced"


def smoothing(eps: float, weighted: bool, classes: int = 4) -> Program:
    """Label smoothing ``eps`` on ``classes`` classes; ``weighted``: inverse-frequency class
    weights on classes of priors 0.4/0.3/0.2/0.1 (4 classes)."""
    name = f"smoothing_{eps}" + ("_weighted" if weighted else "")
    about = f"CrossEntropyLoss(label_smoothing={eps}" + (
        ", weight=inverse class frequency)" if weighted else ")") + f", {classes} classes"

    def module() -> Classifier:
        weight = _class_weights() if weighted else None
        return Criterion(nn.CrossEntropyLoss(weight=weight, label_smoothing=eps), classes)

    return Program(name, "label smoothing", about, module,
                   lambda: _classes(classes=classes, priors=_PRIORS if weighted else None))


def summed_ce() -> Program:
    """Cross-entropy summed over the batch (``reduction="sum"``), as PyTorch's VAE example sums
    its loss: a scale choice (the learning rate then scales with the batch size; Adam does not
    mind), not a bug; the initial loss is judged per sample."""
    return Program("ce_summed", "summed loss", "CrossEntropyLoss(reduction='sum') with Adam",
                   lambda: Criterion(nn.CrossEntropyLoss(reduction="sum")), _classes)


def class_weights() -> Program:
    return Program("class_weights", "class weights", "CrossEntropyLoss(weight=inverse class "
                   "frequency) on classes of priors 0.4/0.3/0.2/0.1",
                   lambda: Criterion(nn.CrossEntropyLoss(weight=_class_weights())),
                   lambda: _classes(priors=_PRIORS))


# --- 11. soft targets: mixup ---------------------------------------------------------------
class Mixup(Classifier):
    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(_mlp(16, 32, 4))
        self.beta = torch.distributions.Beta(alpha, alpha)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        lam = float(self.beta.sample())
        perm = torch.randperm(len(x), device=x.device)
        soft = F.one_hot(y, 4).float()
        logits = self(lam * x + (1 - lam) * x[perm])
        loss = F.cross_entropy(logits, lam * soft + (1 - lam) * soft[perm])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss


def mixup() -> Program:
    return Program("mixup", "soft targets", "mixup (Beta(1, 1)): CE against the mixed "
                   "one-hot targets (probabilities)", Mixup, _classes)


# --- 12. contrastive: a two-tower InfoNCE ----------------------------------------------------
class TwoTower(CorpusModule):
    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.tower_a = _mlp(16, 32, 16)
        self.tower_b = _mlp(12, 32, 16)
        self.temperature = temperature

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(self.tower_a(a), dim=1), F.normalize(self.tower_b(b), dim=1)

    def outputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        return self(batch[0], batch[1])

    def loss_of(self, out: tuple[Tensor, Tensor], batch: Any) -> Tensor:
        za, zb = out
        logits = za @ zb.T / self.temperature
        target = torch.arange(len(za), device=za.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _two_views(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 8, generator=g)
    a = s @ torch.randn(8, 16, generator=g) / 8**0.5 + 0.3 * torch.randn(n, 16, generator=g)
    b = torch.tanh(s @ torch.randn(8, 12, generator=g) / 8**0.5)
    return TensorDataset(a, b + 0.3 * torch.randn(n, 12, generator=g))


def infonce() -> Program:
    return Program("infonce", "contrastive", "two towers, symmetric InfoNCE (temperature 0.5) "
                   "between two views of one latent; (a, b) batches, no labels", TwoTower,
                   lambda: split(_two_views(512), 384, 32, 32))


# --- 13. VAE: reconstruction + KL ------------------------------------------------------------
class VAE(CorpusModule):
    lr = 3e-3

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
        self.decoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decoder(z), mu, logvar

    def loss_of(self, out: tuple[Tensor, Tensor, Tensor], batch: Any) -> Tensor:
        recon, mu, logvar = out
        x = batch[0]
        bce = F.binary_cross_entropy_with_logits(recon, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (bce + kl) / len(x)


def vae() -> Program:
    return Program("vae", "VAE", "VAE on the flattened digits: summed BCE reconstruction + KL, "
                   "per sample", VAE, lambda: digit_images(flatten=True))


# --- 14. ranking: a margin loss on pairs ---------------------------------------------------
class Ranker(CorpusModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(16, 32, 1)
        self.criterion = nn.MarginRankingLoss(margin=0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def outputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        return self(batch[0]), self(batch[1])

    def loss_of(self, out: tuple[Tensor, Tensor], batch: Any) -> Tensor:
        return self.criterion(out[0], out[1], batch[2])


def _pairs(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g) / 4.0
    x1, x2 = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)

    def score(x: Tensor) -> Tensor:
        return x @ w + 0.3 * torch.sin(x[:, 0])

    return TensorDataset(x1, x2, torch.sign(score(x1) - score(x2)))


def margin_ranking() -> Program:
    return Program("margin_ranking", "ranking/margin", "pairwise MarginRankingLoss(margin=0.5) "
                   "on (x1, x2, +-1) batches", Ranker, lambda: split(_pairs(512), 384))


# --- 15-17. count, quantile and density regression -------------------------------------------
class Regressor(CorpusModule):
    """An MLP on ``(x, y)`` batches with a loss of the subclass."""

    def __init__(self, d_in: int = 8, d_out: int = 1, width: int = 32,
                 act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.net = _mlp(d_in, width, d_out, act)
        self.d_out = d_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.d_out == 1 else out


def _features(n: int, seed: int, d: int = 8) -> tuple[Tensor, Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    return x, x @ (w / w.norm()), g


class Poisson(Regressor):
    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.poisson_nll_loss(out, batch[1], log_input=True)


def _counts(n: int = 512) -> TensorDataset:
    x, s, g = _features(n, 7)
    return TensorDataset(x, torch.poisson(torch.exp(0.5 + 0.5 * s), generator=g))


def poisson() -> Program:
    return Program("poisson", "Poisson/quantile regression", "counts: PoissonNLLLoss on the "
                   "log-rate", Poisson, lambda: split(_counts(), 384))


class Quantile(Regressor):
    quantiles = (0.1, 0.5, 0.9)

    def __init__(self) -> None:
        super().__init__(d_out=3, width=64)

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        q = torch.tensor(self.quantiles, device=out.device)
        err = batch[1][:, None] - out
        return torch.maximum(q * err, (q - 1) * err).mean()


def _heteroscedastic(n: int = 512, seed: int = 8) -> TensorDataset:
    x, s, g = _features(n, seed)
    scale = 0.2 + 0.3 * x[:, 1].abs()
    return TensorDataset(x, s + torch.sin(x[:, 0]) + scale * torch.randn(n, generator=g))


def quantile() -> Program:
    return Program("quantile", "Poisson/quantile regression", "pinball loss of the 0.1/0.5/0.9 "
                   "quantiles, (N, 3) output", Quantile, lambda: split(_heteroscedastic(), 384))


class GaussianDensity(Regressor):
    def __init__(self) -> None:
        super().__init__(d_out=2)

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        mean, log_var = out.unbind(1)
        return F.gaussian_nll_loss(mean, batch[1], log_var.exp())


def gaussian_nll() -> Program:
    return Program("gaussian_nll", "density (Gaussian NLL)", "mean and log-variance heads, "
                   "GaussianNLLLoss on heteroscedastic noise", GaussianDensity,
                   lambda: split(_heteroscedastic(seed=9), 384))


# --- 18. CTC --------------------------------------------------------------------------------
CTC_CLASSES, CTC_FRAMES, CTC_LABELS = 5, 16, 3


def _ctc_data(n: int, seed: int) -> TensorDataset:
    """Frames of a noisy embedding of [blank, l1 x d1, blank, l2 x d2, ...], labels in 1..4."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(CTC_CLASSES, 8, generator=g)
    frames = torch.zeros(n, CTC_FRAMES, dtype=torch.long)
    labels = torch.zeros(n, CTC_LABELS, dtype=torch.long)
    for i in range(n):
        t = 1
        prev = 0
        for j in range(CTC_LABELS):
            label = prev
            while label == prev:
                label = int(torch.randint(1, CTC_CLASSES, (1,), generator=g))
            prev = labels[i, j] = label
            d = int(torch.randint(2, 4, (1,), generator=g))
            frames[i, t:t + d] = label
            t += d + 1
    x = embed[frames] + 0.3 * torch.randn(n, CTC_FRAMES, 8, generator=g)
    return TensorDataset(x, labels)


class CTCModel(CorpusModule):
    lr = 1e-2

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 32, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, CTC_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.head(h).log_softmax(-1)  # (N, T, C) log-probabilities

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        labels = batch[1]
        n = len(labels)
        return F.ctc_loss(out.transpose(0, 1), labels,
                          torch.full((n,), CTC_FRAMES, dtype=torch.long),
                          torch.full((n,), CTC_LABELS, dtype=torch.long))

    def know_nothing(self, out: Tensor) -> Tensor:
        return torch.full_like(out, -math.log(CTC_CLASSES))  # uniform log-probabilities


def ctc() -> Program:
    return Program("ctc", "CTC/sequence", "bidirectional GRU, (N, T, C) log-probs, CTC loss on "
                   "3-label sequences of 16 frames", CTCModel,
                   lambda: split(_ctc_data(384, 0), 320))


# --- 19. a tiny language model on token ids (dict batches, padded with 0) --------------------
LM_VOCAB, LM_LEN = 12, 12


def _token_ids(n: int, seed: int = 0) -> Tensor:
    """``n`` distinct sequences of a Markov chain over tokens 1..V-1 (each token has three
    equally likely successors: real text is not deterministic either, the loss has a floor),
    6 to 12 tokens long, padded with 0."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(1, LM_VOCAB, (LM_VOCAB, 3), generator=g)
    seen: set[tuple[int, ...]] = set()
    ids = torch.zeros(n, LM_LEN, dtype=torch.long)
    while len(seen) < n:
        length = int(torch.randint(6, LM_LEN + 1, (1,), generator=g))
        seq = [int(torch.randint(1, LM_VOCAB, (1,), generator=g))]
        while len(seq) < length:
            seq.append(int(succ[seq[-1], int(torch.randint(0, 3, (1,), generator=g))]))
        if tuple(seq) not in seen:  # distinct: copies would be real duplicates and leaks
            ids[len(seen), :length] = torch.tensor(seq)
            seen.add(tuple(seq))
    return ids


class TokenBatches(Dataset):
    """``{"input_ids", "attention_mask", "labels"}`` as Hugging Face tokenizers give them:
    ids padded with 0 to a common length, labels -100 on the padding."""

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids
        self.mask = (ids != 0).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class TinyLM(CorpusModule):
    lr = 1e-2

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(LM_VOCAB, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 32, kernel_size=3)  # causal: left-padded, sees t-2..t
        self.lm_head = nn.Linear(32, LM_VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = F.pad(self.embed(input_ids).transpose(1, 2), (2, 0))
        return self.lm_head(F.relu(self.conv(h)).transpose(1, 2))

    def outputs(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch["input_ids"])

    def loss_of(self, out: Tensor, batch: dict[str, Tensor]) -> Tensor:
        # next-token prediction: position t predicts token t + 1
        return F.cross_entropy(out[:, :-1].reshape(-1, LM_VOCAB),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def tiny_lm() -> Program:
    return Program("tiny_lm", "language model", "causal-convolution LM on Markov-chain token "
                   "ids: dict batches (input_ids padded with 0, attention_mask, labels -100 on "
                   "pads)", TinyLM,
                   _lm_data)


def _lm_data() -> tuple[DataLoader, DataLoader]:
    ids = _token_ids(320)
    return loader(TokenBatches(ids[:256])), loader(TokenBatches(ids[256:]), 64, shuffle=False)


# --- 20. a GAN: two optimizers, manual optimization -----------------------------------------
_REAL_MEAN, _REAL_STD = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])


class GAN(pl.LightningModule):
    """As in Lightning's GAN example: ``automatic_optimization = False``, the discriminator then
    the generator each step, both losses logged, nothing returned."""

    def __init__(self, latent: int = 4) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent = latent
        self.generator = nn.Sequential(nn.Linear(latent, 32), nn.ReLU(), nn.Linear(32, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
        self.register_buffer("fixed_z", torch.randn(256, latent,
                                                    generator=torch.Generator().manual_seed(3)))

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    @staticmethod
    def _d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits,
                                                     torch.zeros_like(fake_logits))) / 2

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        fake = self(torch.randn(len(real), self.latent, device=real.device))
        d_loss = self._d_loss(self.discriminator(real), self.discriminator(fake.detach()))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        logits = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.generator.parameters(), lr=2e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))]

    # ground truth: the discriminator's loss; the quality, how far the samples are from the data
    def ground_truth_loss(self, batch: Any) -> Tensor:
        real = batch[0]
        return self._d_loss(self.discriminator(real), self.discriminator(self(self.fixed_z)))

    def know_nothing_loss(self, batch: Any) -> Tensor:
        zero = torch.zeros(len(batch[0]), 1)
        return self._d_loss(zero, zero)  # a discriminator that cannot tell: log 2

    def quality(self, batch: Any) -> Tensor:
        fake = self(self.fixed_z)
        return (fake.mean(0) - _REAL_MEAN).norm() + (fake.std(0) - _REAL_STD).norm()


def _gaussian_2d(n: int = 1024) -> tuple[DataLoader, None]:
    g = torch.Generator().manual_seed(4)
    return loader(TensorDataset(_REAL_MEAN + _REAL_STD * torch.randn(n, 2, generator=g))), None


def gan() -> Program:
    return Program("gan", "GAN", "generator and discriminator, two Adam optimizers, manual "
                   "optimization, non-saturating BCE; no validation", GAN, _gaussian_2d,
                   train_batches=16)


# --- 21. manual optimization with a correct zero_grad --------------------------------------
class ManualClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(_mlp(16, 32, 4))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", _argmax_accuracy(logits, y), on_step=False, on_epoch=True)
        return loss


def manual_optimization() -> Program:
    return Program("manual_optimization", "manual optimization", "classifier with "
                   "automatic_optimization=False: zero_grad, manual_backward, step; returns "
                   "the loss", ManualClassifier, _classes)


# --- 22. bf16 autocast, gradient accumulation and clipping -----------------------------------
def bf16_accumulate_clip() -> Program:
    return Program("bf16_accumulate_clip", "bf16 + accumulation + clipping",
                   "MLP classifier, precision='bf16-mixed', accumulate_grad_batches=2, "
                   "gradient_clip_val=1.0", lambda: Classifier(_mlp(64, 32, 10)),
                   lambda: digit_images(flatten=True), train_batches=12,
                   trainer={"precision": "bf16-mixed", "accumulate_grad_batches": 2,
                            "gradient_clip_val": 1.0})


# --- 23. batch size 4 ------------------------------------------------------------------------
def batch_size_4() -> Program:
    return Program("batch_size_4", "batch size 4", "ReLU MLP classifier on batches of 4, Adam "
                   "1e-3", lambda: Classifier(_mlp(16, 32, 4), lr=1e-3),
                   lambda: _classes(batch_size=4), train_batches=64, val_batches=8)


def batch_size_1() -> Program:
    return Program("batch_size_1", "batch size 1", "ReLU MLP classifier trained one sample at "
                   "a time (720 steps), Adam 1e-3", lambda: Classifier(_mlp(16, 32, 4), lr=1e-3),
                   lambda: _classes(batch_size=1), train_batches=120, val_batches=8)


# --- 24. a step that reads self.trainer --------------------------------------------------
class ReadsTrainer(AuxHead):
    """Deep supervision whose auxiliary weight decays over the run: the step reads the epoch
    and the run length from ``self.trainer``, and logs the global step it is at."""

    def aux_weight_at(self, epoch: int, max_epochs: int) -> float:
        return 0.5 * (1 - epoch / max_epochs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        main, aux = self(batch[0])
        weight = self.aux_weight_at(self.trainer.current_epoch, self.trainer.max_epochs or 1)
        y = batch[1]
        loss = F.cross_entropy(main, y) + weight * F.cross_entropy(aux, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("seen_steps", float(self.trainer.global_step), on_step=True, on_epoch=False)
        return loss

    def ground_truth_loss(self, batch: Any) -> Tensor:
        main, aux = self(batch[0])
        weight = self.aux_weight_at(0, 4)
        return F.cross_entropy(main, batch[1]) + weight * F.cross_entropy(aux, batch[1])

    def know_nothing_loss(self, batch: Any) -> Tensor:
        return (1 + self.aux_weight_at(0, 4)) * torch.tensor(math.log(4))


def reads_trainer() -> Program:
    return Program("reads_trainer", "step reads self.trainer", "auxiliary weight from "
                   "self.trainer.current_epoch / max_epochs; logs self.trainer.global_step",
                   ReadsTrainer, _classes)


# --- 25. a step that casts its labels ------------------------------------------------------
class CastsLabels(CorpusModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(16, 32, 1, nn.Tanh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.binary_cross_entropy_with_logits(out, batch[1].float())

    def accuracy(self, out: Tensor, batch: Any) -> Tensor:
        return ((out > 0).long() == batch[1]).float().mean()


def casts_labels() -> Program:
    def data() -> tuple[DataLoader, DataLoader]:
        x, y = gaussian_classes(512, classes=2).tensors
        return split(TensorDataset(x, y), 384)  # int64 labels, cast in the step

    return Program("casts_labels", "step casts its labels", "binary BCE-with-logits on "
                   "labels.float() of int64 labels, tanh MLP", CastsLabels, data)


# --- 26. a validation class the training split lacks ----------------------------------------
def val_only_class() -> Program:
    def data() -> tuple[DataLoader, DataLoader]:
        x, y = gaussian_classes(1280, classes=5, priors=[0.3, 0.3, 0.2, 0.17, 0.03]).tensors
        train = y[:960] != 4  # the rare class 4 only in the validation split
        return (loader(TensorDataset(x[:960][train], y[:960][train])),
                loader(TensorDataset(x[960:], y[960:]), 64, shuffle=False))

    return Program("val_only_class", "validation-only class", "5-way classifier; the rare "
                   "class 4 appears only in the validation split",
                   lambda: Classifier(_mlp(16, 32, 5)), data)


# --- 27. a small noisy regressor ------------------------------------------------------------
class MSERegressor(Regressor):
    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.mse_loss(out, batch[1])


def _noisy(n: int = 384) -> TensorDataset:
    x, s, g = _features(n, 11)
    return TensorDataset(x, s + torch.randn(n, generator=g))  # signal var 1, noise var 1


def noisy_regressor() -> Program:
    return Program("noisy_regressor", "noisy regressor", "tanh MLP, MSE; noise as large as the "
                   "signal (the loss floors at half its start)",
                   lambda: MSERegressor(width=8, act=nn.Tanh), lambda: split(_noisy(), 256))


# --- 28. robust regression ---------------------------------------------------------------------
class HuberRegressor(Regressor):
    def loss_of(self, out: Tensor, batch: Any) -> Tensor:
        return F.smooth_l1_loss(out, batch[1])


def huber_regression() -> Program:
    return Program("huber_regression", "robust regression", "SmoothL1 (Huber) on a nonlinear "
                   "target with Laplace noise", HuberRegressor,
                   lambda: split(_heavy_tailed(), 384))


def _heavy_tailed(n: int = 512) -> TensorDataset:
    x, s, g = _features(n, 12)
    u = torch.rand(n, generator=g) - 0.5
    noise = -0.2 * u.sign() * torch.log1p(-2 * u.abs())  # Laplace: heavier tails than Gaussian
    return TensorDataset(x, s + 0.5 * torch.cos(x[:, 2]) + noise)


# --- 29-30. SGD with a schedule; dropout and weight decay ------------------------------------
class SGDCosine(Classifier):
    def __init__(self) -> None:
        super().__init__(_mlp(64, 64, 10))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                              nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=96)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def sgd_cosine() -> Program:
    return Program("sgd_cosine", "SGD + schedule", "MLP on flattened digits, Nesterov SGD 0.1, "
                   "weight decay 5e-4, per-step cosine schedule over the run", SGDCosine,
                   lambda: digit_images(flatten=True), train_batches=16)


class Regularized(Classifier):
    def __init__(self) -> None:
        super().__init__(_mlp(16, 64, 4, dropout=0.3))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)


def dropout_weight_decay() -> Program:
    return Program("dropout_weight_decay", "regularization", "MLP with dropout 0.3, AdamW "
                   "weight decay 0.05", Regularized, _classes)


# --- 31. a custom autograd Function with a correct backward ---------------------------------
class SwishFn(torch.autograd.Function):
    """``x * sigmoid(x)`` with a hand-written backward (as custom CUDA kernels have)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return SwishFn.apply(x)


def custom_autograd() -> Program:
    return Program("custom_autograd", "custom autograd Function", "MLP whose activation is a "
                   "custom autograd Function (swish) with a correct hand-written backward",
                   lambda: Classifier(_mlp(16, 32, 4, Swish)), _classes)


PROGRAMS = [
    cnn_digits, gru_classifier, gru_forecaster, ce_aux_head, ce_feature_penalty, multitask_ce_mse,
    distillation, lambda: smoothing(0.1, False, classes=3), lambda: smoothing(0.2, False),
    lambda: smoothing(0.1, True), lambda: smoothing(0.2, True), class_weights, summed_ce, mixup,
    infonce,
    vae, margin_ranking, poisson, quantile, gaussian_nll, ctc, tiny_lm, gan,
    manual_optimization, bf16_accumulate_clip, batch_size_4, batch_size_1, reads_trainer,
    casts_labels, val_only_class, noisy_regressor, huber_regression, sgd_cosine,
    dropout_weight_decay, custom_autograd,
]
#: Every healthy program by name.
HEALTHY: dict[str, Program] = {p.name: p for p in (make() for make in PROGRAMS)}

"""What the user's loss does with the batch's labels (lightning_diag.checks.label_use): labels a
loss ignores are no classes of its output (a VAE on (image, digit) batches), a single logit
scored as a binary classifier has two classes; read through the initial-loss check, the
overfit test and the data inspection's class count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_diag.callbacks import DataInspection
from lightning_diag.checks.initial_loss import check_initial_loss
from lightning_diag.checks.label_use import (
    BINARY,
    WIDTH,
    StepProbe,
    binary_scores,
    labels_ignored,
    output_classes,
    replace_leaf,
    step_task,
)
from lightning_diag.checks.overfit import overfit_batches
from lightning_diag.checks.reference_outputs import record_predictions
from tests.helpers import codes, digits, loader, trainer

Tensor = torch.Tensor


class VAE(pl.LightningModule):
    """A VAE on ``(image, digit)`` batches: the digit labels ride along, the loss never reads
    them (as in the healthy corpus's ``vae``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
        self.decoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decoder(z), mu, logvar

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        recon, mu, logvar = self(x)
        bce = F.binary_cross_entropy_with_logits(recon, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (bce + kl) / len(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class Wide(pl.LightningModule):
    """A 64-way classifier of the same digits: its loss reads the labels."""

    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
        self.constant = constant

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.zeros_like(x) if self.constant else x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class OneOutput(pl.LightningModule):
    """One value per sample on ``(x, integer label)`` batches, with the loss of ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x).squeeze(-1)
        return out.sigmoid() if self.kind == "bce_of_sigmoid" else out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out, y = self(batch[0]), batch[1].float()
        if self.kind == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(out, y)
        if self.kind == "bce_of_sigmoid":
            return F.binary_cross_entropy(out, y.clamp(0, 1))
        if self.kind == "hinge":
            return F.relu(1 - (2 * y - 1) * out).mean()
        if self.kind == "poisson":
            return F.poisson_nll_loss(out, y)
        return F.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _digit_batch(n: int = 32) -> tuple[Tensor, Tensor]:
    x, y = digits(n, flatten=True).tensors
    return x, y


def _labels(n: int, high: int, seed: int = 0) -> Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


def _probe(module: pl.LightningModule, batch: Any) -> tuple[StepProbe, list[Tensor]]:
    torch.manual_seed(0)
    _, _, tensors = record_predictions(module, batch)
    return StepProbe(module), tensors


def test_a_loss_that_ignores_the_labels_is_told_apart_from_one_that_reads_them() -> None:
    torch.manual_seed(0)
    batch = _digit_batch()
    vae = VAE()
    probe, tensors = _probe(vae, batch)
    why = labels_ignored(probe, batch, batch[1], tensors)
    assert why is not None and "labels permuted" in why
    task = step_task(probe, batch, tensors[0], batch[1], tensors)
    assert task.kind == "unknown" and task.reason.startswith("64-class logits by the shapes")
    wide = Wide()
    probe, tensors = _probe(wide, batch)
    assert labels_ignored(probe, batch, batch[1], tensors) is None
    assert step_task(probe, batch, tensors[0], batch[1], tensors).describe() == "64-class logits"


def test_a_loss_that_barely_moves_with_the_labels_on_one_roll_still_reads_them() -> None:
    # a softmax before cross-entropy: the loss moves with the labels by ~1e-3 of itself, but on
    # the dict-batches family's seed 8 the roll by one sample moves it by 2e-7 (below
    # SAME_LOSS_TOL); the next roll tells, and the squashed output is caught
    from lightning_diag.isolation import first_batches
    from tests.families import FAMILIES

    torch.manual_seed(8)
    fam = FAMILIES["dict_batches"]("softmax_before_loss")
    batches = first_batches(fam.train, 5, torch.device("cpu"))
    result = overfit_batches(fam.module, batches, max_steps=1, lr_ladder=False)
    assert result.task == "10-class logits" and result.squashed


def test_outputs_equal_on_every_sample_cannot_tell() -> None:
    # a network that ignores its inputs gives one output for all: a permutation of the labels
    # changes no cross-entropy, yet the loss reads them
    batch = _digit_batch()
    probe, tensors = _probe(Wide(constant=True), batch)
    assert labels_ignored(probe, batch, batch[1], tensors) is None


def test_a_target_the_batch_does_not_hold_cannot_be_permuted() -> None:
    batch = _digit_batch()
    probe, tensors = _probe(VAE(), batch)
    assert labels_ignored(probe, batch, batch[1].clone(), tensors) is None  # built, not found
    same = (batch[0], torch.zeros(32, dtype=torch.long))
    assert labels_ignored(probe, same, same[1], tensors) is None  # one label: nothing moves
    assert replace_leaf([batch[0], {"y": batch[1]}], batch[1], batch[1] + 1)[1]["y"].equal(
        batch[1] + 1)


def test_the_vae_is_judged_by_its_loss_alone_in_the_initial_loss_check() -> None:
    torch.manual_seed(0)
    x, y = digits(96, flatten=True).tensors
    found = check_initial_loss(VAE(), [(x[i:i + 32], y[i:i + 32]) for i in (0, 32, 64)])
    ok = next(f for f in found if f.code == "initial_loss.ok")
    assert ok.details["task"] == "unknown" and "labels permuted" in ok.details["task_reason"]
    assert not any(h["scores"] for h in ok.details["heads"])  # judged as values
    assert "closed_form" not in ok.details  # no log 64
    assert not {f.code for f in found} & {"initial_loss.collapsed", "initial_loss.mismatch"}


def test_the_vae_is_judged_by_its_loss_alone_in_the_overfit_test() -> None:
    torch.manual_seed(0)
    x, y = digits(160, flatten=True).tensors
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 160, 32)]
    result = overfit_batches(VAE(), batches, max_steps=20, lr_ladder=False)
    assert result.task == "unknown" and result.best_accuracy is None
    # a 64-way classifier of the same labels still needs its accuracy
    wide = overfit_batches(Wide(), batches, max_steps=20, lr_ladder=False)
    assert wide.task == "64-class logits" and wide.best_accuracy is not None


@pytest.mark.parametrize(("kind", "binary"), [
    ("bce_with_logits", True), ("bce_of_sigmoid", True), ("hinge", True),
    ("poisson", False), ("mse", False)])
def test_one_output_per_sample_is_binary_only_when_the_loss_scores_it_so(kind: str,
                                                                          binary: bool) -> None:
    torch.manual_seed(0)
    module = OneOutput(kind)
    batch = (torch.randn(32, 16), _labels(32, 3))  # labels 0, 1 and 2
    _, predictions, tensors = record_predictions(module, batch)
    assert binary_scores(StepProbe(module), batch, batch[1], predictions[0],
                         tensors[0]) is binary
    expected = (2, BINARY) if binary else None
    assert output_classes(module, batch, batch[1]) == expected


def test_the_class_count_of_an_output_width_needs_a_loss_that_reads_the_labels() -> None:
    torch.manual_seed(0)
    batch = _digit_batch()
    assert output_classes(Wide(), batch, batch[1]) == (64, WIDTH)
    assert output_classes(VAE(), batch, batch[1]) is None  # from the labels: 10 digits


def _fit(tmp_path: Path, module: pl.LightningModule, train: TensorDataset,
         val: TensorDataset) -> DataInspection:
    check = DataInspection()
    trainer(tmp_path, [check], logger=False, max_steps=1, limit_val_batches=0).fit(
        module, loader(train, 32), loader(val, 64, shuffle=False))
    return check


def _binary_data(with_2: bool) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(256, generator=g) > 0).long()
    if with_2:
        y[torch.arange(0, 256, 10)] = 2  # "unknown" coded as 2 in a 0/1 column
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


def test_a_label_2_for_a_single_logit_is_out_of_range(tmp_path: Path) -> None:
    check = _fit(tmp_path, OneOutput("bce_with_logits"), *_binary_data(with_2=True))
    bad = [f for f in check.findings if f.code == "data.label_out_of_range"]
    assert [f.details["split"] for f in bad] == ["train", "validation"]
    assert bad[0].value == 20 and "scores as a binary (0/1) classifier" in bad[0].message
    healthy = _fit(tmp_path, OneOutput("bce_with_logits"), *_binary_data(with_2=False))
    assert codes(healthy.findings) == set(), [f.format() for f in healthy.findings]
    summary = next(f for f in healthy.findings if f.code == "data.summary")
    assert "2 classes, the model's one output per sample" in summary.message


def test_a_vae_s_digit_labels_are_counted_from_the_labels(tmp_path: Path) -> None:
    data = digits(512, flatten=True)
    train = TensorDataset(*(t[:384] for t in data.tensors))
    val = TensorDataset(*(t[384:] for t in data.tensors))
    torch.manual_seed(0)
    check = _fit(tmp_path, VAE(), train, val)
    assert codes(check.findings) == set(), [f.format() for f in check.findings]
    summary = next(f for f in check.findings if f.code == "data.summary")
    assert "10 classes, inferred from the labels of both splits" in summary.message

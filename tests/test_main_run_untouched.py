"""Section 6 of issue 2: with the fit-start checks attached, the main run is bit-identical."""

import random

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_diag.callbacks.gradient_check import GradientCheck
from lightning_diag.callbacks.initial_loss import InitialLossCheck
from lightning_diag.callbacks.overfit import OverfitSmallBatch
from tests.helpers import Classifier, cnn, digits, loader, trainer


class BatchOrder(pl.Callback):
    def __init__(self):
        self.targets = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.targets.append(batch[1].clone())


def run(tmp_path, checks):
    pl.seed_everything(0, workers=True)
    model = Classifier(cnn(dropout=0.5), lr=1e-2, optimizer="sgd", weight_decay=1e-3)
    order = BatchOrder()
    dl = loader(digits(96), batch_size=16, shuffle=True, seed=3)
    t = trainer(tmp_path, [*checks, order], logger=False, deterministic=True, max_epochs=2,
                limit_train_batches=4)
    t.fit(model, dl)
    after = (torch.rand(3), np.random.rand(3), random.random(), dl.generator.get_state())
    return model, t.optimizers[0].state_dict(), order.targets, after


def test_fit_start_checks_leave_the_main_run_bit_identical(tmp_path):
    checks = [InitialLossCheck(), GradientCheck(coords_per_tensor=2),
              OverfitSmallBatch(num_batches=2, max_steps=30)]
    base_model, base_opt, base_order, base_rng = run(tmp_path / "a", [])
    model, opt, order, rng = run(tmp_path / "b", checks)
    assert all(len(c.findings) > 0 for c in checks)  # they did run
    for (name, a), b in zip(base_model.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm buffers
    for key, state in base_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], opt["state"][key]["momentum_buffer"])
    assert len(order) == len(base_order) == 8
    assert all(torch.equal(a, b) for a, b in zip(base_order, order, strict=True))
    assert torch.equal(base_rng[0], rng[0]) and np.array_equal(base_rng[1], rng[1])
    assert base_rng[2] == rng[2] and torch.equal(base_rng[3], rng[3])


class Augmented(torch.utils.data.Dataset):
    """Digits with noise drawn from the dataset's own generators (NumPy and torch), as
    reproducible augmentation is often written: reading a sample advances them."""

    def __init__(self, n: int = 96) -> None:
        self.x, self.y = digits(n).tensors
        self.np_rng = np.random.default_rng(0)
        self.torch_rng = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        noise = torch.randn(self.x[i].shape, generator=self.torch_rng)
        scale = float(self.np_rng.uniform(0.0, 0.1))
        return self.x[i] + scale * noise, self.y[i]


def run_augmented(tmp_path, checks):
    from lightning_diag.callbacks import DataInspection

    pl.seed_everything(0, workers=True)
    model = Classifier(cnn(dropout=0.5), lr=1e-2, optimizer="sgd")
    data = Augmented()
    t = trainer(tmp_path, [*checks, DataInspection()] if checks else [],
                logger=False, deterministic=True, max_epochs=1, limit_train_batches=3)
    t.fit(model, loader(data, batch_size=16, shuffle=True, seed=3))
    return model, data


def test_a_datasets_own_generators_are_left_where_the_run_had_them(tmp_path):
    """The side experiments and the inspection read samples, which draws from the dataset's
    own generators: they are put back, so the run's augmentations are those of a run without
    the callbacks."""
    base, base_data = run_augmented(tmp_path / "a", [])
    checks = [InitialLossCheck(), GradientCheck(coords_per_tensor=2),
              OverfitSmallBatch(num_batches=2, max_steps=10, progress_bar=False)]
    model, data = run_augmented(tmp_path / "b", checks)
    assert all(len(c.findings) > 0 for c in checks)
    for (name, a), b in zip(base.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(base_data.torch_rng.get_state(), data.torch_rng.get_state())
    assert base_data.np_rng.bit_generator.state == data.np_rng.bit_generator.state


def test_a_step_editing_its_batch_in_place_leaves_the_dataset_alone(tmp_path):
    """A loader without automatic batching hands out the dataset's own tensors: the side
    experiments give the step copies, so an in-place edit (``x /= 2``) stays on them."""
    class InPlace(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            x /= 2
            return super().training_step((x, y), batch_idx)

    x, y = digits(64).tensors
    batches = [(x[i:i + 16].clone(), y[i:i + 16].clone()) for i in range(0, 64, 16)]
    before = [b[0].clone() for b in batches]
    checks = [InitialLossCheck(), GradientCheck(coords_per_tensor=2),
              OverfitSmallBatch(num_batches=2, max_steps=10, progress_bar=False)]
    t = trainer(tmp_path, checks, logger=False, max_epochs=1, limit_train_batches=0)
    t.fit(InPlace(cnn()), torch.utils.data.DataLoader(batches, batch_size=None))
    assert all(len(c.findings) > 0 for c in checks)
    assert all(torch.equal(a, b[0]) for a, b in zip(before, batches, strict=True))

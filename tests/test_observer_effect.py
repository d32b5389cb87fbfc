"""No observer effect: attaching any diagnostic leaves the training run bit-identical.

Every run uses ``seed_everything(0, workers=True)``, ``deterministic=True``, a shuffled loader with
its own generator and a CNN with dropout and BatchNorm that records a fingerprint of every batch it
trains on. A run with callbacks must match the run without them in every parameter, buffer and
optimizer-state tensor (``torch.equal``), in batch order and in the global RNG streams at the end.
A negative control (a callback drawing one random number) proves the comparison can fail.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.callbacks.data_inspection import DataInspection
from lightning_diag.callbacks.ema import EMAWeights
from lightning_diag.callbacks.first_layer import FirstLayerVisualization
from lightning_diag.callbacks.gradient_check import GradientCheck
from lightning_diag.callbacks.initial_loss import InitialLossCheck
from lightning_diag.callbacks.invariants import TrainingInvariants
from lightning_diag.callbacks.learning_curves import LearningCurves
from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.callbacks.overfit import OverfitSmallBatch
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.examples.digits import load_digits_tensors
from tests.helpers import Classifier, cnn

# Tiny settings for every callback: side experiments short, monitors firing several times,
# figures (the costly part, and unrelated to training) drawn once at the end.
FACTORIES: dict[str, Callable[[], pl.Callback]] = {
    "InitialLossCheck": lambda: InitialLossCheck(num_batches=2),
    "GradientCheck": lambda: GradientCheck(num_samples=2, coords_per_tensor=2),
    "OverfitSmallBatch": lambda: OverfitSmallBatch(num_batches=1, max_steps=20,
                                                   progress_bar=False),
    "ActivationHistogram": lambda: ActivationHistogram(every_n_steps=3, figure_every_n_logs=0),
    "UpdateRatioMonitor": lambda: UpdateRatioMonitor(every_n_steps=3),
    "TrainingInvariants": lambda: TrainingInvariants(every_n_steps=1),
    "FirstLayerVisualization": lambda: FirstLayerVisualization(every_n_epochs=2),
    "LearningCurves": lambda: LearningCurves(figure_every_n_epochs=0),
    "DataInspection": lambda: DataInspection(max_images=2),
    "LRPlateauAdvisor": lambda: LRPlateauAdvisor(patience=1, min_epochs=1, min_history=2),
    "EMAWeights": lambda: EMAWeights(decay=0.9, evaluate="raw"),
    "EMAWeights-ema": lambda: EMAWeights(decay=0.9, evaluate="ema"),
    "EMAWeights-both": lambda: EMAWeights(decay=0.9, evaluate="both"),
    "CheckpointEnsemble": lambda: CheckpointEnsemble(k=2),
}
ALL_TOGETHER = [name for name in FACTORIES if not name.startswith("EMAWeights-")]

SETUPS: dict[str, dict[str, Any]] = {
    "plain": {},
    "accumulate2": {"accumulate_grad_batches": 2},
    "bf16": {"precision": "bf16-mixed"},
    "workers2": {"num_workers": 2},
}


class Recorder(Classifier):
    """The helpers' classifier, remembering a fingerprint of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__(cnn(dropout=0.2), lr=1e-2)
        self.seen: list[tuple[tuple[int, ...], float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append((tuple(y.tolist()), float(x.double().sum())))
        return super().training_step(batch, batch_idx)


class DrawsOneNumber(pl.Callback):
    """Negative control: one draw from the global RNG changes the later dropout masks."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 2:
            torch.rand(1)


def _data() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits_tensors()
    return TensorDataset(x[:128].clone(), y[:128].clone()), TensorDataset(x[128:192].clone(),
                                                                          y[128:192].clone())


def train(callbacks: list[pl.Callback], root: Path, num_workers: int = 0,
          **trainer_kwargs: Any) -> dict[str, Any]:
    """Fit the recorder for 2 epochs of 8 batches; return everything that must not change."""
    pl.seed_everything(0, workers=True)
    train_set, val_set = _data()
    gen = torch.Generator().manual_seed(1234)
    train_dl = DataLoader(train_set, batch_size=16, shuffle=True, generator=gen,
                          num_workers=num_workers, persistent_workers=num_workers > 0)
    val_dl = DataLoader(val_set, batch_size=32)
    model = Recorder()
    opts: dict[str, Any] = {
        "max_epochs": 2, "accelerator": "cpu", "devices": 1, "deterministic": True,
        "logger": TensorBoardLogger(str(root), name="tb", version=0), "callbacks": callbacks,
        "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "default_root_dir": str(root), "num_sanity_val_steps": 0,
    }
    opts.update(trainer_kwargs)
    trainer = pl.Trainer(**opts)
    trainer.fit(model, train_dl, val_dl)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "batches": list(model.seen),
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(),  # type: ignore[index]
                random.getstate()),
        "training": model.training,
    }


def _tensor_diffs(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in _tensor_diffs(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _tensor_diffs(x, y, f"{where}[{i}]")]
    if isinstance(a, np.ndarray):
        return [] if np.array_equal(a, b) else [where]
    return [] if a == b else [where]


def differences(base: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Names of everything that differs between two runs (empty: bit-identical)."""
    return _tensor_diffs(base, other, "run")


_BASELINES: dict[str, dict[str, Any]] = {}


@pytest.fixture(autouse=True)
def _restore_determinism_flag() -> Any:
    """``deterministic=True`` flips a process-wide torch flag; give other tests theirs back."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def baseline(setup: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if setup not in _BASELINES:
        _BASELINES[setup] = train([], tmp_path_factory.mktemp(f"base-{setup}"), **SETUPS[setup])
    return _BASELINES[setup]


def test_a_run_is_reproducible_and_fingerprints_every_batch(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    base = baseline("plain", tmp_path_factory)
    again = train([], tmp_path_factory.mktemp("again"))
    assert differences(base, again) == []
    assert len(base["batches"]) == 16 and len(set(base["batches"])) == 16
    # shuffled: the first epoch does not read the dataset in order
    first_labels = [y for labels, _ in base["batches"][:8] for y in labels]
    assert first_labels != _data()[0].tensors[1].tolist()


def test_negative_control_one_random_draw_is_detected(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    base = baseline("plain", tmp_path_factory)
    other = train([DrawsOneNumber()], tmp_path_factory.mktemp("control"))
    diffs = differences(base, other)
    assert any(d.startswith("run.state") for d in diffs), diffs
    assert "run.batches" not in diffs  # the loader has its own generator: order is unchanged


@pytest.mark.parametrize("name", list(FACTORIES))
def test_each_callback_alone_leaves_training_bit_identical(
        name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = baseline("plain", tmp_path_factory)
    callback = FACTORIES[name]()
    run = train([callback], tmp_path_factory.mktemp(name))
    assert differences(base, run) == []
    assert len(callback.hooks) == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("setup", list(SETUPS))
def test_all_callbacks_together_leave_training_bit_identical(
        setup: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = baseline(setup, tmp_path_factory)
    callbacks = [FACTORIES[name]() for name in ALL_TOGETHER]
    run = train(callbacks, tmp_path_factory.mktemp(f"all-{setup}"), **SETUPS[setup])
    assert differences(base, run) == []
    ran = {type(cb).__name__: cb.findings for cb in callbacks}  # type: ignore[attr-defined]
    # the side experiments really ran (not skipped), or the comparison proves nothing
    for check in ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch"):
        assert ran[check] and not any(f.code.endswith(".skipped") for f in ran[check]), ran[check]

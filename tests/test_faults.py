"""Faults and the states they leave: exceptions, interrupts, resume, mid-swap checkpoints, NaN.

* An exception (or Ctrl+C) in training reaches the caller, and so does Ctrl+C inside a side
  experiment. An exception the user's ``training_step`` raises on a side experiment's copy is the
  user's error but not the run's: the check reports ``<slug>.user_error`` naming the step and
  steps aside, and the fit goes on (the main run never met it; if it does, it raises there). In
  every case every module and tensor hook is gone; the model keeps its dtype and mode (its
  weights too when the fault stopped it before the first step); no temp file is left.
* A run resumed from a mid-epoch checkpoint gets every callback's state back exactly, and the
  fit-start side experiments do not run again.
* A checkpoint written while the EMA weights are swapped in holds the raw weights.
* A NaN loss mid-run: monitors carry on, EMA keeps the last finite average, the advisor reports
  ``advisor.divergence``.
"""

from __future__ import annotations

import copy
import signal
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_diag.base import DiagnosticCallback
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
from lightning_diag.findings import Severity
from tests.helpers import Classifier, cnn, digits, loader, trainer

RAISED: list[str] = []  # where Faulty raised: "copy" or "live" (a global: copies share it)
SIDE_EXPERIMENTS = ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch", "DataInspection")


def every_callback(ensemble_dir: Path | None = None) -> list[DiagnosticCallback]:
    return [
        InitialLossCheck(num_batches=1),
        GradientCheck(num_samples=2, coords_per_tensor=2),
        OverfitSmallBatch(num_batches=1, max_steps=10, progress_bar=False),
        DataInspection(max_images=2),
        ActivationHistogram(every_n_steps=1, figure_every_n_logs=0),
        UpdateRatioMonitor(every_n_steps=1),
        TrainingInvariants(every_n_steps=1),
        FirstLayerVisualization(every_n_epochs=5),
        LearningCurves(),
        LRPlateauAdvisor(patience=1, min_epochs=1, min_history=2, save_batch=False),
        EMAWeights(decay=0.9, evaluate="ema"),
        CheckpointEnsemble(k=2, dirpath=ensemble_dir),
    ]


class Faulty(Classifier):
    """Raises ``error`` in ``training_step`` at ``at_step`` (the live module), or in copies only."""

    def __init__(self, error: BaseException | None = None, at_step: int = 3,
                 in_copy: bool = False, nan_at: int | None = None) -> None:
        super().__init__(cnn(dropout=0.2), lr=1e-2)
        self.error, self.at_step, self.in_copy, self.nan_at = error, at_step, in_copy, nan_at
        self.live_id = id(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        is_copy = id(self) != self.live_id
        if self.error is not None and is_copy == self.in_copy and (
                is_copy or self.trainer.global_step == self.at_step):
            RAISED.append("copy" if is_copy else "live")
            raise self.error
        loss = super().training_step(batch, batch_idx)
        if not is_copy and self.nan_at is not None and self.trainer.global_step == self.nan_at:
            loss = loss * float("nan")
        return loss


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory as the process's temp dir, to see whether anything is left there."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture
def sigint_restored() -> Any:
    """Lightning ignores SIGINT after a KeyboardInterrupt: give the test process its handler."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


#: fault -> (the error, raised in the copy?, what reaches the caller: None when the fit completes)
FAULTS: dict[str, tuple[Any, bool, type[BaseException] | None]] = {
    "error_in_training": (lambda: RuntimeError("boom"), False, RuntimeError),
    "error_in_side_experiment": (lambda: RuntimeError("boom"), True, None),
    # Lightning turns Ctrl+C into a graceful shutdown ending in sys.exit(1)
    "ctrl_c_in_training": (lambda: KeyboardInterrupt(), False, SystemExit),
    "ctrl_c_in_side_experiment": (lambda: KeyboardInterrupt(), True, SystemExit),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_reaches_whom_it_concerns_and_leaves_no_trace(
        fault: str, tmp_path: Path, private_tmp: Path, sigint_restored: Any) -> None:
    make_error, in_copy, expected = FAULTS[fault]
    model = Faulty(make_error(), at_step=3, in_copy=in_copy)
    model.train()
    before = copy.deepcopy(model.state_dict())
    callbacks = every_callback()
    if in_copy:  # only one side experiment, so that it is the one that meets the error
        callbacks = [cb for cb in callbacks if type(cb).__name__ not in
                     ("InitialLossCheck", "GradientCheck")]
    rng = torch.get_rng_state()
    t = trainer(tmp_path, list[pl.Callback](callbacks), max_epochs=2)
    RAISED.clear()
    data = loader(digits(64), batch_size=16), loader(digits(32), shuffle=False)
    if expected is None:
        t.fit(model, *data)
        assert t.global_step == 8  # 2 epochs of 4 batches: the run went on
        overfit = next(cb for cb in callbacks if isinstance(cb, OverfitSmallBatch))
        assert [(f.code, f.message) for f in overfit.findings] == [(
            "overfit.user_error",
            "OverfitSmallBatch did not run: `Faulty.training_step` raised RuntimeError: boom")]
        assert not any(f.code.endswith(".error") for cb in callbacks for f in cb.findings)
    else:
        with pytest.raises(expected):
            t.fit(model, *data)
    where = "copy" if in_copy else "live"
    # a copy raising lets the fit go on: DataInspection's copy (run once for the model's output
    # width, the error left to the side experiments to report) raises too
    assert [where] * (2 if in_copy and expected is None else 1) == RAISED
    assert all(len(cb.hooks) == 0 for cb in callbacks)
    assert hook_count(model) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ema = next(cb for cb in callbacks if isinstance(cb, EMAWeights))
    assert ema._slots is None or not ema._slots.swapped_in  # nothing left swapped in
    # Ctrl+C in the copy stopped the run before the first step: weights and RNG streams as before
    if in_copy and expected is not None:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(rng, torch.get_rng_state())
        assert model.training
    assert list(private_tmp.iterdir()) == []
    leftovers = [p for p in tmp_path.rglob("*") if p.suffix in (".tmp", ".partial")]
    assert leftovers == []


def test_error_during_ema_validation_restores_raw_weights(tmp_path: Path) -> None:
    class FailsInValidation(Classifier):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if self.trainer.current_epoch == 1:
                self.raw_at_failure = {k: v.clone() for k, v in self.state_dict().items()}
                raise RuntimeError("validation boom")
            super().validation_step(batch, batch_idx)

    model = FailsInValidation(cnn(dropout=0.2), lr=1e-2)
    ema = EMAWeights(decay=0.9, evaluate="ema")
    t = trainer(tmp_path, [ema], max_epochs=2)
    with pytest.raises(RuntimeError, match="validation boom"):
        t.fit(model, loader(digits(64), batch_size=16), loader(digits(32), shuffle=False))
    # the weights seen in validation were the average; the raw ones came back afterwards
    average = ema.ema_state_dict()
    assert all(torch.equal(model.raw_at_failure[k], average[k]) for k in average)
    assert not ema._built().swapped_in
    assert any(not torch.equal(model.state_dict()[k], average[k]) for k in average
               if average[k].is_floating_point())


class SaveAt(pl.Callback):
    """Writes a checkpoint after the optimizer step ``step`` (mid-epoch)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


class StateProbe(pl.Callback):
    """Records every diagnostic's state when the resumed run starts training."""

    def __init__(self, callbacks: list[DiagnosticCallback]) -> None:
        self.callbacks = callbacks
        self.states: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states = {cb.state_key: copy.deepcopy(cb.state_dict()) for cb in self.callbacks}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_equal(x, y) for x, y in zip(a, b, strict=True)))
    return bool(a == b)


def test_resume_mid_epoch_restores_state_and_skips_side_experiments(tmp_path: Path) -> None:
    ckpt = tmp_path / "mid.ckpt"
    # the ensemble continues its list in the same directory (another one starts a new list)
    first = every_callback(tmp_path / "ensemble")
    t = trainer(tmp_path / "a", [*first, SaveAt(6, ckpt)], max_epochs=2)
    t.fit(Faulty(), loader(digits(64), batch_size=16), loader(digits(32), shuffle=False))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    by_name = {type(cb).__name__: cb for cb in first}
    assert saved[by_name["EMAWeights"].state_key]["num_updates"] == 6
    assert saved[by_name["LRPlateauAdvisor"].state_key]["history"]  # epoch 0 is recorded
    assert len(saved[by_name["CheckpointEnsemble"].state_key]["kept"]) == 1

    second = every_callback(tmp_path / "ensemble")
    probe = StateProbe(second)
    t2 = trainer(tmp_path / "b", [*second, probe], max_epochs=2)
    t2.fit(Faulty(), loader(digits(64), batch_size=16), loader(digits(32), shuffle=False),
           ckpt_path=str(ckpt))
    for cb in second:
        assert cb.state_key in saved, type(cb).__name__
        assert _equal(probe.states[cb.state_key], saved[cb.state_key]), type(cb).__name__
    for cb in second:
        if type(cb).__name__ in SIDE_EXPERIMENTS:
            assert [f.code for f in cb.findings] == [f"{cb.slug}.skipped"], cb.findings
            assert "resumed" in cb.findings[0].message


def test_checkpoint_written_mid_swap_holds_raw_weights(tmp_path: Path) -> None:
    class SaveDuringValidation(pl.Callback):
        def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                    *args: Any) -> None:
            if trainer.current_epoch == 1 and not (tmp_path / "swap.ckpt").exists():
                self.live = {k: v.clone() for k, v in pl_module.state_dict().items()}
                trainer.save_checkpoint(tmp_path / "swap.ckpt")

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:
                self.raw = {k: v.clone() for k, v in pl_module.state_dict().items()}

    ema = EMAWeights(decay=0.9, evaluate="ema")
    saver = SaveDuringValidation()
    t = trainer(tmp_path, [ema, saver], max_epochs=2)
    t.fit(Classifier(cnn(dropout=0.2), lr=1e-2), loader(digits(64), batch_size=16),
          loader(digits(32), shuffle=False))
    ckpt = torch.load(tmp_path / "swap.ckpt", map_location="cpu", weights_only=True)
    average = ckpt["callbacks"][ema.state_key]["ema"]
    # the saver really ran mid-swap: the live module held the average then
    assert all(torch.equal(saver.live[k], average[k].to(saver.live[k].dtype)) for k in average)
    assert all(torch.equal(ckpt["state_dict"][k], saver.raw[k]) for k in saver.raw)
    assert any(not torch.equal(ckpt["state_dict"][k], average[k]) for k in average
               if average[k].is_floating_point())


def test_nan_loss_mid_run(tmp_path: Path) -> None:
    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 4:  # after the last finite step's EMA update
                self.ema_before_nan = ema.ema_state_dict()

    ema = EMAWeights(decay=0.9, evaluate="raw")
    advisor = LRPlateauAdvisor(save_batch=False)
    monitors = [ActivationHistogram(every_n_steps=1, figure_every_n_logs=0),
                UpdateRatioMonitor(every_n_steps=1), LearningCurves()]
    probe = Probe()
    t = trainer(tmp_path, [*monitors, ema, advisor, probe], max_epochs=2)
    t.fit(Faulty(nan_at=4), loader(digits(64), batch_size=16), loader(digits(32), shuffle=False))
    assert not all(torch.isfinite(p).all() for p in t.lightning_module.parameters())  # diverged
    after = ema.ema_state_dict()
    assert all(torch.equal(after[k], probe.ema_before_nan[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert ema.num_updates == 4 and ema.num_skipped == 4
    assert [f.code for f in ema.findings] == ["ema.non_finite", "ema.summary"]
    assert "EMA of 4 update(s) (decay 0.9, 4 skipped on a non-finite loss)" in (
        ema.findings[1].message)
    divergence = [f for f in advisor.findings if f.code == "advisor.divergence"]
    assert len(divergence) == 1 and divergence[0].severity is Severity.FAIL
    assert divergence[0].step == 4

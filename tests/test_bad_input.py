"""Bad input: clear findings or errors naming the problem and the fix, never an internal traceback.

Covers an IterableDataset without ``len``, empty dataloaders, dict batches, a model without logits,
a ``training_step`` returning None, histograms of all-NaN, empty, huge and bf16 tensors, a bad value
for every argument of every callback (TypeError for a wrong type, ValueError for a bad value), and
the user's own ``forward``, ``configure_optimizers`` and ``__getitem__`` raising.
"""

from __future__ import annotations

import inspect
import math
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    SubsetRandomSampler,
    TensorDataset,
)

import lightning_diag.callbacks
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
from lightning_diag.checks.initial_loss import check_initial_loss
from lightning_diag.checks.overfit import overfit_batches
from lightning_diag.findings import Severity
from lightning_diag.functional.monitors import histogram_row, layer_stats
from tests.helpers import Classifier, digits, mlp, trainer
from tests.shared_cases import declared

FIT_START = ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch", "DataInspection")


def every_callback() -> dict[str, DiagnosticCallback]:
    return {
        "InitialLossCheck": InitialLossCheck(num_batches=1),
        "GradientCheck": GradientCheck(num_samples=2, coords_per_tensor=2),
        "OverfitSmallBatch": OverfitSmallBatch(num_batches=1, max_steps=5, progress_bar=False),
        "DataInspection": DataInspection(max_images=2),
        "ActivationHistogram": ActivationHistogram(every_n_steps=1, figure_every_n_logs=0),
        "UpdateRatioMonitor": UpdateRatioMonitor(every_n_steps=1),
        "TrainingInvariants": TrainingInvariants(every_n_steps=1),
        "FirstLayerVisualization": FirstLayerVisualization(),
        "LearningCurves": LearningCurves(),
        "LRPlateauAdvisor": LRPlateauAdvisor(save_batch=False),
        "EMAWeights": EMAWeights(decay=0.9),
        "CheckpointEnsemble": CheckpointEnsemble(k=2),
    }


def fit_all(tmp_path: Path, model: Any, train: Any, val: Any = None,
            **kw: Any) -> dict[str, DiagnosticCallback]:
    """Fit with every callback; an error must come from the user's side, not our internals."""
    callbacks = every_callback()
    t = trainer(tmp_path, list(callbacks.values()), **{"max_epochs": 1, **kw})
    try:
        t.fit(model, train, val)
    except Exception as err:
        frames = [f.filename for f in traceback.extract_tb(err.__traceback__)]
        raise AssertionError(f"fit raised {type(err).__name__}: {err} (last frame "
                             f"{frames[-1]})") from err
    assert all(len(cb.hooks) == 0 for cb in callbacks.values())
    return callbacks


class Stream(IterableDataset):
    """An IterableDataset without ``__len__``."""

    def __init__(self, n: int = 64) -> None:
        self.data = digits(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.data)


def test_iterable_dataset_without_len(tmp_path: Path) -> None:
    cbs = fit_all(tmp_path, Classifier(mlp()), DataLoader(Stream(), batch_size=16))
    data = cbs["DataInspection"].findings
    assert [f.code for f in data] == ["data.skipped"]
    assert "map-style" in data[0].message
    for name in ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch"):
        assert not any(f.code.endswith(".skipped") for f in cbs[name].findings), name


def test_empty_train_dataloader(tmp_path: Path) -> None:
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    cbs = fit_all(tmp_path, Classifier(mlp()), DataLoader(empty, batch_size=16))
    for name in ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch"):
        notes = [f for f in cbs[name].findings if f.code.endswith(".skipped")]
        assert notes and notes[0].severity is Severity.INFO, (name, cbs[name].findings)
        assert "empty" in notes[0].message, notes[0].message
    data = cbs["DataInspection"].findings
    assert all(f.severity is Severity.INFO for f in data)
    assert any("empty" in f.message for f in data), [f.message for f in data]


def test_empty_validation_dataloader(tmp_path: Path) -> None:
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    train = DataLoader(digits(32), batch_size=16)
    cbs = fit_all(tmp_path, Classifier(mlp()), train, DataLoader(empty, batch_size=16),
                  max_epochs=2)
    assert cbs["EMAWeights"].num_updates == 4  # type: ignore[attr-defined]
    assert any(f.code == "ensemble.skipped" for f in cbs["CheckpointEnsemble"].findings)


class DictData(Dataset):
    def __init__(self, n: int = 64) -> None:
        self.data = digits(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"image": x, "label": y}


class DictClassifier(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step((batch["image"], batch["label"]), batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step((batch["image"], batch["label"]), batch_idx)


def test_dict_batches(tmp_path: Path) -> None:
    loader = DataLoader(DictData(), batch_size=16)
    cbs = fit_all(tmp_path, DictClassifier(mlp()), loader, DataLoader(DictData(32), batch_size=16))
    for name in FIT_START:
        assert cbs[name].findings, name
        assert not any(f.code.endswith(".skipped") for f in cbs[name].findings), \
            (name, cbs[name].findings)
    assert cbs["DataInspection"].report is not None  # type: ignore[attr-defined]


class Regressor(Classifier):
    """No logits: predicts the digit's label as a number with a mean-squared error."""

    def __init__(self) -> None:
        super().__init__(mlp(classes=1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x).squeeze(1), y.float())
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x).squeeze(1), y.float()))


def test_model_without_logits(tmp_path: Path) -> None:
    train = DataLoader(digits(64), batch_size=16)
    cbs = fit_all(tmp_path, Regressor(), train, DataLoader(digits(32), batch_size=16))
    initial = cbs["InitialLossCheck"].findings
    # no task is inferred (integer labels against one value), yet the step's own loss at a zero
    # output, mean(y^2) of the labels, is the expectation
    (ok,) = [f for f in initial if f.code == "initial_loss.ok"]
    labels = digits(16).tensors[1].float()  # the check's one batch of 16
    assert ok.details["know_nothing_loss"] == pytest.approx(float((labels**2).mean()), rel=1e-5)
    assert ok.details["task"] == "unknown"
    assert all(f.severity is Severity.INFO for f in initial)
    overfit = cbs["OverfitSmallBatch"].findings
    assert overfit and not any(f.code.endswith(".skipped") for f in overfit)
    # no accuracy for a regression: the ensemble cannot rank by it and must say so, not crash
    assert cbs["CheckpointEnsemble"].findings


class NoneStep(Classifier):
    """A training_step returning None (Lightning skips the batch)."""

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        super().training_step(batch, batch_idx)


def test_training_step_returning_none(tmp_path: Path) -> None:
    callbacks = every_callback()
    t = trainer(tmp_path, list(callbacks.values()), max_epochs=1)
    t.fit(NoneStep(mlp()), DataLoader(digits(32), batch_size=16))
    for name in ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch"):
        found = callbacks[name].findings
        assert len(found) == 1 and found[0].severity is Severity.INFO, (name, found)
        assert "training_step" in found[0].message and "None" in found[0].message, found[0]
    assert all(len(cb.hooks) == 0 for cb in callbacks.values())


TENSORS: dict[str, Callable[[], torch.Tensor]] = {
    "all_nan": lambda: torch.full((4, 5), math.nan),
    "all_inf": lambda: torch.tensor([math.inf, -math.inf]),
    "empty": lambda: torch.zeros(0, 3),
    "scalar": lambda: torch.tensor(2.0),
    "huge": lambda: torch.tensor([[-3e38, 3e38], [1.0, math.inf]]),
    "constant": lambda: torch.ones(3, 4),
    "bf16": lambda: torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).bfloat16(),
    "fp16_huge": lambda: torch.tensor([[65504.0, -65504.0]], dtype=torch.float16),
}


@pytest.mark.parametrize("kind", list(TENSORS))
def test_histograms_and_statistics_never_raise(kind: str) -> None:
    x = TENSORS[kind]()
    row = histogram_row(x, bins=8)
    assert row.shape == (5 + 8,) and row.dtype == torch.float32
    finite = int(torch.isfinite(x.float()).sum())
    assert row[2].item() == finite and row[5:].sum().item() == finite
    assert layer_stats(x, bounds=(-1.0, 1.0)).shape == (5,)


@pytest.mark.parametrize("value", [math.nan, math.inf, 3e38])
def test_activation_histogram_on_bad_activations(value: float, tmp_path: Path) -> None:
    class Inject(nn.Module):
        """Puts ``value`` into the first activation of every training batch."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return x
            mask = torch.zeros_like(x, dtype=torch.bool)
            mask[0, 0] = True
            return torch.where(mask, torch.full_like(x, value), x)

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Inject(), nn.ReLU(), nn.Linear(16, 10))
    hist = ActivationHistogram(every_n_steps=1, figure_every_n_logs=1)
    t = trainer(tmp_path, [hist], max_steps=2)
    t.fit(Classifier(net), DataLoader(digits(32), batch_size=16))
    assert hist.last and len(hist.hooks) == 0


#: For each callback, bad values of every constructor argument and the exception each must
#: raise: the ``bad`` its test file declares in ``SHARED``.
BAD_ARGUMENTS: dict[type[DiagnosticCallback], list[tuple[str, Any, type[Exception]]]] = {
    shared.cls: shared.bad for shared in declared().values()}
CASES = [(cls, name, value, error) for cls, cases in BAD_ARGUMENTS.items()
         for name, value, error in cases]


def test_every_argument_of_every_callback_has_a_bad_value_case() -> None:
    assert {cls.__name__ for cls in BAD_ARGUMENTS} == set(lightning_diag.callbacks.__all__)
    for cls, cases in BAD_ARGUMENTS.items():
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert params == {name for name, _, _ in cases}, cls.__name__


@pytest.mark.parametrize(("cls", "name", "value", "error"), CASES,
                         ids=[f"{c.__name__}-{n}={v!r}" for c, n, v, _ in CASES])
def test_bad_argument_is_refused_naming_itself(cls: type[DiagnosticCallback], name: str,
                                               value: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        cls(**{name: value})
    message = str(info.value)
    assert type(info.value) is error, message  # TypeError: wrong type; ValueError: bad value
    assert message.startswith(f"`{name}") and " must be " in message, message
    assert ", got " in message and message.endswith("."), message


class Flaky(Dataset):
    """Digits whose sample 3 cannot be read; the training sampler skips it, the checks do not."""

    def __init__(self) -> None:
        self.data = digits(64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 3:
            raise ValueError("corrupt sample 3")
        return self.data[i]


def test_failing_getitem_is_named_as_the_users_error_not_a_skip(tmp_path: Path) -> None:
    readable = [i for i in range(64) if i != 3]
    train = DataLoader(Flaky(), batch_size=16, sampler=SubsetRandomSampler(readable))
    cbs = fit_all(tmp_path, Classifier(mlp()), train)
    for name in ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch"):
        (f,) = cbs[name].findings
        assert f.code == f"{cbs[name].slug}.user_error" and f.severity is Severity.WARN, f
        assert f"{name} did not run: `Flaky.__getitem__` (index 3) raised ValueError: corrupt " \
               "sample 3" == f.message
        assert f.details == {"where": "`Flaky.__getitem__` (index 3)", "exception": "ValueError"}
    unreadable = [f for f in cbs["DataInspection"].findings if f.code == "data.unreadable"]
    assert unreadable and unreadable[0].indices == (3,)
    assert "ValueError: corrupt sample 3" in unreadable[0].message


class ForwardFails(Classifier):
    """``training_step`` goes through ``self.net``; ``forward`` itself is broken."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("forward boom")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def test_a_broken_forward_the_step_never_calls_is_never_called(tmp_path: Path) -> None:
    """The checks read the output inside ``training_step`` (here ``self.net``'s), never by
    calling ``forward`` on a guessed input."""
    batch = next(iter(DataLoader(digits(32), batch_size=16)))
    found = check_initial_loss(ForwardFails(mlp()), [batch])
    assert "initial_loss.ok" in [f.code for f in found]
    assert "10-class logits" in next(f.message for f in found if f.code == "initial_loss.ok")
    assert overfit_batches(ForwardFails(mlp()), [batch], max_steps=2).task == "10-class logits"
    cbs = fit_all(tmp_path, ForwardFails(mlp()), DataLoader(digits(32), batch_size=16))
    for name in ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch"):
        assert not any(f.code.endswith(".user_error") for f in cbs[name].findings), name


class OptimizerFailsOnCopies(Classifier):
    """Builds its optimizer for the trainer, then raises when a copy asks again."""

    def __init__(self) -> None:
        super().__init__(mlp())
        self.live_id = id(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if id(self) != self.live_id:
            raise RuntimeError("needs the scheduler config")
        return super().configure_optimizers()


def test_failing_configure_optimizers_is_not_weight_decay_zero(tmp_path: Path) -> None:
    batch = next(iter(DataLoader(digits(32), batch_size=16)))
    found = check_initial_loss(OptimizerFailsOnCopies(), [batch])
    (opt,) = [f for f in found if "optimizer" in f.code or f.code.endswith("regularization")]
    assert opt.code == "initial_loss.optimizer_error" and opt.severity is Severity.WARN
    assert "could not be built" in opt.message and "weight decay 0" not in opt.message
    assert "`OptimizerFailsOnCopies.configure_optimizers` raised RuntimeError: needs the " \
           "scheduler config" in opt.message
    cbs = fit_all(tmp_path, OptimizerFailsOnCopies(), DataLoader(digits(32), batch_size=16))
    assert "initial_loss.optimizer_error" in [f.code for f in cbs["InitialLossCheck"].findings]
    (f,) = cbs["OverfitSmallBatch"].findings
    assert f.code == "overfit.user_error"
    assert "configure_optimizers` raised RuntimeError" in f.message

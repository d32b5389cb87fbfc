"""Every callback works, or skips with an info finding saying why, under common training setups.

One fit per setup runs every callback together (cached per module); each (setup, callback) case
then checks that callback's outcome. When the shared fit raises, the case reruns its callback
alone, so that the failure names the callback that causes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

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

FACTORIES: dict[str, Callable[[], DiagnosticCallback]] = {
    "InitialLossCheck": lambda: InitialLossCheck(num_batches=1),
    "GradientCheck": lambda: GradientCheck(num_samples=2, coords_per_tensor=2),
    "OverfitSmallBatch": lambda: OverfitSmallBatch(num_batches=1, max_steps=10,
                                                   progress_bar=False),
    "DataInspection": lambda: DataInspection(max_images=2),
    "ActivationHistogram": lambda: ActivationHistogram(every_n_steps=2, figure_every_n_logs=0),
    "UpdateRatioMonitor": lambda: UpdateRatioMonitor(every_n_steps=2),
    "TrainingInvariants": lambda: TrainingInvariants(every_n_steps=2),
    "FirstLayerVisualization": lambda: FirstLayerVisualization(every_n_epochs=5),
    "LearningCurves": lambda: LearningCurves(),
    "LRPlateauAdvisor": lambda: LRPlateauAdvisor(patience=1, min_epochs=1, save_batch=False),
    "EMAWeights": lambda: EMAWeights(decay=0.9, evaluate="ema"),
    "CheckpointEnsemble": lambda: CheckpointEnsemble(k=2),
}
SIDE_EXPERIMENTS = ("InitialLossCheck", "GradientCheck", "OverfitSmallBatch")


class Full(Classifier):
    """The helpers' classifier with test and predict steps."""

    def __init__(self) -> None:
        super().__init__(cnn(dropout=0.2), lr=1e-2)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(1)


class Manual(Full):
    """Manual optimization with one optimizer, or two (one per half of the network)."""

    def __init__(self, two_optimizers: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.two = two_optimizers

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        x, y = batch
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        loss = F.cross_entropy(self(x), y)
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", (self(x).argmax(1) == y).float().mean(), on_step=False,
                 on_epoch=True)

    def configure_optimizers(self) -> Any:
        if not self.two:
            return torch.optim.SGD(self.parameters(), lr=0.05)
        params = list(self.parameters())
        return [torch.optim.SGD(params[:4], lr=0.05), torch.optim.Adam(params[4:], lr=1e-3)]


SETUPS: dict[str, tuple[Callable[[], pl.LightningModule], dict[str, Any], bool]] = {
    # name: (model, trainer options, with a validation loader)
    "bf16_mixed": (Full, {"precision": "bf16-mixed"}, True),
    "accumulate": (Full, {"accumulate_grad_batches": 2}, True),
    "clipping": (Full, {"gradient_clip_val": 0.1}, True),
    "manual": (Manual, {}, True),
    "two_optimizers": (lambda: Manual(two_optimizers=True), {}, True),
    "fast_dev_run": (Full, {"fast_dev_run": True}, True),
    "max_steps_in_epoch": (Full, {"max_steps": 3}, True),
    "no_validation": (Full, {}, False),
}


def fit(names: list[str], setup: str, root: Path) -> dict[str, Any]:
    make_model, options, with_val = SETUPS[setup]
    callbacks = {name: FACTORIES[name]() for name in names}
    model = make_model()
    opts = {"max_epochs": 2, **options}
    t = trainer(root, list(callbacks.values()), **opts)
    val = loader(digits(32), shuffle=False) if with_val else None
    error: BaseException | None = None
    try:
        t.fit(model, loader(digits(64), batch_size=16), val)
    except Exception as err:  # reported by the cases, callback by callback
        error = err
    return {"callbacks": callbacks, "model": model, "trainer": t, "root": root, "error": error}


_RUNS: dict[tuple[str, str], dict[str, Any]] = {}


def run_for(setup: str, name: str, factory: pytest.TempPathFactory) -> dict[str, Any]:
    if (setup, "*") not in _RUNS:
        _RUNS[setup, "*"] = fit(list(FACTORIES), setup, factory.mktemp(setup))
    shared = _RUNS[setup, "*"]
    if shared["error"] is None:
        return shared
    if (setup, name) not in _RUNS:
        _RUNS[setup, name] = fit([name], setup, factory.mktemp(f"{setup}-{name}"))
    return _RUNS[setup, name]


def worked(name: str, cb: Any, run: dict[str, Any]) -> bool:
    """Whether the callback produced what it exists for in this run."""
    if name in SIDE_EXPERIMENTS:
        return any(not f.code.endswith(".skipped") for f in cb.findings)
    checks: dict[str, Callable[[], bool]] = {
        "DataInspection": lambda: cb.report is not None,
        "ActivationHistogram": lambda: bool(cb.last),
        "UpdateRatioMonitor": lambda: bool(cb.last),
        "TrainingInvariants": lambda: bool(cb.findings[-1].details["checked"]),
        "FirstLayerVisualization": lambda: any(run["root"].rglob("first_layer_step*.png")),
        "LearningCurves": lambda: bool(cb.history),
        "LRPlateauAdvisor": lambda: bool(cb.step_losses or cb.history),
        "EMAWeights": lambda: cb.num_updates > 0,
        "CheckpointEnsemble": lambda: bool(cb.kept) and all(Path(p).exists() for p in cb.paths),
    }
    return checks[name]()


def skip_notes(cb: Any) -> list[str]:
    return [f.message for f in cb.findings
            if f.severity is Severity.INFO and f.code.endswith((".skipped", ".not_found"))]


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("setup", list(SETUPS))
def test_callback_works_or_says_why_it_skips(setup: str, name: str,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    run = run_for(setup, name, tmp_path_factory)
    if run["error"] is not None:
        raise run["error"]
    cb = run["callbacks"][name]
    assert len(cb.hooks) == 0
    notes = skip_notes(cb)
    assert worked(name, cb, run) or notes, f"{name} under {setup}: no output, no reason given"
    if setup == "fast_dev_run" and (name in SIDE_EXPERIMENTS or name == "DataInspection"):
        assert notes and "fast_dev_run" in notes[0]
    if setup == "two_optimizers" and name in SIDE_EXPERIMENTS:  # no one loss for two steps
        assert notes and "manual optimization with 2 optimizers" in notes[0]
    if setup == "manual" and name in SIDE_EXPERIMENTS:  # the loss given to `manual_backward`
        assert worked(name, cb, run), f"{name} should run under manual optimization: {notes}"
    if setup in ("bf16_mixed", "accumulate", "clipping", "max_steps_in_epoch") and \
            name in (*SIDE_EXPERIMENTS, "ActivationHistogram", "UpdateRatioMonitor", "EMAWeights"):
        assert worked(name, cb, run), f"{name} should run under {setup}: {notes}"


def test_bf16_statistics_and_average_are_float32(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = run_for("bf16_mixed", "EMAWeights", tmp_path_factory)
    assert run["error"] is None
    ema = run["callbacks"]["EMAWeights"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in ema.ema_state_dict().values())
    hist = run["callbacks"]["ActivationHistogram"]
    assert all(math.isfinite(s["mean"]) and math.isfinite(s["grad_norm"])
               for s in hist.last.values() if not math.isnan(s["grad_norm"]))


def test_fit_then_validate_test_predict_without_ema_leak(tmp_path: Path) -> None:
    class WeightsSeen(pl.Callback):
        def __init__(self) -> None:
            self.seen: dict[str, dict[str, torch.Tensor]] = {}

        def _grab(self, stage: str, module: pl.LightningModule) -> None:
            self.seen.setdefault(stage, {k: v.clone() for k, v in module.state_dict().items()})

        def on_validation_batch_start(self, trainer: pl.Trainer, module: Any, *a: Any) -> None:
            self._grab("validate", module)

        def on_test_batch_start(self, trainer: pl.Trainer, module: Any, *a: Any) -> None:
            self._grab("test", module)

        def on_predict_batch_start(self, trainer: pl.Trainer, module: Any, *a: Any) -> None:
            self._grab("predict", module)

    ema = EMAWeights(decay=0.9, evaluate="ema")
    model = Full()
    t = trainer(tmp_path, [ema], max_epochs=2)
    val = loader(digits(32), shuffle=False)
    t.fit(model, loader(digits(64), batch_size=16), val)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    average = ema.ema_state_dict()
    assert any(not torch.equal(raw[k], average[k]) for k in raw if raw[k].is_floating_point())
    probe = WeightsSeen()
    t2 = trainer(tmp_path, [ema, probe])
    t2.validate(model, val, verbose=False)
    t2.test(model, val, verbose=False)
    t2.predict(model, val)
    for stage in ("validate", "test", "predict"):
        assert all(torch.equal(probe.seen[stage][k], raw[k]) for k in raw), stage
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)
    probe.seen.clear()
    with ema.swapped(model):  # asked for explicitly: the average is used, hooks leave it in
        t2.validate(model, val, verbose=False)
        t2.test(model, val, verbose=False)
        t2.predict(model, val)
    for stage in ("validate", "test", "predict"):
        assert all(torch.equal(probe.seen[stage][k], average[k].to(raw[k].dtype))
                   for k in raw), stage
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)

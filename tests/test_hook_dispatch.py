"""Issue 23 part 1: what Lightning dispatches to the callbacks on a step on which nothing logs.

Lightning calls every callable hook attribute of every callback on every batch (the per-epoch
ones ~6 times an epoch), each call in a profiler context with a name built from the callback's
``state_key`` (~3-5 us); it skips an attribute that is not callable. So a hook a diagnostic
callback does not implement (but the checkpoint ones, which Lightning calls directly) is None on
its instances, and a monitor's armed-step hooks are None while no step is armed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.trainer import call

from lightning_diag.base import BATCH_HOOKS, DiagnosticCallback
from lightning_diag.callbacks import (
    ActivationHistogram,
    EMAWeights,
    FirstLayerVisualization,
    LearningCurves,
    LRPlateauAdvisor,
    UpdateRatioMonitor,
)
from tests.helpers import Classifier, digits, loader, mlp, trainer


def dispatched(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """Counts, per (callback class, hook), the calls Lightning makes from now on."""
    counts: Counter[tuple[str, str]] = Counter()
    real = call._call_callback_hooks

    def counting(trainer: pl.Trainer, hook_name: str, *args: Any, **kwargs: Any) -> None:
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if callable(getattr(cb, hook_name)):
                counts[(type(cb).__name__, hook_name)] += 1
        real(trainer, hook_name, *args, **kwargs)

    monkeypatch.setattr(call, "_call_callback_hooks", counting)
    return counts


def test_on_a_step_on_which_nothing_logs_each_monitor_gets_one_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = dispatched(monkeypatch)
    cbs = [ActivationHistogram(every_n_steps=5, min_samples=1),
           UpdateRatioMonitor(every_n_steps=5, early_steps=False, min_samples=1),
           FirstLayerVisualization(input_shape=(8, 8)), LearningCurves(),
           LRPlateauAdvisor(save_batch=False), EMAWeights()]
    t = trainer(tmp_path, cbs, logger=False, max_epochs=2)
    t.fit(Classifier(mlp()), loader(digits(256), batch_size=32),
          loader(digits(64), batch_size=32, shuffle=False))
    steps, logged = t.global_step, 4  # 16 steps: 0, 5, 10, 15 logged
    assert steps == 16
    per_batch = {key: n for key, n in counts.items() if key[1] in BATCH_HOOKS}
    assert per_batch == {
        ("ActivationHistogram", "on_train_batch_start"): steps,
        ("ActivationHistogram", "on_before_optimizer_step"): logged,
        ("ActivationHistogram", "on_train_batch_end"): logged,
        ("UpdateRatioMonitor", "on_train_batch_start"): steps,
        ("UpdateRatioMonitor", "on_before_optimizer_step"): logged,
        ("UpdateRatioMonitor", "on_train_batch_end"): logged,
        ("LRPlateauAdvisor", "on_train_batch_end"): steps,
        ("EMAWeights", "on_train_batch_end"): steps,
    }  # no validation-batch hook, no backward hook, nothing for the per-epoch callbacks
    # nor, once an epoch, a hook a callback leaves as Lightning's no-op (~6 an epoch each)
    idle = {(name, hook) for (name, hook) in counts
            if getattr(type(next(cb for cb in cbs if type(cb).__name__ == name)), hook)
            is getattr(pl.Callback, hook)}
    assert not idle and ("LearningCurves", "on_train_epoch_end") in counts
    assert all(f.severity < "warn" for cb in cbs for f in cb.findings)
    assert len(cbs[1].medians) == logged  # the monitors measured what they measured before


class OnlyBatchEnd(DiagnosticCallback):
    slug = "only"

    def __init__(self) -> None:
        super().__init__()
        self.ends = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends += 1


class CallsSuper(OnlyBatchEnd):
    def on_train_batch_end(self, *args: Any) -> None:
        super().on_train_batch_end(*args)
        pl.Callback.on_validation_batch_end(self, *args)  # a hook nobody implements: a no-op

    def on_before_backward(self, *args: Any) -> None:
        super().on_before_backward(*args)  # the class's no-op, though the base's is None


def test_a_hook_not_implemented_is_none_on_the_instance_only() -> None:
    cb = CallsSuper()
    assert cb.on_validation_batch_end is None and cb.on_after_backward is None
    assert cb.on_train_epoch_end is None and cb.on_validation_end is None  # per-epoch ones too
    assert callable(cb.on_save_checkpoint) and callable(cb.state_dict)  # called directly
    assert callable(cb.on_train_batch_end) and callable(cb.on_before_backward)
    assert "on_validation_batch_end" not in vars(CallsSuper)  # the classes keep their hooks
    assert DiagnosticCallback.on_after_backward is pl.Callback.on_after_backward
    cb.on_train_batch_end(None, None, None, None, 0)
    cb.on_before_backward(None, None, None)
    assert cb.ends == 1 and not cb.findings  # no TypeError caught by the guard


def test_a_monitor_s_hooks_for_an_armed_step_come_back_when_one_is_armed() -> None:
    class Fake:
        global_step = 0
        training = True

    cb, fake = UpdateRatioMonitor(every_n_steps=10), Fake()
    cb.setup(fake, None, "fit")  # type: ignore[arg-type]
    assert cb.on_train_batch_end is None and cb.on_before_optimizer_step is None
    cb.on_train_batch_start(fake, None, None, 0)  # type: ignore[arg-type]  # step 0: logged
    assert callable(cb.on_train_batch_end) and callable(cb.on_before_optimizer_step)
    cb.on_train_batch_end(fake, None, None, None, 0)  # type: ignore[arg-type]
    assert cb._armed  # no optimizer step yet: still measuring

    class Always(UpdateRatioMonitor):  # a subclass's own hook runs on every batch
        def on_train_batch_end(self, *args: Any) -> None:
            super().on_train_batch_end(*args)

    always = Always()
    always.setup(fake, None, "fit")  # type: ignore[arg-type]
    assert callable(always.on_train_batch_end) and always.on_before_optimizer_step is None


def test_the_state_key_is_read_from_the_instance_and_built_again_when_an_argument_changes(
        ) -> None:
    cb = UpdateRatioMonitor(every_n_steps=10)
    key = cb.state_key
    assert vars(cb)["state_key"] is key  # a plain attribute read from now on
    cb.every_n_steps = 20
    assert "state_key" not in vars(cb) and "'every_n_steps': 20" in cb.state_key

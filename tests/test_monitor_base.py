"""The monitors' base (callbacks/_monitor.py): one settings record per callback, one logging
schedule, one lifecycle of a logging step; and the bounds on their size arguments (issue 22)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_diag.callbacks import (
    ActivationHistogram,
    LearningCurves,
    LRPlateauAdvisor,
    UpdateRatioMonitor,
)
from lightning_diag.callbacks._monitor import (
    ConfiguredCallback,
    MonitorCallback,
    next_logging_step,
)
from lightning_diag.checks.activations import MAX_BINS
from lightning_diag.checks.advisor import MAX_WINDOW
from lightning_diag.functional.monitors import is_logging_step
from lightning_diag.tensorboard.tags import UPDATE_RATIO_MEDIAN, activation_histogram, typed_layer
from lightning_diag.validation import argument, check_flag, check_int, validate_arguments
from tests.helpers import Classifier, digits, events, loader, mlp, trainer

CONFIGURED = [ActivationHistogram, UpdateRatioMonitor, LRPlateauAdvisor, LearningCurves]


@pytest.mark.parametrize("cls", CONFIGURED, ids=lambda c: c.__name__)
def test_the_settings_record_and_the_signature_agree(cls: type[ConfiguredCallback]) -> None:
    """Each argument is declared in the record (name, default, check) and in the signature
    (name, default): both hold the same names, in the same order, with the same defaults."""
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items()
              if name not in ("self", "strict")]
    fields = dataclasses.fields(cls.config_type)  # type: ignore[arg-type]
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [f.default for f in fields]
    cb = cls()
    assert cb.config == cls.config_type()  # type: ignore[misc]


def test_arguments_read_and_set_as_attributes_through_the_record() -> None:
    cb = ActivationHistogram(every_n_steps=7, dead_fraction=1)
    assert (cb.every_n_steps, cb.dead_fraction) == (7, 1.0)  # converted once, in the record
    key = cb.state_key
    cb.bins = 32
    assert cb.config.bins == 32 and cb.state_key == key.replace("'bins': 64", "'bins': 32")
    with pytest.raises(ValueError, match=r"^`bins` must be an int in \[1, 256\], got 1000\.$"):
        cb.bins = 1000  # a new record is validated like the first
    assert cb.config.bins == 32
    advisor = LRPlateauAdvisor(train_loss_key="loss/train")
    assert advisor.given["train_loss"] == "loss/train" and advisor.window == 50
    assert not hasattr(advisor, "train_loss_key")  # renamed in the state key: read via config
    assert advisor.config.train_loss_key == "loss/train"


@pytest.mark.parametrize(("make", "name", "allowed"), [
    (lambda v: ActivationHistogram(bins=v), "bins", f"an int in [1, {MAX_BINS}]"),
    (lambda v: LRPlateauAdvisor(window=v), "window", f"an int in [1, {MAX_WINDOW}]"),
])
def test_size_arguments_are_bounded_naming_the_argument_the_value_and_the_range(
        make: Any, name: str, allowed: str) -> None:
    """Issue 22: ``bins=10**6`` made 6 steps take 228 s and 1.15 GB; a window of 10**6 step
    losses would make every step sort a million floats."""
    with pytest.raises(ValueError) as info:
        make(10**6)
    assert str(info.value) == f"`{name}` must be {allowed}, got 1000000."
    make(MAX_BINS if name == "bins" else MAX_WINDOW)  # the largest allowed is accepted


def _fit(tmp_path: Path, callbacks: list[Any], steps: int = 12, **kw: Any) -> Any:
    t = trainer(tmp_path, callbacks, max_steps=steps, **kw)
    torch.manual_seed(0)
    t.fit(Classifier(mlp()), loader(digits(512), batch_size=16))
    return t


def test_one_schedule_each_default_keeps_its_steps_and_early_steps_adds_the_powers_of_two(
        tmp_path: Path) -> None:
    """``every_n_steps`` means steps 0, n, 2n, ...; ``early_steps`` adds 1, 2, 4, ... below n.
    ActivationHistogram defaults to without, UpdateRatioMonitor to with (their earlier
    behaviour); each honours the other setting. Read back from TensorBoard."""
    cbs = [ActivationHistogram(every_n_steps=5), UpdateRatioMonitor(every_n_steps=5)]
    t = _fit(tmp_path / "defaults", cbs)
    acc = events(t.logger.log_dir)
    relu = activation_histogram("act", typed_layer("net.2", "ReLU"))
    assert [h.step for h in acc.Histograms(relu)] == [0, 5, 10]
    assert [e.step for e in acc.Scalars(UPDATE_RATIO_MEDIAN)] == [0, 1, 2, 4, 5, 10]
    # batches of 16 measured alone (the default min_samples would pool two, over steps 1-2)
    cbs = [ActivationHistogram(every_n_steps=5, early_steps=True, min_samples=16),
           UpdateRatioMonitor(every_n_steps=5, early_steps=False)]
    t = _fit(tmp_path / "swapped", cbs)
    acc = events(t.logger.log_dir)
    assert [h.step for h in acc.Histograms(relu)] == [0, 1, 2, 4, 5, 10]
    assert [e.step for e in acc.Scalars(UPDATE_RATIO_MEDIAN)] == [0, 5, 10]
    assert cbs[0].state_key == ActivationHistogram(every_n_steps=5).state_key  # not measured


class Counting(UpdateRatioMonitor):
    """Counts the calls of the logging step's work: none may happen on other steps."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls: list[tuple[str, int]] = []

    def _arm(self, trainer: Any, pl_module: Any) -> None:
        self.calls.append(("arm", trainer.global_step))

    def _optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.calls.append(("optimizer_step", trainer.global_step))
        super()._optimizer_step(trainer, pl_module, optimizer)

    def _finish(self, trainer: Any, pl_module: Any) -> bool:
        done = super()._finish(trainer, pl_module)
        self.calls.append(("finish" if done else "wait", self.logging_step))
        return done


def test_non_logging_steps_do_no_work_and_accumulation_measures_once_per_step(
        tmp_path: Path) -> None:
    cb = Counting(every_n_steps=4, early_steps=False, log_charts=False)
    _fit(tmp_path, [cb], steps=9, logger=False, accumulate_grad_batches=2)
    # steps 0, 4, 8 of 9, two micro-batches each: armed once, waits for the optimizer step
    assert cb.calls == [(what, step) for step in (0, 4, 8)
                        for what in ("arm", "wait", "optimizer_step", "finish")]
    assert not cb._armed and not cb._pending and len(cb.hooks) == 0


def test_a_step_that_moves_on_unmeasured_is_abandoned() -> None:
    """Armed on step 0, the optimizer never stepped (no measurement); at step 1 what step 0
    left pending is dropped and step 1 is armed afresh."""

    class Fake:
        global_step = 0

    cb = UpdateRatioMonitor(every_n_steps=1)
    fake: Any = Fake()
    cb.on_train_batch_start(fake, None, None, 0)  # type: ignore[arg-type]
    assert cb._armed and cb.logging_step == 0
    cb._pending = [([], [], [], torch.zeros(0))]  # as if a snapshot was taken, never measured
    fake.global_step = 1
    cb.on_train_batch_start(fake, None, None, 1)  # type: ignore[arg-type]
    assert cb._armed and cb.logging_step == 1 and cb._pending == []


@pytest.mark.parametrize("early", [True, False])
def test_the_next_logging_step_is_the_schedule_s(early: bool) -> None:
    for n in range(1, 34):
        for step in range(130):
            want = next(s for s in range(step + 1, 10**4) if is_logging_step(s, n, early))
            assert next_logging_step(step, n, early) == want, (n, step)


def test_steps_skipped_by_the_arming_check_are_those_the_schedule_does_not_log() -> None:
    """Two optimizers step the global step by 2; a schedule changed mid-fit is followed at
    once: the monitor arms on the steps ``is_logging_step`` logs, and only on them."""

    class Fake:
        global_step = 0

    cb, fake = UpdateRatioMonitor(every_n_steps=5, early_steps=True), Fake()
    armed = []
    for step in range(0, 40, 2):
        if step == 22:  # the old schedule's next logging step was 25
            cb.every_n_steps = 3
        fake.global_step = step
        cb.on_train_batch_start(fake, None, None, 0)  # type: ignore[arg-type]
        if cb._armed:
            armed.append(step)
            cb._abandon()
    assert armed == [0, 2, 4, 10, 20, 24, 30, 36]


def test_the_monitors_share_one_base() -> None:
    assert issubclass(ActivationHistogram, MonitorCallback)
    assert issubclass(UpdateRatioMonitor, MonitorCallback)
    assert not issubclass(LRPlateauAdvisor, MonitorCallback)  # every step: no schedule


@dataclasses.dataclass(frozen=True)
class _Every:
    every_n_steps: int = argument(4, check_int)
    early_steps: bool = argument(False, check_flag, key=False)

    def __post_init__(self) -> None:
        validate_arguments(self)


class BatchWindow(MonitorCallback):
    """A rule judged over 3 batches (say, enough samples when batches are small)."""

    slug = "window"
    config_type = _Every

    def __init__(self, keeps: bool) -> None:
        super().__init__(_Every())
        self.keeps, self.batches, self.windows = keeps, 0, []

    def _arm(self, trainer: Any, pl_module: Any) -> None:
        self.batches = 0

    def _finish(self, trainer: Any, pl_module: Any) -> bool:
        self.batches += 1
        if self.batches < 3:
            return False
        self.windows.append((self.logging_step, trainer.global_step))
        return True

    def _keeps_measuring(self) -> bool:
        return self.keeps


def test_a_rule_can_measure_over_several_batches_before_judging(tmp_path: Path) -> None:
    spanning, single = BatchWindow(keeps=True), BatchWindow(keeps=False)
    _fit(tmp_path, [spanning, single], steps=12, logger=False)
    # armed at 0, 4, 8; judged at the end of the third batch (global step already advanced)
    assert spanning.windows == [(0, 3), (4, 7), (8, 11)]
    assert single.windows == []  # each step moved on first: dropped, the schedule went on
    assert not spanning._armed and not single._armed

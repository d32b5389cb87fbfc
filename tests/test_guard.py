"""The guard every diagnostic's Lightning hooks run under: an error of ours never stops the run.

Each hook each callback implements (enumerated from the class, so a new hook or callback is
covered) fails once, at entry (before it did anything) and at exit (after it registered,
swapped or snapshotted whatever it does): the fit completes with final weights ``torch.equal``
to a run without diagnostics, the callback reports exactly one ``<slug>.error`` naming the hook,
and no module hook is left. With ``strict=True`` the exception reaches the caller instead.
The failures of one round go into one fit, one callback each, which keeps the file fast.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_diag.callbacks as callbacks
from lightning_diag.base import LIGHTNING_HOOKS, DiagnosticCallback
from lightning_diag.callbacks import (
    ActivationHistogram,
    EMAWeights,
    GradientCheck,
    InitialLossCheck,
    OverfitSmallBatch,
)
from lightning_diag.findings import DiagnosticError, Severity
from tests.helpers import Classifier, digits, loader, mlp, trainer
from tests.shared_cases import declared

#: Each callback's arguments here: the ``guard`` its test file declares in ``SHARED``.
ARGS: dict[type[DiagnosticCallback], dict[str, Any]] = {
    shared.cls: shared.guard for shared in declared().values()}
#: The hooks that run only when a fit resumes, or only when it raises; all others run in a
#: plain fit that writes a checkpoint each epoch.
SCENARIO = {"load_state_dict": "resume", "on_load_checkpoint": "resume", "on_exception": "crash"}
CRASH_STEP = 3


class Injected(RuntimeError):
    """The failure planted in a hook."""


class UserBoom(RuntimeError):
    """The user's own ``training_step`` failing in the main loop (the crash scenario)."""


class Model(Classifier):
    """A tiny MLP with dropout (so that a stolen random draw shows in the weights)."""

    def __init__(self, crash: bool = False) -> None:
        super().__init__(mlp(width=8, dropout=0.2), lr=1e-2)
        self.crash, self.live_id = crash, id(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.crash and id(self) == self.live_id and self.trainer.global_step == CRASH_STEP:
            raise UserBoom("the user's step failed")
        return super().training_step(batch, batch_idx)


def implemented(cls: type[DiagnosticCallback]) -> list[str]:
    """The Lightning hooks ``cls`` implements (its own or inherited from the base classes)."""
    return [n for n in LIGHTNING_HOOKS if getattr(cls, n) is not getattr(pl.Callback, n)]


def cases(scenario: str) -> list[tuple[type[DiagnosticCallback], str]]:
    return [(cls, hook) for cls in ARGS for hook in implemented(cls)
            if SCENARIO.get(hook, "plain") == scenario]


def rounds(scenario: str) -> list[list[tuple[type[DiagnosticCallback], str]]]:
    """The cases of ``scenario`` in rounds holding at most one hook of each callback."""
    per_class = [[(c, h) for c, h in cases(scenario) if c is cls] for cls in ARGS]
    return [[case for case in row if case] for row in zip_longest(*per_class)]


def broken(cls: type[DiagnosticCallback], hook: str, at: str) -> type[DiagnosticCallback]:
    """``cls`` whose ``hook`` raises Injected at entry or at exit; name and state key unchanged.

    A subclass defined like any user's, so the guard must come from ``__init_subclass__``.
    """
    real = getattr(cls, hook)

    def failing(self: DiagnosticCallback, *args: Any, **kwargs: Any) -> Any:
        if at == "exit":
            real(self, *args, **kwargs)
        raise Injected(f"{cls.__name__}.{hook} failed at {at}")

    return type(cls.__name__, (cls,), {hook: failing, "__qualname__": cls.__qualname__})


def make(cls: type[DiagnosticCallback], **kw: Any) -> DiagnosticCallback:
    """``cls`` (or a broken subclass) built with the arguments of its callback in ARGS."""
    return cls(**next(ARGS[c] for c in cls.__mro__ if c in ARGS), **kw)


def data() -> tuple[Any, Any]:
    """2 training batches of 2 digits, and 4 other digits for validation.

    Healthy data, so that a strict run meets no FAIL finding before the planted failure.
    """
    x, y = digits(8).tensors
    return (loader(TensorDataset(x[:4], y[:4]), batch_size=2),
            loader(TensorDataset(x[4:], y[4:]), batch_size=4, shuffle=False))


def seeded(crash: bool = False) -> Model:
    pl.seed_everything(0, verbose=False)
    return Model(crash)


def fit(root: Path, cbs: list[pl.Callback], model: Model, resume: Path | None = None,
        ) -> pl.Trainer:
    """2 epochs x 2 batches, writing a checkpoint each epoch."""
    t = trainer(root, cbs, max_epochs=2, enable_checkpointing=True)
    t.fit(model, *data(), ckpt_path=str(resume) if resume else None)
    return t


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guard")


@pytest.fixture(scope="module")
def halfway(workdir: Path) -> Path:
    """A checkpoint after epoch 0 holding the state of every callback, to resume from."""
    t = trainer(workdir / "halfway", [make(cls) for cls in ARGS], max_epochs=1)
    t.fit(seeded(), *data())
    t.save_checkpoint(workdir / "halfway.ckpt")
    return workdir / "halfway.ckpt"


@pytest.fixture(scope="module")
def reference(workdir: Path, halfway: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The final weights of each scenario's fit without any diagnostic."""
    out = {}
    for scenario in ("plain", "resume", "crash"):
        model = run_scenario(workdir / f"reference_{scenario}", scenario, [], halfway)
        out[scenario] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


@pytest.fixture
def sigint_restored() -> Iterator[None]:
    """Lightning ignores SIGINT after a KeyboardInterrupt: give the test process its handler."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def run_scenario(root: Path, scenario: str, cbs: list[pl.Callback], halfway: Path) -> Model:
    """Fit; the crash scenario must end in the user's exception, the others complete."""
    model = seeded(crash=scenario == "crash")
    if scenario == "crash":
        with pytest.raises(UserBoom):
            fit(root, cbs, model)
        return model
    t = fit(root, cbs, model, resume=halfway if scenario == "resume" else None)
    assert t.state.finished and t.current_epoch == 2
    return model


GROUPS = [(scenario, at, i) for scenario in ("plain", "resume", "crash")
          for at in ("entry", "exit") for i in range(len(rounds(scenario)))]


@pytest.mark.parametrize(("scenario", "at", "index"), GROUPS,
                         ids=[f"{s}-{a}-round{i}" for s, a, i in GROUPS])
def test_a_failing_hook_reports_itself_steps_aside_and_leaves_training_untouched(
        scenario: str, at: str, index: int, tmp_path: Path, halfway: Path,
        reference: dict[str, dict[str, torch.Tensor]]) -> None:
    group = rounds(scenario)[index]
    cbs = [make(broken(cls, hook, at)) for cls, hook in group]
    model = run_scenario(tmp_path, scenario, list[pl.Callback](cbs), halfway)

    after = model.state_dict()
    want = reference[scenario]
    assert all(torch.equal(after[k], want[k]) for k in want), [c.__name__ for c, _ in group]
    assert hook_count(model) == 0
    for cb, (cls, hook) in zip(cbs, group, strict=True):
        errors = [f for f in cb.findings if f.code == f"{cb.slug}.error"]
        assert len(errors) == 1, (cls.__name__, hook, cb.findings)
        (f,) = errors
        assert f.severity is Severity.WARN and f.details["hook"] == hook, f
        assert f.details["exception"] == "Injected"
        assert f"{cls.__name__} failed in `{hook}` with Injected" in f.message
        assert f"{cls.__name__}.{hook} failed at {at}" in f.message
        assert len(cb.hooks) == 0 and cb._off
    ema = next((cb for cb in cbs if isinstance(cb, EMAWeights)), None)
    assert ema is None or ema._slots is None or not ema._slots.swapped_in


STRICT = [(cls, hook) for cls in ARGS for hook in implemented(cls)]


@pytest.mark.parametrize(("cls", "hook"), STRICT, ids=[f"{c.__name__}.{h}" for c, h in STRICT])
def test_strict_raises_the_internal_error(cls: type[DiagnosticCallback], hook: str,
                                          tmp_path: Path, halfway: Path) -> None:
    cb = make(broken(cls, hook, "exit"), strict=True)
    scenario = SCENARIO.get(hook, "plain")
    if scenario == "crash":  # raising here would hide the user's exception: it is reported
        model = run_scenario(tmp_path, scenario, [cb], halfway)
        assert [f.details["hook"] for f in cb.findings if f.code.endswith(".error")] == [hook]
    else:
        model = seeded()
        with pytest.raises(Injected, match=f"{cls.__name__}.{hook} failed"):
            fit(tmp_path, [cb], model, resume=halfway if scenario == "resume" else None)
        assert not any(f.code.endswith(".error") for f in cb.findings)
    assert hook_count(model) == 0 and len(cb.hooks) == 0


def test_every_callback_and_every_hook_is_covered() -> None:
    assert {c.__name__ for c in ARGS} == set(callbacks.__all__)
    covered = {case for s in ("plain", "resume", "crash") for r in rounds(s) for case in r}
    assert covered == set(STRICT) and len(STRICT) > len(ARGS)
    assert {"on_exception", "load_state_dict", "teardown", "setup"} <= {h for _, h in STRICT}
    for cls, hook in STRICT:  # guarded, and still marked as an override
        fn = getattr(cls, hook)
        assert hasattr(fn, "__wrapped__") and getattr(fn, "__override__", False), (cls, hook)


PASS_THROUGH = {KeyboardInterrupt: SystemExit,  # Lightning's graceful shutdown: sys.exit(1)
                SystemExit: SystemExit, DiagnosticError: DiagnosticError}


@pytest.mark.parametrize("error", list(PASS_THROUGH), ids=lambda e: e.__name__)
@pytest.mark.parametrize("cls", list(ARGS), ids=lambda c: c.__name__)
def test_interrupts_and_diagnostic_errors_pass_through(
        cls: type[DiagnosticCallback], error: type[BaseException], tmp_path: Path,
        sigint_restored: None) -> None:
    hook = next(h for h in implemented(cls) if SCENARIO.get(h, "plain") == "plain"
                and h not in ("setup", "teardown", "state_dict", "on_save_checkpoint"))

    def raise_it(self: Any, *args: Any, **kwargs: Any) -> None:
        raise (DiagnosticError([]) if error is DiagnosticError else error())

    cb, model = make(type(cls.__name__, (cls,), {hook: raise_it})), seeded()
    with pytest.raises(PASS_THROUGH[error]):
        fit(tmp_path, [cb], model)
    assert not any(f.code.endswith(".error") for f in cb.findings) and not cb._off
    assert hook_count(model) == 0 and len(cb.hooks) == 0


def test_a_library_function_failing_is_logged_and_the_next_fit_turns_it_back_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        ) -> None:
    ema = EMAWeights(decay=0.9, evaluate="ema")

    def update(*args: Any) -> None:
        raise ZeroDivisionError("planted")

    with monkeypatch.context() as patch:
        patch.setattr("lightning_diag.callbacks.ema.EMASlots.update", update)
        with caplog.at_level(logging.ERROR, logger="lightning_diag"):
            fit(tmp_path / "a", [ema], seeded())
    (f,) = ema.findings
    assert f.code == "ema.error" and f.details == {"hook": "on_train_batch_end",
                                                   "exception": "ZeroDivisionError"}
    assert ema.num_updates == 0  # every later hook was skipped
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.name == "lightning_diag" and record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert "EMAWeights.on_train_batch_end" in record.getMessage()

    fit(tmp_path / "b", [ema], seeded())
    assert [f.code for f in ema.findings] == ["ema.summary"]  # its verdict, no error
    assert ema.num_updates == 4 and not ema._off


def test_a_callback_that_stepped_aside_still_cleans_up() -> None:
    layer = nn.Linear(2, 2)
    for hook, args in (("teardown", ("fit",)), ("on_exception", (RuntimeError(),))):
        cb = ActivationHistogram()
        cb._off = True
        cb.hooks.forward(layer, lambda m, i, o: None)
        cb._act = {"x": torch.zeros(1)}
        getattr(cb, hook)(None, None, *args)
        assert not layer._forward_hooks and cb._act == {}, hook


def test_a_users_error_in_a_copy_is_theirs_in_strict_mode_too(tmp_path: Path) -> None:
    class StepFailsOnCopies(Model):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if id(self) != self.live_id:
                raise KeyError("no such feature")
            return super().training_step(batch, batch_idx)

    cbs = [make(cls, strict=True) for cls in (InitialLossCheck, GradientCheck, OverfitSmallBatch)]
    trainer(tmp_path, list[pl.Callback](cbs), max_epochs=1).fit(StepFailsOnCopies(), *data())
    for cb in cbs:
        (f,) = cb.findings
        assert f.code == f"{cb.slug}.user_error" and f.severity is Severity.WARN
        assert f.message == (f"{type(cb).__name__} did not run: "
                             "`StepFailsOnCopies.training_step` raised KeyError: 'no such feature'")


def test_a_users_error_in_the_ema_copy_is_theirs_and_the_run_goes_on(tmp_path: Path) -> None:
    class ValidationFailsOnCopies(Model):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if id(self) != self.live_id:
                raise ValueError("bad shape")
            super().validation_step(batch, batch_idx)

    ema = EMAWeights(decay=0.9, evaluate="both", strict=True)
    t = trainer(tmp_path, [ema], max_epochs=2)
    t.fit(ValidationFailsOnCopies(), *data())
    assert t.state.finished and ema.num_updates == 2  # off after the first validation
    (f,) = ema.findings
    assert f.code == "ema.user_error" and f.message == (
        "EMAWeights stopped in `on_validation_epoch_end`: "
        "`ValidationFailsOnCopies.validation_step` raised ValueError: bad shape")


@pytest.mark.parametrize("which", ["forward", "gradient"])
def test_a_failing_module_hook_inside_the_users_step_steps_aside(
        which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reference: dict[str, dict[str, torch.Tensor]]) -> None:
    """The monitors' forward and gradient hooks run inside the user's own forward and backward:
    an error there must not end the user's step either."""
    real = ActivationHistogram._capture

    def failing(self: ActivationHistogram, kind: str, *args: Any) -> None:
        if kind == ("act" if which == "forward" else "grad"):
            raise Injected(f"planted in the {which} hook")
        real(self, kind, *args)

    monkeypatch.setattr(ActivationHistogram, "_capture", failing)
    cb = make(ActivationHistogram)
    model = seeded()
    fit(tmp_path, [cb], model)
    errors = [f for f in cb.findings if f.code == "activations.error"]
    assert len(errors) == 1 and f"a {which} hook on the model" in errors[0].message
    assert errors[0].details["exception"] == "Injected"
    assert hook_count(model) == 0 and len(cb.hooks) == 0
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in reference["plain"].items())


def test_a_failure_on_the_background_worker_steps_aside_and_leaves_no_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reference: dict[str, dict[str, torch.Tensor]]) -> None:
    """On CPU the statistics of a logging step are computed on a worker thread: an error there
    is reported on the training thread, at the next hook, as the callback's own."""
    import threading

    import lightning_diag.callbacks.activation_histogram as module

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("the statistics were computed on the training thread")
        raise Injected("planted on the worker")

    monkeypatch.setattr(module, "layer_summary", failing)
    cb = make(ActivationHistogram)
    model = seeded()
    fit(tmp_path, [cb], model)
    (error,) = [f for f in cb.findings if f.code == "activations.error"]
    assert error.details["exception"] == "Injected"
    assert cb._worker._pool is None and not any(
        t.name.startswith("lightning_diag") for t in threading.enumerate())
    assert hook_count(model) == 0 and len(cb.hooks) == 0
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in reference["plain"].items())


def test_a_failing_module_hook_raises_where_it_happened_under_strict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_diag.callbacks.activation_histogram as module

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise Injected("planted in the forward hook")

    monkeypatch.setattr(module, "layer_summary", failing)
    with pytest.raises(Injected):
        fit(tmp_path, [make(ActivationHistogram, strict=True)], seeded())

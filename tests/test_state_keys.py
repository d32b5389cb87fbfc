"""Two instances of every stateful callback on one Trainer: each saves and gets back its own state.

Every callback with a ``state_dict`` builds its ``state_key`` from the constructor arguments that
change what it measures (as Lightning's ``EarlyStopping`` does). Each pair below differs in such an
argument; the test fits, saves a checkpoint, resumes from it with fresh instances, and checks that
each instance got back its own value, one that differs between the two.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_diag.base import DiagnosticCallback, FitStartCheck
from lightning_diag.callbacks import (
    ActivationHistogram,
    CheckpointEnsemble,
    EMAWeights,
    InitialLossCheck,
    LearningCurves,
    LRPlateauAdvisor,
    UpdateRatioMonitor,
)
from lightning_diag.inference import CheckpointLoadError, load_ema_weights
from tests.helpers import Classifier, digits, loader, mlp, trainer
from tests.shared_cases import StateCase, declared

#: name -> (a pair configured differently, the value that differs, a state planted when the
#: runs themselves leave both equal): the ``state`` its test file declares in ``SHARED``.
CASES: dict[str, StateCase] = {
    name: shared.state for name, shared in declared().items() if shared.state is not None}


class ValuesAtTrainStart(pl.Callback):
    """Reads ``value`` of each callback once the resumed run starts training (state restored)."""

    def __init__(self, callbacks: list[DiagnosticCallback], value: Callable[[Any], Any]) -> None:
        self.callbacks, self.value = callbacks, value
        self.values: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.values = [copy.deepcopy(self.value(cb)) for cb in self.callbacks]


def _fit(tmp_path: Path, callbacks: list[pl.Callback], epochs: int, **kw: Any) -> pl.Trainer:
    t = trainer(tmp_path, callbacks, max_epochs=epochs)
    torch.manual_seed(0)
    t.fit(Classifier(mlp()), loader(digits(64), batch_size=16), **kw)
    return t


def test_every_stateful_callback_is_covered() -> None:
    import lightning_diag.callbacks as module

    stateful = {name for name in module.__all__
                if "state_dict" in {n for c in getattr(module, name).__mro__[:-2]
                                    for n in vars(c)}}
    assert stateful == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_two_instances_each_get_back_their_own_state(name: str, tmp_path: Path) -> None:
    make, value, plant = CASES[name]
    first = make(tmp_path)
    assert first[0].state_key != first[1].state_key
    t = _fit(tmp_path / "first", list(first), epochs=2)
    if plant is not None:  # both ran the same way: give the second a state of its own
        plant(first[1])
    saved = [copy.deepcopy(value(cb)) for cb in first]
    assert saved[0] != saved[1], saved
    ckpt = tmp_path / "both.ckpt"
    t.save_checkpoint(ckpt)
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    assert {cb.state_key for cb in first} <= set(stored)

    second = make(tmp_path)
    probe = ValuesAtTrainStart(list(second), value)
    _fit(tmp_path / "second", [probe, *second], epochs=3, ckpt_path=str(ckpt))
    assert probe.values == saved


def test_state_keys_are_the_same_in_every_process() -> None:
    keys = [InitialLossCheck().state_key,
            ActivationHistogram(layers=lambda name, module: name == "net.1").state_key,
            CheckpointEnsemble(dirpath=Path("x")).state_key]
    assert not any(re.search(r"0x[0-9a-f]+", k) for k in keys), keys  # no memory address
    assert "lightning_diag.batch.default_batch_to_target" in keys[0]
    assert "<lambda>" in keys[1]
    assert EMAWeights(decay=0.5).state_key == EMAWeights(decay=0.5, evaluate="raw",
                                                         device="cpu").state_key
    assert EMAWeights(decay=0.5).state_key.startswith("EMAWeights{'decay': 0.5")


def test_load_ema_weights_chooses_among_several_averages(tmp_path: Path) -> None:
    slow = EMAWeights(decay=0.9, warmup=False, evaluate="raw")
    fast = EMAWeights(decay=0.5, warmup=False)
    t = _fit(tmp_path, [slow, fast], epochs=1)
    ckpt = tmp_path / "two.ckpt"
    t.save_checkpoint(ckpt)
    loaded = []
    for ema in (slow, fast):
        model = load_ema_weights(Classifier(mlp()), ckpt, decay=ema.decay)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.ema_state_dict().items())
        by_key = load_ema_weights(Classifier(mlp()), ckpt, key=ema.state_key)
        assert torch.equal(by_key.state_dict()["net.1.weight"], model.state_dict()["net.1.weight"])
        loaded.append(model.state_dict()["net.1.weight"])
    assert not torch.equal(*loaded)
    with pytest.raises(CheckpointLoadError, match=r"2 EMA averages .*decay 0\.9.*decay 0\.5.*"
                                                  r"`decay=` or `key=`"):
        load_ema_weights(Classifier(mlp()), ckpt)
    with pytest.raises(CheckpointLoadError, match=r"no EMA average matches decay=0\.7"):
        load_ema_weights(Classifier(mlp()), ckpt, decay=0.7)
    with pytest.raises(ValueError, match=r"`decay` must be a number in \[0, 1\) or None, got 1\.5"):
        load_ema_weights(Classifier(mlp()), ckpt, decay=1.5)


@pytest.mark.parametrize(("callbacks", "match"), [
    (lambda d: [CheckpointEnsemble(k=2), CheckpointEnsemble(k=3)], "give each its own `dirpath=`"),
    (lambda d: [EMAWeights(decay=0.5), EMAWeights(decay=0.9)], "evaluate='ema'.*swap"),
    (lambda d: [EMAWeights(decay=0.5, evaluate="both"), EMAWeights(decay=0.9, evaluate="both")],
     "evaluate='both'.*_ema"),
])
def test_two_instances_that_would_clash_are_refused_at_setup(callbacks: Any, match: str,
                                                             tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, callbacks(tmp_path), epochs=1)


def test_identical_instances_still_share_one_key() -> None:
    a, b = UpdateRatioMonitor(patience=2), UpdateRatioMonitor(patience=2)
    assert a.state_key == b.state_key  # indistinguishable: Lightning refuses the pair
    assert isinstance(InitialLossCheck(), FitStartCheck)


def test_the_state_key_is_kept_and_built_again_when_an_argument_changes() -> None:
    # Lightning reads the key around every hook call: it is built once, not a dozen times a step
    cb = UpdateRatioMonitor(every_n_steps=10)
    key = cb.state_key
    assert cb.state_key is key and "'every_n_steps': 10" in key
    cb.streak = {}  # not an argument of the key
    assert cb.state_key is key
    cb.every_n_steps = 20
    assert cb.state_key == key.replace("'every_n_steps': 10", "'every_n_steps': 20")
    assert copy.deepcopy(cb).state_key == cb.state_key


#: The keys of the last release: a checkpoint stores each callback's state under its key and
#: Lightning restores it by exact match, so a changed key orphans every saved state.
KEYS_OF_SAVED_CHECKPOINTS = {
    "ActivationHistogram": "ActivationHistogram{'every_n_steps': 200, 'layers': None, 'bins': 64, "
                           "'dead_fraction': 0.5, 'saturated_fraction': 0.5, 'vanishing_ratio': "
                           "0.001, 'exploding_ratio': 1000.0}",
    "UpdateRatioMonitor": "UpdateRatioMonitor{'every_n_steps': 100, 'low': 1e-05, 'high': 0.2, "
                          "'extreme': 1.0, 'patience': 3}",
    "LRPlateauAdvisor": "LRPlateauAdvisor{'monitor': None, 'train_loss': None, 'val_loss': None, "
                        "'train_acc': None, 'val_acc': None, 'patience': 3, 'min_rel_delta': "
                        "0.01, 'high_fraction': 0.2, 'act': False, 'factor': 0.1, 'min_lr': 0.0, "
                        "'min_epochs': 5, 'low_acc': 0.9, 'close_gap': 0.02, 'overfit_gap': 0.1, "
                        "'rel_gap': 0.5, 'halving_epochs': 20.0, 'jump_factor': 5.0, "
                        "'min_jump_fraction': 0.5, 'window': 50, 'min_history': 10, "
                        "'stall_steps': None}",
    "LearningCurves": "LearningCurves{'train_loss': None, 'val_loss': None, 'train_acc': None, "
                      "'val_acc': None}",
}


def test_state_keys_are_those_of_saved_checkpoints() -> None:
    """The settings records build the keys the argument lists built: at the defaults, with every
    argument changed (ints given for floats stay as they were keyed), and with the arguments
    left out of the key (charts, figures, the schedule's early steps) changed."""
    defaults = {"ActivationHistogram": ActivationHistogram(), "UpdateRatioMonitor":
                UpdateRatioMonitor(), "LRPlateauAdvisor": LRPlateauAdvisor(),
                "LearningCurves": LearningCurves()}
    assert {name: cb.state_key for name, cb in defaults.items()} == KEYS_OF_SAVED_CHECKPOINTS
    changed = [
        (ActivationHistogram(every_n_steps=7, layers=["a", "b"], bins=10, dead_fraction=1,
                             saturated_fraction=0.25, vanishing_ratio=0.01, exploding_ratio=100,
                             figure_every_n_logs=3, log_charts=False, early_steps=True),
         "ActivationHistogram{'every_n_steps': 7, 'layers': ('a', 'b'), 'bins': 10, "
         "'dead_fraction': 1.0, 'saturated_fraction': 0.25, 'vanishing_ratio': 0.01, "
         "'exploding_ratio': 100.0}"),
        (UpdateRatioMonitor(every_n_steps=5, low=1, high=2, extreme=3, patience=2,
                            log_charts=False, early_steps=False),
         "UpdateRatioMonitor{'every_n_steps': 5, 'low': 1.0, 'high': 2.0, 'extreme': 3.0, "
         "'patience': 2}"),
        (LRPlateauAdvisor(monitor="m", train_loss_key="a", val_loss_key="b", train_acc_key="c",
                          val_acc_key="d", patience=2, min_rel_delta=0, high_fraction=1,
                          act=True, factor=0.5, min_lr=1, min_epochs=2, low_acc=1, close_gap=0,
                          overfit_gap=1, rel_gap=0, halving_epochs=3, jump_factor=2,
                          min_jump_fraction=0, window=20, min_history=5, save_batch=False,
                          stall_steps=10),
         "LRPlateauAdvisor{'monitor': 'm', 'train_loss': 'a', 'val_loss': 'b', 'train_acc': "
         "'c', 'val_acc': 'd', 'patience': 2, 'min_rel_delta': 0, 'high_fraction': 1, 'act': "
         "True, 'factor': 0.5, 'min_lr': 1, 'min_epochs': 2, 'low_acc': 1, 'close_gap': 0, "
         "'overfit_gap': 1, 'rel_gap': 0, 'halving_epochs': 3, 'jump_factor': 2, "
         "'min_jump_fraction': 0, 'window': 20, 'min_history': 5, 'stall_steps': 10}"),
        (LearningCurves(train_loss="l", figure_every_n_epochs=2),
         "LearningCurves{'train_loss': 'l', 'val_loss': None, 'train_acc': None, "
         "'val_acc': None}"),
    ]
    for cb, key in changed:
        assert cb.state_key == key

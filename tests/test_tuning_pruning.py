"""Diagnosis-guided pruning: hopeless trials end early with their finding, healthy ones never."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.findings import Finding, Severity, load_findings
from lightning_diag.tensorboard.tags import TUNING_TRIAL_ENDED
from lightning_diag.tuning.pruning import (
    PRUNING_CODES,
    DiagnosisPruning,
    ends_trial,
    trial_monitors,
)
from lightning_diag.tuning.search import random_search
from lightning_diag.tuning.sweep import build_model
from tests.families import FAMILIES
from tests.helpers import events, text_events
from tests.test_tuning import FACTORY, TinyDigits

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]


def test_what_ends_a_trial() -> None:
    def make(code: str, severity: Severity) -> Finding:
        return Finding("X", code, severity, "...")

    assert ends_trial(make("advisor.divergence", Severity.FAIL))  # any FAIL: a NaN loss
    assert ends_trial(make("update_ratio.too_high", Severity.WARN))
    assert not ends_trial(make("advisor.divergence", Severity.WARN))  # a spike can recover
    assert not ends_trial(make("advisor.plateau", Severity.WARN))  # a long run's verdict
    assert not ends_trial(make("update_ratio.summary", Severity.INFO))
    assert not ends_trial(make("update_ratio.too_high", Severity.WARN), codes={})
    # reversible, or measured to end trials that finish within 1 point of their search's best
    for code in ("advisor.stalled", "update_ratio.too_low", "activations.dead_units",
                 "gradients.vanishing"):
        assert not ends_trial(make(code, Severity.WARN)), code


def test_every_pruning_code_is_documented_by_the_monitor_publishing_it() -> None:
    pages = {"advisor": "lr_advisor", "update_ratio": "update_ratio",
             "gradients": "activation_histogram"}
    for code in PRUNING_CODES:
        page = ROOT / "docs" / "callbacks" / f"{pages[code.partition('.')[0]]}.md"
        assert f"`{code}`" in page.read_text(encoding="utf-8"), (code, page)
    assert [type(m).__name__ for m in trial_monitors()] == ["UpdateRatioMonitor"]


def test_a_hopeless_trial_ends_at_its_first_step_with_its_finding(tmp_path: Path) -> None:
    # lr around 30: the very first update is far larger than the weights
    found = random_search(FACTORY, TinyDigits(), center_lr=30.0, lr_span=1.5, n_trials=2,
                          epochs=(1, 3), run_dir=tmp_path, accelerator="cpu")
    assert [r["state"] for r in found.rows] == ["pruned", "pruned"]
    for r in found.rows:
        assert r["ended_by"] == "update_ratio.too_high" and r["ended_at"] == 0
        assert r["steps"] == 1 and r["epochs"] == 0  # one step, and no validation after it
        assert r["why"].startswith("Ended at step 0 by `update_ratio.too_high` (an update as "
                                   "large as the weights): Median update ratio")
    table = found.table()
    assert "| update_ratio.too_high (step 0) |" in table
    assert "Trials the diagnosis ended:\n\n- trial 0: Ended at step 0" in table
    # the study holds it, for every worker and any storage
    study = optuna.load_study(study_name=found.study_name, storage=found.storage)
    assert all(t.user_attrs["ended_by"]["code"] == "update_ratio.too_high" for t in study.trials)
    assert all(not t.intermediate_values for t in study.trials)  # nothing to the median pruner
    # the trial's run: the text, and the finding in its findings record
    run = tmp_path / "search" / "trial_0"
    acc = events(run)
    (text,) = text_events(acc, TUNING_TRIAL_ENDED)
    assert text.startswith("Ended at step 0 by `update_ratio.too_high`")
    assert [e.step for e in acc.Tensors(f"{TUNING_TRIAL_ENDED}/text_summary")] == [0]
    assert "update_ratio.too_high" in {f.code for f in load_findings(run)}


def test_diagnose_false_leaves_pruning_to_the_validation_metric(tmp_path: Path) -> None:
    found = random_search(FACTORY, TinyDigits(), center_lr=30.0, lr_span=1.5, n_trials=1,
                          epochs=(1, 2), run_dir=tmp_path, accelerator="cpu", diagnose=False)
    (row,) = found.rows
    assert row["state"] == "complete" and row["ended_by"] == "" and row["epochs"] == 2
    assert not list((tmp_path / "search").rglob("findings.jsonl"))  # no monitor attached
    with pytest.raises(TypeError, match="`diagnose` must be a bool"):
        random_search(FACTORY, TinyDigits(), center_lr=1e-2, n_trials=1, diagnose="yes")


@pytest.mark.parametrize(("lr", "finding"), [
    (1e-7, "update_ratio.too_low"),  # updates of ~1e-8 of the weights: recorded, not ended
    (1e-5, ""),  # the loss stays put for 30 steps (it used to end as `advisor.stalled`)
])
def test_a_trial_that_learns_slowly_is_left_to_optunas_pruner(tmp_path: Path, lr: float,
                                                               finding: str) -> None:
    # Slow is not hopeless beyond doubt: SGD with momentum at a small rate, a one-cycle or
    # warm-up start, moves its loss little at first and then trains (issue 24's false prune)
    found = random_search(FACTORY, TinyDigits(n=512), center_lr=lr, lr_span=1.01,
                          n_trials=1, epochs=(3, 3), run_dir=tmp_path, accelerator="cpu",
                          pruner=optuna.pruners.NopPruner())
    (row,) = found.rows
    assert (row.state, row.ended_by, row.steps) == ("complete", "", 48), found.table()
    codes = {f.code for f in load_findings(tmp_path / "search" / "trial_0")}
    assert not finding or finding in codes


class WarmedUp(DigitsClassifier):
    """The digits MLP with a linear warm-up of the learning rate from 0 over 40 steps."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__(arch="mlp", width=16, dropout=0.0, optimizer="sgd", lr=lr,
                         weight_decay=weight_decay)

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 40))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}


def test_a_warm_up_from_zero_is_not_ended(tmp_path: Path) -> None:
    # Before: the loss held still by the warm-up for 30 steps ended the trial as stalled
    found = random_search(WarmedUp, TinyDigits(n=512), center_lr=0.1, lr_span=1.01,
                          n_trials=1, epochs=(3, 3), run_dir=tmp_path, accelerator="cpu",
                          pruner=optuna.pruners.NopPruner())
    (row,) = found.rows
    assert (row.state, row.ended_by, row.steps) == ("complete", "", 48), found.table()
    assert row.value > 0.3  # it trained (chance: 0.1)


def _search_tasks():
    """The benchmarks' search tasks (``benchmarks/search_tasks.py``), loaded from their file."""
    if "search_tasks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("search_tasks",
                                                      ROOT / "benchmarks" / "search_tasks.py")
        assert spec is not None and spec.loader is not None
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # for its dataclasses
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["search_tasks"]


@pytest.mark.slow
def test_a_would_be_winner_that_starts_slowly_trains_to_its_end(tmp_path: Path) -> None:
    # Issue 24, measured on the pruning corpus (benchmarks/bench_pruning_rules.py): a CNN
    # trained with SGD + momentum under a one-cycle schedule (it starts at lr / 25) barely
    # moves its loss in 30 steps; `advisor.stalled` used to end it at step 29, yet trained
    # to its end it is its search's best (0.827).
    task = _search_tasks().TASKS["bars-cnn-sgdm-onecycle"]
    monitors = trial_monitors()
    diagnosis = DiagnosisPruning(monitors)
    stall = LRPlateauAdvisor(save_batch=False, stall_steps=30)  # the rule it used to end on
    trainer = pl.Trainer(max_epochs=8, accelerator="cpu", devices=1, logger=False,
                         callbacks=[*monitors, diagnosis, stall], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(build_model(task.factory, 0.22346669572463243, 1e-4, 1),
                datamodule=task.datamodule(1))
    assert [(f.code, f.step) for f in stall.findings if f.code == "advisor.stalled"] == [
        ("advisor.stalled", 29)]
    assert diagnosis.ended_by is None and trainer.global_step == 304
    assert float(trainer.callback_metrics["val_acc"]) > 0.82


class DeadNet(DigitsClassifier):
    """The digits MLP with every unit of its first ReLU layer dead: no gradient reaches the
    first two weight tensors, the network cannot learn."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__(arch="mlp", width=16, dropout=0.0, lr=lr, weight_decay=weight_decay)
        with torch.no_grad():
            self.net[1].bias.fill_(-100.0)


def test_a_dead_network_ends_when_its_weights_stop_moving(tmp_path: Path) -> None:
    found = random_search(DeadNet, TinyDigits(n=512), center_lr=1e-3, lr_span=1.01,
                          n_trials=1, epochs=(3, 3), run_dir=tmp_path, accelerator="cpu",
                          weight_decays=(0.0,), pruner=optuna.pruners.NopPruner())
    (row,) = found.rows
    assert (row.ended_by, row.ended_at, row.steps) == ("update_ratio.zero_updates", 2, 3), \
        found.table()
    assert "(no weight moves)" in row.why and "gradients are zero" in row.why


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "lr"), [
    # the ends of the ranges where Adam trains each to 0.88-0.99 validation accuracy in 5 epochs
    ("mlp", 1e-3), ("mlp", 3e-2), ("cnn", 1e-4), ("cnn", 1e-2),
    ("cnn", 1.7e-2),  # 90% of a layer dead at step 20, 0.956 at the end: not hopeless
])
def test_healthy_configurations_are_never_pruned_by_a_diagnosis(arch: str, lr: float,
                                                                tmp_path: Path) -> None:
    found = random_search(functools.partial(DigitsClassifier, arch=arch), DigitsDataModule(),
                          center_lr=lr, lr_span=1.0001, n_trials=2, epochs=(3, 3),
                          weight_decays=(0.0, 1e-4), run_dir=tmp_path, accelerator="cpu",
                          pruner=optuna.pruners.NopPruner())  # only a diagnosis may end one
    assert [r["ended_by"] for r in found.rows] == ["", ""], found.table()
    assert all(r["steps"] == 69 for r in found.rows)  # past the stall window of 30 steps


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_healthy_families_run_a_trial_to_its_end(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    family = FAMILIES[name]()
    monitors = trial_monitors()
    diagnosis = DiagnosisPruning(monitors)
    trainer = pl.Trainer(
        max_epochs=6, accelerator="cpu", devices=1, callbacks=[*monitors, diagnosis],
        logger=TensorBoardLogger(str(tmp_path), name=name), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_train_batches=8,
        limit_val_batches=2, num_sanity_val_steps=0, **family.trainer_kwargs)
    trainer.fit(family.module, family.train, family.val)
    assert diagnosis.ended_by is None, diagnosis.ended_by
    assert trainer.global_step == 48  # past the stall window of 30 steps
    assert not [f for m in monitors for f in m.findings if f.code.endswith(".error")]


def test_tune_prints_the_finding_that_ended_each_trial(tmp_path: Path, capsys) -> None:
    import argparse

    from lightning_diag.tuning.cli import add_tune_arguments, run_tune

    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    # a sweep of the one rate 3: the search then draws from [1, 9], all hopeless
    args = parser.parse_args(["--datamodule", "tests.test_tuning:TinyDigits", "--lrs", "3",
                              "--sweep-steps", "2", "--trials", "2", "--epochs", "1", "2",
                              "--accelerator", "cpu", "--run-dir", str(tmp_path)])
    assert args.diagnose and not parser.parse_args(["--no-diagnose"]).diagnose
    assert run_tune(args) == 0
    out = capsys.readouterr().out
    assert out.count("| update_ratio.too_high (step 0) |") == 2
    assert "Trials the diagnosis ended:\n\n- trial 0: Ended at step 0 by" in out
    assert "- trial 1: Ended at step 0 by `update_ratio.too_high`" in out
    assert "**Best**: none. Every trial of the search was pruned" in out


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="`monitors` must be a sequence of lightning_diag"):
        DiagnosisPruning([pl.Callback()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="`codes` must be a mapping"):
        DiagnosisPruning([], codes=["update_ratio.too_high"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`every_n_steps` must be"):
        trial_monitors(every_n_steps=0)


def test_an_error_of_the_pruning_callback_is_a_finding_and_the_trial_trains_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: DiagnosisPruning, trainer: pl.Trainer) -> None:
        raise RuntimeError("planted in the pruning callback")

    monkeypatch.setattr(DiagnosisPruning, "_check", failing)
    found = random_search(FACTORY, TinyDigits(), center_lr=30.0, lr_span=1.5, n_trials=1,
                          epochs=(1, 1), run_dir=tmp_path, accelerator="cpu")
    (row,) = found.rows
    assert row["state"] == "complete" and row["ended_by"] == ""  # not pruned, not crashed
    (error,) = [f for f in load_findings(tmp_path / "search" / "trial_0")
                if f.code == "trial_pruning.error"]
    assert "planted in the pruning callback" in error.message


def test_trials_ending_on_the_same_card_draw_it_once(tmp_path: Path, monkeypatch) -> None:
    # a search's healthy trials end on the same findings card ("nothing to fix"): it is drawn
    # and encoded once per process, and every trial's run still holds it, the same bytes
    import io

    from PIL import Image

    import lightning_diag.record as record
    from lightning_diag.tensorboard.findings_table import FindingsCard
    from lightning_diag.tensorboard.tags import FINDINGS_CARD

    drawn = []
    real = FindingsCard.image
    monkeypatch.setattr(record, "_CARD_PNGS", {})
    monkeypatch.setattr(FindingsCard, "image", lambda card: drawn.append(card.text) or real(card))
    found = random_search(FACTORY, TinyDigits(), center_lr=1e-3, lr_span=1.5, n_trials=2,
                          epochs=(1, 1), run_dir=tmp_path, accelerator="cpu")
    assert [r["state"] for r in found.rows] == ["complete", "complete"]
    cards = [events(tmp_path / "search" / f"trial_{n}").Images(FINDINGS_CARD)[-1]
             for n in (0, 1)]
    assert cards[0].encoded_image_string == cards[1].encoded_image_string
    png = Image.open(io.BytesIO(cards[1].encoded_image_string))
    assert "nothing to fix" in png.text["text"] and png.size == (690, 380)
    assert sorted(drawn) == sorted(set(drawn))  # each card drawn once, though logged twice
    assert drawn.count(png.text["text"]) == 1

"""lr_sweep, random_search (resume, shared study, pruning), refine, tune, CLI; tiny budgets."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_diag.examples.digits import DigitsClassifier
from lightning_diag.isolation import OptimizationSettings
from lightning_diag.tensorboard.tags import refine_curve, sweep_curve
from lightning_diag.tuning.cli import add_tune_arguments, load_class, run_tune
from lightning_diag.tuning.pipeline import tune
from lightning_diag.tuning.records import RefinedConfig, TrialRecord
from lightning_diag.tuning.search import RefineResult, random_search, refine
from lightning_diag.tuning.sweep import lr_sweep
from tests.families import RecurrentLM, recurrent_lm
from tests.helpers import digits, events, loader

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]
FACTORY = functools.partial(DigitsClassifier, arch="mlp", width=16, dropout=0.0)


def data(n: int = 128) -> tuple:
    return loader(digits(n), batch_size=32), loader(digits(64), batch_size=64, shuffle=False)


class TinyDigits(pl.LightningDataModule):
    def __init__(self, n: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        return loader(digits(self.n), batch_size=self.batch_size)

    def val_dataloader(self):
        return loader(digits(64), batch_size=64, shuffle=False)


def test_sweep_same_init_picks_and_charts(tmp_path):
    result = lr_sweep(FACTORY, train_dataloaders=data()[0], lrs=(30.0, 1e-2, 1e-6), steps=8,
                      alpha=0.5, run_dir=tmp_path, accelerator="cpu")
    first = {lr: c[0] for lr, c in result.curves.items()}
    assert len(set(first.values())) == 1, first  # same weights, same first batch
    assert all(len(c) == 8 for c in result.curves.values() if torch.isfinite(torch.tensor(c)).all())
    assert result.best_lr == 1e-2 and 30.0 in result.diverged
    assert result.scores[1e-2] < result.scores[1e-6]
    assert result.png_path == tmp_path / "sweep.png" and result.png_path.stat().st_size > 0
    acc = events(tmp_path / "sweep")
    tags = set(acc.Tags()["scalars"])
    assert {sweep_curve(1e-2), sweep_curve(1e-6)} <= tags
    assert len(acc.Scalars(sweep_curve(1e-2))) == 8
    assert "| 1e-02 |" in result.table()


def test_a_pick_at_the_edge_of_the_range_extends_it_once(tmp_path):
    kw = dict(train_dataloaders=data()[0], steps=16, accelerator="cpu")
    # 16 steps are too few for these rates: the largest wins, and so does the extension
    low = lr_sweep(FACTORY, lrs=(1e-4, 1e-5), run_dir=tmp_path, **kw)
    assert low.extended == 1e-3 and sorted(low.curves) == [1e-5, 1e-4, 1e-3]
    assert low.best_lr == 1e-3 and low.edge == "top"
    assert low.range_note().endswith("the pick 1e-03 is still at its top edge: extend the range "
                                     "further up.")
    assert "extended once, to 1e-03" in low.table()
    assert sweep_curve(1e-3) in events(tmp_path / "sweep").Tags()["scalars"]
    # the bottom edge extends down, by the ratio of the rates (here 100x); inside, it stops
    inside = lr_sweep(FACTORY, lrs=(0.1, 1e-3), **kw)
    assert inside.extended == 1e-5 and inside.best_lr == 1e-3 and inside.edge == ""
    assert inside.range_note().endswith("the pick 1e-03 now lies inside the range.")
    kept = lr_sweep(FACTORY, lrs=(1e-4, 1e-5), extend_edge=False, **kw)
    assert kept.extended is None and sorted(kept.curves) == [1e-5, 1e-4]
    assert kept.range_note().startswith("The pick lies at the edge of the range")


def test_the_refined_table_ends_with_the_next_step():
    def rows(*advisor):
        return [{"rank": i, "lr": 1e-3, "weight_decay": 0.0, "value": 0.9, "advisor": list(a)}
                for i, a in enumerate(advisor, 1)]

    healthy = RefineResult(rows([]), "val_acc")
    assert healthy.table().endswith(
        "Next: train configuration 1 (lr 1.00e-03, weight decay 0, val_acc 0.9000) longer: the "
        "advisor saw no plateau, under- or overfitting in its run (recipe step 6.5: back to "
        "step 3 with more epochs).")
    both = RefineResult(rows(["advisor.overfit", "advisor.divergence"]), "val_acc")
    assert both.next_step().endswith("diverged: lower its learning rate (about 10x) before "
                                     "training it longer.")


def test_sweep_validates_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        lr_sweep(FACTORY)
    with pytest.raises(ValueError, match="lrs"):
        lr_sweep(FACTORY, train_dataloaders=data()[0], lrs=(0.1, -1.0))
    with pytest.raises(TypeError, match="LightningModule"):
        lr_sweep(lambda lr, weight_decay: torch.nn.Linear(1, 1), train_dataloaders=data()[0],
                 steps=1)


class SweptLM(RecurrentLM):
    """The recurrent family's LSTM with its learning rate given by the sweep."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def test_sweep_optimizes_as_the_main_run():
    stream = recurrent_lm().train  # the family's main run clips gradients at 0.25
    kw = dict(lrs=(20.0,), steps=8, accelerator="cpu")
    clip = OptimizationSettings(gradient_clip_val=0.25)
    given = lr_sweep(SweptLM, train_dataloaders=stream, settings=clip, **kw).curves[20.0]
    assert given == lr_sweep(SweptLM, train_dataloaders=stream, gradient_clip_val=0.25,
                             **kw).curves[20.0]
    assert given != lr_sweep(SweptLM, train_dataloaders=stream, **kw).curves[20.0]
    with pytest.raises(ValueError, match="gradient_clip_val"):
        lr_sweep(SweptLM, train_dataloaders=stream, settings=clip, gradient_clip_val=1.0, **kw)


def test_sweep_curves_are_unscaled_under_accumulation():
    kw = dict(train_dataloaders=data()[0], accelerator="cpu")
    # at a vanishing learning rate every loss is that of the initial weights
    frozen = lr_sweep(FACTORY, lrs=(1e-12,), steps=2, **kw).curves[1e-12]
    accumulated = lr_sweep(FACTORY, lrs=(1e-2,), steps=2, settings=OptimizationSettings(
        accumulate_grad_batches=2), **kw).curves[1e-2]
    # steps count optimizer steps, 2 batches each; before the first step both batches are seen
    # at the initial weights, and their losses are the step's, not halved
    assert len(accumulated) == 4
    assert accumulated[:2] == pytest.approx(frozen[:2], rel=1e-6)


def test_search_resumes_after_interruption(tmp_path):
    kw = dict(center_lr=1e-2, epochs=(1, 1), run_dir=tmp_path, accelerator="cpu",
              limit_train_batches=2)
    first = random_search(FACTORY, data(), n_trials=2, **kw)
    assert [r["number"] for r in sorted(first.rows, key=lambda r: r["number"])] == [0, 1]
    assert (tmp_path / "study.db").exists()
    with sqlite3.connect(tmp_path / "study.db") as db:  # written ahead: no disk wait per write
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for r in first.rows:
        assert 1e-2 / 3 <= r["lr"] <= 1e-2 * 3 and r["weight_decay"] in (1e-4, 1e-5, 0.0)

    def interrupted(lr: float, weight_decay: float):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        random_search(interrupted, data(), n_trials=4, **kw)
    resumed = random_search(FACTORY, data(), n_trials=4, **kw)
    by_number = {r["number"]: r for r in resumed.rows}
    assert len(resumed.rows) == 4 and {0, 1} <= set(by_number)
    for r in first.rows:  # the finished trials are kept, not rerun
        kept = by_number[r["number"]]
        assert kept["lr"] == r["lr"] and kept["value"] == r["value"]
    assert len({(r["lr"], r["weight_decay"]) for r in resumed.rows}) == 4
    study = optuna.load_study(study_name=resumed.study_name, storage=resumed.storage)
    assert [t.state.name for t in study.trials].count("FAIL") == 1  # the interrupted one
    again = random_search(FACTORY, data(), n_trials=4, **kw)  # nothing left to do
    assert len(again.rows) == 4


WORKER = textwrap.dedent("""
    import functools, pathlib, sys, time
    sys.path.insert(0, {root!r})
    from lightning_diag.examples.digits import DigitsClassifier
    from lightning_diag.tuning.search import random_search
    from tests.helpers import digits, loader
    # Start together (imports take seconds): otherwise one worker may finish every trial alone.
    run_dir = pathlib.Path(sys.argv[1])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ready").touch()
    deadline = time.monotonic() + 120
    while len(list(run_dir.parent.glob("w*/ready"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    factory = functools.partial(DigitsClassifier, arch="mlp", width=16, dropout=0.0)
    data = (loader(digits(128), 32), loader(digits(64), 64, shuffle=False))
    random_search(factory, data, center_lr=1e-2, n_trials=6, epochs=(1, 1),
                  storage={storage!r}, study_name="shared", run_dir=sys.argv[1],
                  accelerator="cpu", limit_train_batches=2, enable_model_summary=False)
""")


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(storage=storage, study_name="shared", direction="maximize")
    code = WORKER.format(root=str(ROOT), storage=storage)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"w{i}")],
                              cwd=tmp_path, stderr=subprocess.PIPE) for i in range(2)]
    errors = [p.communicate(timeout=240)[1].decode()[-2000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    trials = [t for t in optuna.load_study(study_name="shared", storage=storage).trials
              if t.state.name in ("COMPLETE", "PRUNED")]
    assert 6 <= len(trials) <= 7  # a trial in flight when the 6th finished may also finish
    assert len({t.number for t in trials}) == len(trials)
    assert len({(t.params["lr"], t.params["weight_decay"]) for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "one worker did all the trials"


def test_pruning_stops_poor_trials_early(tmp_path):
    found = random_search(FACTORY, data(), center_lr=1e-2, n_trials=2, epochs=(1, 3),
                          run_dir=tmp_path, pruner=optuna.pruners.ThresholdPruner(lower=1.01),
                          accelerator="cpu", limit_train_batches=2)
    assert [r["state"] for r in found.rows] == ["pruned", "pruned"]
    assert all(r["epochs"] == 1 for r in found.rows)  # stopped after the first of 3 epochs


def test_refine_ranks_with_advisor_reading(tmp_path):
    found = random_search(FACTORY, data(), center_lr=1e-2, n_trials=2, epochs=(1, 1),
                          run_dir=tmp_path, accelerator="cpu", limit_train_batches=2)
    refined = refine(found, top_k=2, epochs=2, advisor={"min_epochs": 1, "low_acc": 1.0,
                                                         "close_gap": 1.0})
    assert [r["rank"] for r in refined.rows] == [1, 2]
    assert refined.rows[0]["value"] >= refined.rows[1]["value"]
    assert all(r["advisor"] == ["advisor.underfit"] for r in refined.rows)  # forced thresholds
    assert all(len(r["curve"]) == 2 for r in refined.rows)
    assert "advisor.underfit" in refined.table()
    assert refined.table().endswith("underfits: use a bigger model or train it longer.")
    assert (tmp_path / "refine" / "config_0").is_dir()
    # typed records, read as the dict rows of before
    row, best = found.rows[0], refined.rows[0]
    assert isinstance(row, TrialRecord) and isinstance(best, RefinedConfig)
    assert row["value"] == row.value and dict(row)["lr"] == row.lr and "ended_by" in row
    assert best["rank"] == best.rank == 1 and best.trial in {r.number for r in found.rows}
    with pytest.raises(KeyError):
        row["no_such_field"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.value = 1.0  # type: ignore[misc]


def test_missing_optuna_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"lightning-diag\[tune\]"):
        random_search(FACTORY, data(), center_lr=1e-2, n_trials=1)
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    assert run_tune(parser.parse_args([])) == 2  # before any training
    assert "lightning-diag[tune]" in capsys.readouterr().err


def test_tune_and_cli(tmp_path, capsys):
    summary = tune(FACTORY, TinyDigits(), lrs=(1e-2, 1e-4), sweep_steps=3, n_trials=2,
                   epochs=(1, 1), top_k=1, refine_epochs=1, run_dir=tmp_path / "api",
                   accelerator="cpu", limit_train_batches=2)
    assert summary.sweep.best_lr == 1e-2 and len(summary.refine.rows) == 1
    assert "## 3. Refined" in capsys.readouterr().out
    acc = events(tmp_path / "api" / "summary")
    assert acc.Tags()["tensors"] and refine_curve(1) in acc.Tags()["scalars"]

    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    args = parser.parse_args(["--datamodule", "tests.test_tuning:TinyDigits", "--lrs", "1e-2",
                              "--sweep-steps", "2", "--trials", "1", "--epochs", "1", "1",
                              "--top-k", "1", "--refine-epochs", "1", "--accelerator", "cpu",
                              "--model-kwargs", '{"arch": "mlp", "width": 8}',
                              "--run-dir", str(tmp_path / "cli")])
    assert run_tune(args) == 0
    assert "**Best**" in capsys.readouterr().out and (tmp_path / "cli" / "study.db").exists()
    bad = parser.parse_args(["--model", "no_such_module:Model"])
    assert run_tune(bad) == 2 and "no_such_module" in capsys.readouterr().err
    with pytest.raises(ValueError, match="package.module:Class"):
        load_class("DigitsClassifier")


@pytest.mark.parametrize(("argv", "says"), [
    (["--trials", "0"], "`--trials` must be an int >= 1, got 0."),
    (["--epochs", "5", "1"], "`--epochs` must be a (min, max) pair with min <= max, got (5, 1)."),
    (["--lrs", "0.1", "-1"], "`--lrs` (value 2) must be a finite number > 0, got -1.0."),
    (["--weight-decays", "-1"], "`--weight-decays` (value 1) must be a finite number >= 0"),
    (["--sweep-steps", "0"], "`--sweep-steps` must be an int >= 1, got 0."),
    (["--refine-epochs", "0"], "`--refine-epochs` must be an int >= 1, got 0."),
    (["--top-k", "0"], "`--top-k` must be an int >= 1, got 0."),
    (["--heartbeat", "-1"], "`--heartbeat` must be an int >= 1 or None, got -1."),
    (["--storage", "not a url"], "Cannot open the study's storage 'not a url': Could not parse"),
    (["--storage", "sqlite:////no/such/dir/study.db"], "unable to open database file."),
    (["--storage", "nosuchdb://host/db"], "Can't load plugin: sqlalchemy.dialects:nosuchdb."),
])
def test_tune_usage_errors_are_one_line_and_exit_2(argv, says, tmp_path, capsys):
    from lightning_diag.cli import main

    assert main(["tune", "--run-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-diag tune: ") and err.count("\n") == 1, err
    assert says in err, err
    assert not (tmp_path / "sweep").exists()  # refused before any training


def test_a_storage_url_error_hides_its_password(tmp_path):
    from lightning_diag.tuning.study import StorageError

    with pytest.raises(StorageError) as err:
        tune(FACTORY, TinyDigits(), storage="nosuchdb://tuner:s3cret@host/db", run_dir=tmp_path)
    assert "s3cret" not in str(err.value) and "nosuchdb://tuner:***@host/db" in str(err.value)


def test_workers_racing_to_create_a_shared_study_open_it_again(tmp_path, monkeypatch):
    # Three workers starting at once on a fresh SQLite study: one writes the schema's version
    # row after another did (measured: 1-2 of 3 workers died so in 2 of 4 runs); here the
    # first opening loses that race, deterministically.
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    class Racing(real):  # type: ignore[misc,valid-type]
        def __init__(self, url: str, **kwargs) -> None:
            calls.append(url)
            if len(calls) == 1:
                real(url, **kwargs)  # the other worker's creation
                raise sqlalchemy.exc.IntegrityError(
                    "INSERT INTO alembic_version", {},
                    Exception("UNIQUE constraint failed: alembic_version.version_num"))
            super().__init__(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    found = random_search(FACTORY, data(), center_lr=1e-2, n_trials=1, epochs=(1, 1),
                          storage=f"sqlite:///{tmp_path / 'shared.db'}", run_dir=tmp_path,
                          accelerator="cpu", limit_train_batches=2, heartbeat=None)
    assert len(calls) == 2 and [r.state for r in found.rows] == ["complete"]

"""CheckpointEnsemble: which checkpoints are kept, the fit-end evaluation, TB output, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.findings import load_findings
from lightning_diag.inference.ensemble import EnsembleModel, evaluate_members
from lightning_diag.tensorboard.tags import (
    COMBINED_RUN,
    ENSEMBLE,
    MEMBERS_RUN,
    ensemble_comparison,
)
from tests.families import FAMILIES
from tests.helpers import Classifier, codes, digits, events, loader, mlp, trainer


def _fit(tmp_path: Path, callbacks: list[pl.Callback], val: bool = True,
         **kw: Any) -> pl.Trainer:
    pl.seed_everything(0)
    model = Classifier(mlp(width=16), lr=0.02)
    opts: dict[str, Any] = {"max_epochs": 4, "limit_train_batches": 2, "deterministic": True}
    opts.update(kw)
    t = trainer(tmp_path, callbacks, **opts)
    ds = digits(96, flatten=True)
    t.fit(model, loader(ds, 32), loader(ds, 96, shuffle=False) if val else None)
    return t


@pytest.mark.parametrize("kw", [{"k": 0}, {"mode": "avg"}, {"combine": "median"},
                                {"every_n_epochs": 0}, {"monitor": 3}])
def test_arguments_validated(kw: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        CheckpointEnsemble(**kw)


def test_last_k_kept_and_ensemble_reported(tmp_path: Path) -> None:
    cb = CheckpointEnsemble(k=2)
    t = _fit(tmp_path, [cb])
    assert [Path(p).name for p in cb.paths] == ["epoch=2-step=6.ckpt", "epoch=3-step=8.ckpt"]
    assert sorted(p.name for p in Path(cb.paths[0]).parent.iterdir()) == [
        Path(p).name for p in cb.paths]  # evicted files deleted
    assert codes(cb.findings, "info") == {"ensemble.gain"} and not codes(cb.findings, "warn")
    gain = next(f for f in cb.findings if f.code == "ensemble.gain")
    # reference: the members rebuilt from the files, evaluated directly
    members = []
    for path in cb.paths:
        m = Classifier(mlp(width=16))
        m.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        members.append(m.eval())
    x, y = digits(96, flatten=True).tensors
    with torch.no_grad():
        probs = EnsembleModel(members)(x).exp()
    assert cb.results["ensemble"]["val_acc"] == pytest.approx(
        float((probs.argmax(1) == y).float().mean()))
    assert cb.results["ensemble"]["val_loss"] == pytest.approx(
        float(F.nll_loss(probs.log(), y)), rel=1e-5)
    want = evaluate_members(members, loader(digits(96, flatten=True), 96, shuffle=False))
    assert cb.results["members"] == [pytest.approx(r) for r in want["members"]]
    # the last checkpoint holds the final weights: the Trainer's last validation scored it too
    assert cb.results["members"][-1] == pytest.approx(
        {k: float(t.callback_metrics[k]) for k in ("val_loss", "val_acc")})
    best = max(r["val_acc"] for r in want["members"])
    assert gain.value == pytest.approx(want["ensemble"]["val_acc"] - best)
    assert "gain on `val_acc`" in gain.message and "10-class logits" in gain.message
    # one chart per metric: the members at their checkpoints' epochs, the ensemble beside them
    run = tmp_path / "tb" / "version_0"
    for name in ("val_acc", "val_loss"):
        members = events(run / MEMBERS_RUN).Scalars(ensemble_comparison(name))
        assert [e.step for e in members] == [2, 3]
        assert [e.value for e in members] == pytest.approx([r[name] for r in want["members"]])
        ensemble = events(run / COMBINED_RUN).Scalars(ensemble_comparison(name))
        assert [e.step for e in ensemble] == [2, 3]
        assert [e.value for e in ensemble] == pytest.approx([want["ensemble"][name]] * 2)
    assert not [t for t in events(run).Tags()["scalars"] if t.startswith(ENSEMBLE.prefix)]
    assert t.lightning_module.training and len(cb.hooks) == 0


@pytest.mark.parametrize("name", ["token_lm", "recurrent_lm", "regression", "segmentation",
                                  "multilabel", "dict_batches"])
def test_any_family_gets_its_ensemble_table(tmp_path: Path, name: str) -> None:
    pl.seed_everything(0)
    fam = FAMILIES[name]()
    # bare-tensor batches hold no target the defaults can read: the family says where it is
    cb = CheckpointEnsemble(k=2, **({"batch_to_target": fam.batch_to_target}
                                    if fam.batch_to_target else {}))
    t = trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=3, limit_val_batches=2,
                **fam.trainer_kwargs)
    t.fit(fam.module, fam.train, fam.val)  # completes: no forward on a guessed input
    (gain,) = [f for f in cb.findings if f.code == "ensemble.gain"]
    logged = {n for n in fam.metric_names[1:] if n is not None}  # what validation_step logs
    assert set(cb.results["ensemble"]) == logged
    assert all(set(r) == logged for r in cb.results["members"])
    assert cb.results["members"][-1] == pytest.approx(  # the final weights, as the Trainer saw
        {n: float(t.callback_metrics[n]) for n in logged}, rel=1e-5)
    headline = fam.metric_names[2] or fam.metric_names[1]
    assert f"gain on `{headline}`" in gain.message and gain.value is not None
    kind = {"regression": "members' outputs (regression)", "multilabel": "4 binary label(s)",
            "token_lm": "16-class log-probs", "recurrent_lm": "16-class log-probs"}.get(
                name, "-class logits")
    assert kind in cb.results["combined"], cb.results["combined"]
    records = {f.code: f for f in load_findings(tmp_path / "tb" / "version_0")}
    assert records["ensemble.gain"].details["ensemble"] == pytest.approx(cb.results["ensemble"])
    for run in (MEMBERS_RUN, COMBINED_RUN):
        tags = set(events(tmp_path / "tb" / "version_0" / run).Tags()["scalars"])
        assert tags == {ensemble_comparison(n) for n in logged}


def test_step_without_a_single_prediction_module_is_skipped(tmp_path: Path) -> None:
    class TwoParts(Classifier):
        def __init__(self) -> None:
            super().__init__(mlp(width=16), lr=0.02)
            self.head = torch.nn.Linear(10, 10)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", F.cross_entropy(self.head(self.net(batch[0])), batch[1]))

    cb = CheckpointEnsemble(k=2)
    t = trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2, logger=False)
    ds = digits(64, flatten=True)
    t.fit(TwoParts(), loader(ds, 32), loader(ds, 32, shuffle=False))
    (skipped,) = cb.findings
    assert skipped.code == "ensemble.skipped" and "call `self(...)`" in skipped.message


def test_top_k_by_monitor(tmp_path: Path) -> None:
    cb = CheckpointEnsemble(k=2, monitor="val_loss", mode="min")
    seen: list[float] = []

    class Watch(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen.append(float(trainer.callback_metrics["val_loss"]))

    _fit(tmp_path, [Watch(), cb])
    best_two = sorted(range(len(seen)), key=lambda i: seen[i])[:2]
    assert sorted(m["epoch"] for m in cb.kept) == sorted(best_two)
    assert [m["score"] for m in sorted(cb.kept, key=lambda m: m["score"])] == pytest.approx(
        sorted(seen)[:2])


def test_skipped_without_validation_or_enough_checkpoints(tmp_path: Path) -> None:
    cb = CheckpointEnsemble(k=2)
    _fit(tmp_path / "a", [cb], val=False, max_epochs=2)
    assert codes(cb.findings, "info") == {"ensemble.skipped"} and cb.results == {}
    cb1 = CheckpointEnsemble(k=1)
    _fit(tmp_path / "b", [cb1], max_epochs=2)
    assert codes(cb1.findings, "info") == {"ensemble.skipped"}


def test_missing_monitor_is_reported_once(tmp_path: Path) -> None:
    cb = CheckpointEnsemble(k=2, monitor="nope")
    _fit(tmp_path, [cb], max_epochs=3)
    assert [f.code for f in cb.findings].count("ensemble.no_monitor") == 1
    assert len(cb.kept) == 2


def test_main_run_unchanged_and_state_round_trip(tmp_path: Path) -> None:
    plain = _fit(tmp_path / "a", []).lightning_module.state_dict()
    cb = CheckpointEnsemble(k=2, monitor="val_acc", mode="max")
    with_cb = _fit(tmp_path / "b", [cb]).lightning_module.state_dict()
    assert all(torch.equal(plain[k], with_cb[k]) for k in plain)
    other = CheckpointEnsemble(k=2)
    other.load_state_dict(cb.state_dict())
    assert other.kept == cb.kept and other.paths == cb.paths


def test_users_failing_validation_step_on_the_copies_is_named(tmp_path: Path) -> None:
    class FailsOutsideValidation(Classifier):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if not self.trainer.validating:  # the copies run at fit end, outside the loop
                raise RuntimeError("reads a file only the loop opens")
            super().validation_step(batch, batch_idx)

    cb = CheckpointEnsemble(k=2)
    t = trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2, logger=False)
    ds = digits(64, flatten=True)
    t.fit(FailsOutsideValidation(mlp(width=16)), loader(ds, 32), loader(ds, 32, shuffle=False))
    assert t.current_epoch == 2  # the fit completed
    (f,) = cb.findings
    assert f.code == "ensemble.user_error" and f.severity == "warn"
    assert "`FailsOutsideValidation.validation_step` raised RuntimeError" in f.message

"""CheckpointEnsemble: which checkpoints are kept, the fit-end evaluation, TB output, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.inference.ensemble import EnsembleModel, evaluate_members
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
        probs = EnsembleModel(members)(x)
    assert cb.results["ensemble"]["acc"] == pytest.approx(float((probs.argmax(1) == y).float()
                                                                .mean()))
    want = evaluate_members(members, loader(digits(96, flatten=True), 96, shuffle=False))
    assert cb.results["members"] == [pytest.approx(r) for r in want["members"]]
    best = max(r["acc"] for r in want["members"])
    assert gain.value == pytest.approx(want["ensemble"]["acc"] - best)
    tags = events(tmp_path / "tb" / "version_0").Tags()["scalars"]
    assert {"diag/ensemble/ensemble_acc", "diag/ensemble/member_1/loss",
            "diag/ensemble/gain"} <= set(tags)
    assert t.lightning_module.training and len(cb.hooks) == 0


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

"""CheckpointEnsemble: which checkpoints are kept, the fit-end evaluation, TB output, resume."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.io import TorchCheckpointIO
from PIL import Image

from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.findings import load_findings
from lightning_diag.inference.ensemble import EnsembleModel, evaluate_members
from lightning_diag.tensorboard.figures import CARD_WIDTH
from lightning_diag.tensorboard.tags import ENSEMBLE, ENSEMBLE_FIGURE
from tests.families import FAMILIES
from tests.helpers import Classifier, codes, digits, events, loader, mlp, trainer
from tests.shared_cases import Shared, T, V


def _fit(tmp_path: Path, callbacks: list[pl.Callback], val: bool = True,
         ckpt_path: str | None = None, **kw: Any) -> pl.Trainer:
    pl.seed_everything(0)
    model = Classifier(mlp(width=16), lr=0.02)
    opts: dict[str, Any] = {"max_epochs": 4, "limit_train_batches": 2, "deterministic": True}
    opts.update(kw)
    t = trainer(tmp_path, callbacks, **opts)
    ds = digits(96, flatten=True)
    t.fit(model, loader(ds, 32), loader(ds, 96, shuffle=False) if val else None,
          ckpt_path=ckpt_path)
    return t


@pytest.mark.parametrize("kw", [{"k": 0}, {"k": 1}, {"mode": "avg"}, {"combine": "median"},
                                {"every_n_epochs": 0}, {"monitor": 3}])
def test_arguments_validated(kw: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        CheckpointEnsemble(**kw)


def test_one_checkpoint_is_refused_saying_an_ensemble_needs_two() -> None:
    with pytest.raises(ValueError, match=r"`k` must be an int >= 2 .*two members or more.*got 1"):
        CheckpointEnsemble(k=1)


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
    # one image of bars at the end (a line chart would smooth the members into one line), no
    # scalars and no sibling runs
    run = tmp_path / "tb" / "version_0"
    acc = events(run)
    assert [e.step for e in acc.Images(ENSEMBLE_FIGURE)] == [t.global_step]
    image = np.asarray(Image.open(io.BytesIO(acc.Images(ENSEMBLE_FIGURE)[0].encoded_image_string)))
    colours = {tuple(c) for c in image.reshape(-1, 3).tolist()}
    assert image.shape[1] >= 2 * CARD_WIDTH  # card-wide, at twice its pixels
    assert {(31, 119, 180), (214, 39, 40)} <= colours  # the members' blue, the ensemble's red
    assert not [t for t in acc.Tags()["scalars"] if t.startswith(ENSEMBLE.prefix)]
    assert not [d for d in run.iterdir() if d.is_dir() and any(d.glob("*tfevents*"))]
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
    assert len(events(tmp_path / "tb" / "version_0").Images(ENSEMBLE_FIGURE)) == 1


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
    assert cb.findings[0].message == ("No ensemble: no validation dataloader (none given, or "
                                      "`limit_val_batches=0`).")
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    trainer(tmp_path / "b", [cb], max_epochs=3, limit_train_batches=2).fit(
        Classifier(mlp(width=16)), loader(digits(64, flatten=True), 32),
        loader(empty, 8, shuffle=False))
    assert cb.findings[0].message == "No ensemble: the validation dataloader is empty."
    _fit(tmp_path / "c", [cb], max_epochs=1)
    assert cb.findings[0].message == ("No ensemble: only 1 checkpoint(s) kept (one every 1 "
                                      "epoch(s)), and an ensemble needs 2 or more.")


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


def _crafted_resume(tmp_path: Path, kept: list[dict[str, Any]]) -> tuple[CheckpointEnsemble,
                                                                       Path]:
    """A run of 2 epochs saved to a full checkpoint whose kept list is replaced by ``kept``
    (plain data: it loads under ``weights_only=True``), resumed for 2 more epochs with k=2."""
    ens = tmp_path / "ens"
    first = CheckpointEnsemble(k=2, dirpath=ens)
    t = _fit(tmp_path / "first", [first], max_epochs=2)
    ckpt = tmp_path / "crafted.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["callbacks"][first.state_key]["kept"] = kept
    torch.save(state, ckpt)
    cb = CheckpointEnsemble(k=2, dirpath=ens)
    _fit(tmp_path / "second", [cb], max_epochs=4, ckpt_path=str(ckpt))
    return cb, ens


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "symlinked_dir", "malformed"])
def test_a_crafted_checkpoint_cannot_make_it_delete_or_read_a_file_outside(
        tmp_path: Path, how: str) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    ens = tmp_path / "ens"
    ens.mkdir()
    listed = {"absolute": victim, "dotdot": ens / ".." / victim.name,
              "symlink": ens / "epoch=0-step=0.ckpt", "symlinked_dir": ens / "up" / victim.name}
    if how == "symlink":
        listed["symlink"].symlink_to(victim)
    if how == "symlinked_dir":
        (ens / "up").symlink_to(tmp_path, target_is_directory=True)
    entry: dict[str, Any] = (
        {"path": str(listed[how]), "score": None, "epoch": 0, "step": 0} if how in listed
        else {"path": [str(victim)], "epoch": "x"})
    cb, _ = _crafted_resume(tmp_path, [entry])
    assert victim.read_text() == "keep me"  # never deleted, never overwritten
    assert all(Path(p).resolve().parent == ens.resolve() for p in cb.paths)
    assert len(cb.paths) == 2 and all(p != entry["path"] for p in cb.paths)
    (ignored,) = [f for f in cb.findings if f.code == "ensemble.ignored_paths"]
    named = str(listed[how]) if how in listed else "not a kept-checkpoint entry"
    assert ignored.severity == "info" and named in ignored.message
    assert "left alone" in ignored.message and ignored.value == 1
    assert codes(cb.findings, "info") == {"ensemble.ignored_paths", "ensemble.gain"}
    if how == "symlink":
        assert listed["symlink"].is_symlink()  # not ours: the link itself is left too


def test_after_a_resume_only_files_written_in_this_process_are_deleted(tmp_path: Path) -> None:
    ens = tmp_path / "ens"
    first = CheckpointEnsemble(k=2, dirpath=ens)
    t = _fit(tmp_path / "first", [first], max_epochs=2)
    ckpt = tmp_path / "full.ckpt"
    t.save_checkpoint(ckpt)
    before = sorted(p.name for p in ens.iterdir())
    cb = CheckpointEnsemble(k=2, dirpath=ens)
    _fit(tmp_path / "second", [cb], max_epochs=4, ckpt_path=str(ckpt))
    # the restored entries (same directory) were kept, ranked and pruned, but their files,
    # written by another process, stay; the two this process wrote are the ensemble
    assert [Path(p).name for p in cb.paths] == ["epoch=2-step=6.ckpt", "epoch=3-step=8.ckpt"]
    assert sorted(p.name for p in ens.iterdir()) == sorted([*before, *map(
        lambda p: Path(p).name, cb.paths)])
    assert not [f for f in cb.findings if f.code == "ensemble.ignored_paths"]


def test_a_second_fit_starts_a_new_kept_list(tmp_path: Path) -> None:
    cb = CheckpointEnsemble(k=2)
    _fit(tmp_path / "a", [cb], max_epochs=2)
    first = list(cb.paths)
    assert len(first) == 2 and cb.results
    _fit(tmp_path / "b", [cb], max_epochs=3)
    assert all(Path(p).exists() for p in first)  # the first run's checkpoints are not pruned
    assert [Path(p).parent for p in cb.paths] == [tmp_path / "b" / "tb" / "version_0" /
                                                  "ensemble"] * 2
    assert len(cb.results["members"]) == 2
    (gain,) = [f for f in cb.findings if f.code == "ensemble.gain"]
    assert "Ensemble of 2 checkpoints" in gain.message


class _SaveBoth(pl.Callback):
    """At each epoch end, after the ensemble's save: Lightning's own save of the same moment."""

    def __init__(self, cb: CheckpointEnsemble) -> None:
        self.cb, self.pairs = cb, []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ours = Path(self.cb.kept[-1]["path"])
        theirs = ours.with_name(f"lightning-{trainer.current_epoch}.bin")
        trainer.save_checkpoint(theirs, weights_only=True)
        self.pairs.append((ours.read_bytes(), theirs.read_bytes(), ours.stat().st_mode,
                           theirs.stat().st_mode))
        theirs.unlink()


def test_each_checkpoint_is_lightnings_byte_for_byte_and_no_temporary_file_is_left(
        tmp_path: Path) -> None:
    cb = CheckpointEnsemble(k=2)
    both = _SaveBoth(cb)
    _fit(tmp_path, [cb, both], max_epochs=3)
    assert len(both.pairs) == 3
    for ours, theirs, mode, their_mode in both.pairs:
        assert ours == theirs and mode == their_mode
    assert sorted(p.name for p in Path(cb.paths[0]).parent.iterdir()) == [
        Path(p).name for p in cb.paths]  # no temporary file


class _CountingIO(TorchCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        self.saved.append(Path(path).name)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_a_custom_checkpoint_writer_still_writes_every_checkpoint(tmp_path: Path) -> None:
    cb, io = CheckpointEnsemble(k=2), _CountingIO()
    _fit(tmp_path, [cb], max_epochs=3, plugins=[io])
    assert io.saved == [f"epoch={e}-step={2 * e + 2}.ckpt" for e in range(3)]
    assert [Path(p).name for p in cb.paths] == io.saved[1:]


def test_a_checkpoint_ranked_below_the_k_kept_is_not_written(tmp_path: Path) -> None:
    """Issue 23 part 1: a new checkpoint the monitor ranks below ``k`` kept ones would be
    deleted as soon as written; it is not saved, and the kept files are those of before."""
    cb, io, seen = CheckpointEnsemble(k=2, monitor="val_loss", mode="max"), _CountingIO(), []

    class Watch(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen.append(float(trainer.callback_metrics["val_loss"]))

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            files = sorted(p.name for p in Path(cb.paths[0]).parent.iterdir())
            assert files == sorted(Path(p).name for p in cb.paths)  # no file but the kept

    _fit(tmp_path, [cb, Watch()], max_epochs=5, plugins=[io])
    ranked = sorted(range(5), key=lambda e: (-seen[e], -e))  # the worst dropped first
    best_two = sorted(ranked[:2])
    assert sorted(m["epoch"] for m in cb.kept) == best_two
    entered = [e for e in range(5) if e < 2 or seen[e] > sorted(seen[:e], reverse=True)[1]]
    assert io.saved == [f"epoch={e}-step={2 * e + 2}.ckpt" for e in entered]
    assert len(io.saved) < 5  # the loss fell: some were not written


SHARED = Shared(
    CheckpointEnsemble,
    run={"k": 2},
    guard={"k": 2},
    bad=[("k", 0, V), ("k", True, T), ("monitor", 3, T), ("monitor", "", V),
         ("mode", "avg", V), ("every_n_epochs", 0, V), ("combine", "median", V),
         ("dirpath", 3, T), ("dirpath", "", V), ("batch_to_target", "labels", T),
         ("strict", 1, T)],
    state=(lambda d: (CheckpointEnsemble(k=2, every_n_epochs=2, dirpath=d / "a"),
                      CheckpointEnsemble(k=2, dirpath=d / "b")),
           lambda cb: len(cb.kept), None),
)

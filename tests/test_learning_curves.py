from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_diag.callbacks.learning_curves import LearningCurves
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.tensorboard.tags import (
    CURVES_FIGURE,
    CURVES_GAP,
    TRAIN_RUN,
    VALIDATION_RUN,
    curve,
    learning_rate,
)
from tests.families import FAMILIES
from tests.helpers import Classifier, codes, digits, events, loader, mlp, trainer
from tests.shared_cases import Shared, T, V


def _fit(tmp_path, model, cbs, epochs=3, val=True, **kw):
    t = trainer(tmp_path, cbs, max_epochs=epochs, limit_train_batches=2, **kw)
    t.fit(model, loader(digits(64), batch_size=32),
          loader(digits(64), batch_size=32, shuffle=False) if val else None)
    return t


def _curve(t, quantity, run):
    return events(Path(t.logger.log_dir) / run).Scalars(curve(quantity))


def test_epoch_curves_in_sibling_runs_gap_and_figure(tmp_path):
    cb = LearningCurves()
    t = _fit(tmp_path, Classifier(mlp()), [cb, UpdateRatioMonitor(every_n_steps=1)])
    (keys,) = [f for f in cb.findings if f.code == "curves.keys"]
    assert keys.code == "curves.keys" and keys.severity == "info"
    assert keys.details["keys"] == {r: r for r in ("train_loss", "train_acc", "val_loss",
                                                   "val_acc")}
    acc = events(t.logger.log_dir)
    # train and val of one quantity: the same tag in two sibling runs, so one chart on every
    # dashboard, with epochs as steps
    for quantity in ("loss", "accuracy"):
        for run in (TRAIN_RUN, VALIDATION_RUN):
            assert [e.step for e in _curve(t, quantity, run)] == [0, 1, 2]
    last = t.callback_metrics
    assert _curve(t, "loss", VALIDATION_RUN)[-1].value == pytest.approx(float(last["val_loss"]))
    assert _curve(t, "loss", TRAIN_RUN)[-1].value == pytest.approx(float(last["train_loss"]))
    assert not [tag for tag in acc.Tags()["scalars"] if tag in (curve("loss"), curve("accuracy"))]
    gap = float(last["train_acc"]) - float(last["val_acc"])
    assert [e.step for e in acc.Scalars(CURVES_GAP)] == [0, 1, 2]
    assert acc.Scalars(CURVES_GAP)[-1].value == pytest.approx(gap, abs=1e-6)
    assert CURVES_FIGURE in acc.Tags()["images"]
    assert (tmp_path / "tb" / "version_0" / "learning_curves.png").is_file()


def test_missing_keys_give_one_info_finding(tmp_path):
    class NoAcc(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)  # -> train_loss_epoch
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    cb = LearningCurves()
    _fit(tmp_path, NoAcc(mlp()), [cb], logger=False)
    (f,) = [f for f in cb.findings if f.code == "curves.missing_keys"]
    assert f.severity == "info" and codes(cb.findings, "warn") == set()
    assert f.details["missing"] == ["train_acc", "val_acc"]
    assert "the training accuracy (under any common name" in f.message
    (keys,) = [f for f in cb.findings if f.code == "curves.keys"]
    assert keys.details["keys"] == {"train_loss": "train_loss", "val_loss": "val_loss"}
    assert [e for e, _ in cb.history["loss/train"]] == [0, 1, 2]  # found as train_loss_epoch
    assert "accuracy/gap" not in cb.history


def test_without_validation_only_train_curves(tmp_path):
    cb = LearningCurves()
    _fit(tmp_path, Classifier(mlp()), [cb], epochs=2, val=False, logger=False)
    assert set(cb.history) == {"loss/train", "accuracy/train"}
    assert codes(cb.findings, "warn") == set()


def test_state_dict_round_trip_and_validation():
    cb = LearningCurves()
    cb.history = {"loss/train": [(0, 1.5)]}
    other = LearningCurves()
    other.load_state_dict(cb.state_dict())
    assert other.history == cb.history
    with pytest.raises(ValueError, match="val_acc"):
        LearningCurves(val_acc="")
    with pytest.raises(ValueError, match="figure_every_n_epochs"):
        LearningCurves(figure_every_n_epochs=-2)


def test_all_four_monitors_leave_the_main_run_bit_identical(tmp_path):
    import lightning.pytorch as pl
    import torch

    from lightning_diag.callbacks.activation_histogram import ActivationHistogram
    from lightning_diag.callbacks.first_layer import FirstLayerVisualization
    from tests.helpers import cnn

    def run(cbs, sub):
        pl.seed_everything(0)
        model = Classifier(cnn(), optimizer="sgd", lr=0.05)
        _fit(tmp_path / sub, model, cbs, epochs=1, deterministic=True)
        return [p.detach().clone() for p in model.parameters()]

    watched = [LearningCurves(figure_every_n_epochs=1), FirstLayerVisualization(every_n_epochs=1),
               ActivationHistogram(every_n_steps=1), UpdateRatioMonitor(every_n_steps=1)]
    plain, seen = run([], "plain"), run(watched, "watched")
    assert all(torch.equal(a, b) for a, b in zip(plain, seen, strict=True))


def test_names_of_the_dict_batches_family_are_found(tmp_path):
    fam = FAMILIES["dict_batches"]()  # train/loss, train/acc, val/loss, val/acc (torchmetrics)
    cb = LearningCurves()
    t = trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2, limit_val_batches=2)
    t.fit(fam.module, fam.train, fam.val)
    (keys,) = [f for f in cb.findings if f.code == "curves.keys"]
    assert keys.details["keys"] == {"train_loss": "train/loss", "train_acc": "train/acc",
                                    "val_loss": "val/loss", "val_acc": "val/acc"}
    assert keys.details["given"] == [] and "`val/acc` as the validation accuracy" in keys.message
    assert codes(cb.findings, "info") == {"curves.keys", "curves.summary"}  # nothing missing
    logged = t.callback_metrics
    for (quantity, run), name in ((("loss", TRAIN_RUN), "train/loss"),
                                  (("accuracy", VALIDATION_RUN), "val/acc")):
        assert [e.step for e in _curve(t, quantity, run)] == [0, 1]
        assert _curve(t, quantity, run)[-1].value == pytest.approx(float(logged[name]))


def test_an_explicit_name_wins_and_a_missing_one_is_named(tmp_path):
    fam = FAMILIES["dict_batches"]()
    cb = LearningCurves(val_loss="train/loss", val_acc="val/top5")
    t = trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                logger=False)
    t.fit(fam.module, fam.train, fam.val)
    (keys,) = [f for f in cb.findings if f.code == "curves.keys"]
    assert keys.details["keys"]["val_loss"] == "train/loss" and keys.details["given"] == [
        "val_loss"]
    assert cb.history["loss/val"] == cb.history["loss/train"]  # read from the given name
    (missing,) = [f for f in cb.findings if f.code == "curves.missing_keys"]
    assert missing.details["missing"] == ["val/top5"] and "`val/top5` (given)" in missing.message
    assert "accuracy/val" not in cb.history


def test_the_learning_rate_of_every_param_group_per_epoch(tmp_path):
    class TwoGroups(Classifier):
        """Two parameter groups and a schedule halving the rate every epoch."""

        def configure_optimizers(self):
            first, *rest = list(self.parameters())
            opt = torch.optim.SGD([{"params": [first], "lr": 0.1},
                                   {"params": rest, "lr": 0.01}])
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    t = _fit(tmp_path, TwoGroups(mlp()), [LearningCurves()])
    acc = events(t.logger.log_dir)
    for group, start in (("SGD.group0", 0.1), ("SGD.group1", 0.01)):
        points = acc.Scalars(learning_rate(group))
        # the rate each epoch trained with (the epoch's scheduler step comes after)
        assert [e.step for e in points] == [0, 1, 2]
        assert [e.value for e in points] == pytest.approx([start * 0.5 ** k for k in range(3)])
    # one optimizer, one group: named by its class alone
    plain = _fit(tmp_path / "plain", Classifier(mlp(), lr=3e-3), [LearningCurves()], epochs=1)
    assert [e.value for e in events(plain.logger.log_dir).Scalars(learning_rate("Adam"))] == \
        pytest.approx([3e-3])


SHARED = Shared(
    LearningCurves,
    run={},
    guard={},
    bad=[("train_loss", 1.0, T), ("val_loss", "", V), ("train_acc", 3, T), ("val_acc", "", V),
         ("figure_every_n_epochs", -2, V), ("figure_every_n_epochs", True, T),
         ("strict", 1, T)],
    state=(lambda d: (LearningCurves(), LearningCurves(train_loss="train_acc")),
           lambda cb: cb.history.get("loss/train"), None),
)

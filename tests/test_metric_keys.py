"""Finding the logged train/val loss and accuracy by the names people use."""

from __future__ import annotations

import pytest

from lightning_diag.callbacks._metric_keys import ROLES, find_metric, find_metrics


@pytest.mark.parametrize(("name", "role"), [
    ("train_loss", "train_loss"), ("train/loss", "train_loss"), ("training_loss", "train_loss"),
    ("loss/train", "train_loss"), ("Train Loss", "train_loss"), ("train_loss_epoch", "train_loss"),
    ("val_loss", "val_loss"), ("val/loss", "val_loss"), ("valid_loss", "val_loss"),
    ("validation/loss", "val_loss"), ("loss/valid", "val_loss"), ("val-loss", "val_loss"),
    ("train_acc", "train_acc"), ("train/accuracy", "train_acc"), ("train.acc", "train_acc"),
    ("val_acc", "val_acc"), ("val/acc", "val_acc"), ("validation_accuracy", "val_acc"),
    ("valid/acc_epoch", "val_acc"), ("eval/accuracy", "val_acc"), ("val/top1", "val_acc"),
])
def test_common_names_are_found_and_only_for_their_role(name, role):
    assert find_metric([name], role) == name
    for other in ROLES:
        if other != role:
            assert find_metric([name], other) is None


@pytest.mark.parametrize("name", ["val_loss_ema", "val/acc_top5", "train_loss_step", "loss",
                                  "val_acc_gap", "lr-Adam", "val_f1", "test/loss"])
def test_other_metrics_are_never_taken(name):
    assert all(find_metric([name], role) is None for role in ROLES)


def test_preference_canonical_then_plain_then_epoch_twin():
    assert find_metric(["val/loss", "val_loss"], "val_loss") == "val_loss"
    assert find_metric(["val/loss_epoch", "val/loss"], "val_loss") == "val/loss"
    assert find_metric(["loss/val", "val/loss"], "val_loss") == "val/loss"
    # Deterministic whatever the order they were logged in.
    assert find_metric(["valid_loss", "val/loss"], "val_loss") == find_metric(
        ["val/loss", "valid_loss"], "val_loss")


def test_find_metrics_and_bad_role():
    logged = ["train/loss", "train/acc", "val/loss", "val/acc", "lr"]
    assert find_metrics(logged) == {"train_loss": "train/loss", "val_loss": "val/loss",
                                    "train_acc": "train/acc", "val_acc": "val/acc"}
    with pytest.raises(ValueError, match="`role` must be one of"):
        find_metric(logged, "val_f1")


def test_metric_keys_given_name_wins_is_read_as_its_epoch_twin_and_names_are_pinned():
    from lightning_diag.callbacks._metric_keys import MetricKeys

    keys = MetricKeys({"train_loss": "loss", "val_loss": None, "val_acc": None})
    assert keys.resolve(["loss_epoch", "loss_step", "train_loss", "val/loss"]) == {
        "train_loss": "loss_epoch", "val_loss": "val/loss"}  # the given name, not train_loss
    assert keys.missing_roles(["train_loss", "val_loss", "val_acc"]) == ["val_acc"]
    # later epochs: a found name stays (no switch to a better-ranked one), new roles are added
    assert keys.resolve(["val_loss", "val/loss", "val/acc"]) == {"val_acc": "val/acc"}
    assert keys.used == {"train_loss": "loss_epoch", "val_loss": "val/loss", "val_acc": "val/acc"}
    assert "`loss_epoch` as the training loss (given)" in keys.describe(["train_loss"])
    with pytest.raises(ValueError, match="Roles must be among"):
        MetricKeys({"val_f1": None})

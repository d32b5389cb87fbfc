"""EnsembleModel (any task, any forward signature, tuple and dict outputs), the evaluation of
members and ensemble through the user's own validation_step, safe loading, and the trainers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_diag.examples.digits import DigitsClassifier
from lightning_diag.functional.ensemble import combine_outputs
from lightning_diag.functional.task import Task, infer_task
from lightning_diag.inference.checkpoints import CheckpointLoadError
from lightning_diag.inference.ensemble import (
    EnsembleError,
    EnsembleModel,
    evaluate_members,
    train_ensemble,
    train_top_configs,
)
from tests.families import FAMILIES
from tests.helpers import Classifier, digits, loader, mlp


def _members(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 5) for _ in range(n)]


def test_logits_in_log_of_the_mean_probability_out() -> None:
    members, x = _members(), torch.randn(6, 4)
    want = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    with torch.inference_mode():
        got = EnsembleModel(members)(x)
    torch.testing.assert_close(got.exp(), want)
    torch.testing.assert_close(got.softmax(-1), want)  # valid logits for the user's loss
    torch.testing.assert_close(EnsembleModel(members).member_outputs(x),
                               torch.stack([m(x) for m in members]))
    log_probs = [nn.Sequential(m, nn.LogSoftmax(-1)) for m in members]
    with torch.no_grad():
        torch.testing.assert_close(EnsembleModel(log_probs)(x), want.log())  # log-probs stay
        probs = [nn.Sequential(m, nn.Softmax(-1)) for m in members]
        torch.testing.assert_close(EnsembleModel(probs)(x), want)  # probabilities stay


def test_mean_logit_vote_and_bad_arguments() -> None:
    members, x = _members(), torch.randn(6, 4)
    logits = torch.stack([m(x) for m in members])
    with torch.no_grad():
        torch.testing.assert_close(EnsembleModel(members, "mean_logit")(x), logits.mean(0))
        votes = EnsembleModel(members, "vote")(x).exp()
    for i in range(6):
        for c in range(5):
            want = sum(int(logits[k, i].argmax() == c) for k in range(3)) / 3
            assert votes[i, c] == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="combine"):
        EnsembleModel(members, "median")
    with pytest.raises(ValueError, match="models"):
        EnsembleModel([])
    with pytest.raises(ValueError, match="at least one member"):
        combine_outputs(torch.zeros(0, 3), Task("regression", "values"))


def test_regression_outputs_are_averaged_and_multilabel_scores_by_probability() -> None:
    torch.manual_seed(0)
    members, x = [nn.Linear(4, 1) for _ in range(3)], torch.randn(6, 4)
    with torch.no_grad():
        outs = torch.stack([m(x).squeeze(1) for m in members])
        regression = EnsembleModel([nn.Sequential(m, nn.Flatten(0)) for m in members])
        torch.testing.assert_close(regression(x), outs.mean(0))
        labels = [nn.Linear(4, 3) for _ in range(2)]
        task = infer_task(labels[0](x), torch.randint(0, 2, (6, 3)).float())
        assert task.kind == "multilabel"
        got = EnsembleModel(labels, task=task)(x)
        want = torch.stack([m(x).sigmoid() for m in labels]).mean(0)
    torch.testing.assert_close(got.sigmoid(), want)


class _Recurrent(nn.Module):
    """Returns ``(log_probs, hidden)`` like a recurrent language model."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.out = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> Any:
        h, hidden = self.rnn(x, hidden)
        return self.out(h).log_softmax(-1).reshape(-1, 6), hidden


class _HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, pixel_values: torch.Tensor, *, scale: float = 1.0) -> dict[str, Any]:
        return {"hidden": pixel_values * 2, "logits": self.net(pixel_values) * scale}


def test_any_signature_tuple_and_dict_outputs() -> None:
    torch.manual_seed(0)
    members, x = [_Recurrent() for _ in range(3)], torch.randn(2, 5, 3)
    with torch.no_grad():
        outs = [m(x) for m in members]
        log_probs, hidden = EnsembleModel(members)(x, hidden=None)
    want = torch.stack([o[0].exp() for o in outs]).mean(0).log()
    torch.testing.assert_close(log_probs, want)
    torch.testing.assert_close(hidden, outs[0][1])  # the rest of the output: the first member's
    dicts, y = [_HFStyle() for _ in range(2)], torch.randn(4, 4)
    with torch.no_grad():
        out = EnsembleModel(dicts)(pixel_values=y, scale=2.0)
        want = torch.stack([m.net(y).mul(2.0).softmax(-1) for m in dicts]).mean(0)
    assert list(out) == ["hidden", "logits"] and torch.equal(out["hidden"], y * 2)
    torch.testing.assert_close(out["logits"].softmax(-1), want)
    with pytest.raises(EnsembleError, match="differ in shape"):
        EnsembleModel([nn.Linear(4, 3), nn.Linear(4, 2)])(y)


# -- evaluate_members on the families: the user's own metrics, checked against direct maths ----
def _mean_prob_log(outs: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.stack([o.softmax(dim) for o in outs]).mean(0).log()


def _regression(members: list[Any], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    pred = torch.stack([m(batch[:, :-1]) for m in members]).mean(0)
    return {"val_loss": F.mse_loss(pred, batch[:, -1])}


def _token_lm(members: list[Any], batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    out = _mean_prob_log([m(x, y) for m in members], 1)  # log-probs in: same probabilities
    return {"val_loss": F.nll_loss(out, y.reshape(-1)),
            "val_acc": (out.argmax(1) == y.reshape(-1)).float().mean()}


def _segmentation(members: list[Any], batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    out = _mean_prob_log([m(x) for m in members], 1)
    return {"val_loss": F.cross_entropy(out, y), "val_acc": (out.argmax(1) == y).float().mean()}


def _multilabel(members: list[Any], batch: Any) -> dict[str, torch.Tensor]:
    x, y = batch
    out = torch.logit(torch.stack([m(x).sigmoid() for m in members]).mean(0))
    return {"val_loss": F.binary_cross_entropy_with_logits(out, y),
            "val_acc": ((out > 0).float() == y).float().mean()}


REFERENCES: dict[str, Callable[[list[Any], Any], dict[str, torch.Tensor]]] = {
    "regression": _regression, "token_lm": _token_lm, "segmentation": _segmentation,
    "multilabel": _multilabel}


def _epoch_mean(fn: Callable[[list[Any], Any], dict[str, torch.Tensor]], members: list[Any],
                batches: list[Any]) -> dict[str, float]:
    """Lightning's epoch value: the batch-size-weighted mean of each logged value."""
    sums: dict[str, float] = {}
    total = 0
    with torch.no_grad():
        for batch in batches:
            n = len(batch) if isinstance(batch, torch.Tensor) else len(batch[0])
            for name, value in fn(members, batch).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            total += n
    return {name: s / total for name, s in sums.items()}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_evaluate_members_scores_members_and_ensemble_with_the_users_own_step(name: str) -> None:
    members = []
    for seed in range(3):
        pl.seed_everything(seed, verbose=False)
        members.append(FAMILIES[name]().module)
    batches = [b for _, b in zip(range(2), FAMILIES[name]().val, strict=False)]
    res = evaluate_members(members, batches)
    fn = REFERENCES[name]
    for row, member in zip(res["members"], members, strict=True):
        assert row == pytest.approx(_epoch_mean(fn, [member], batches), rel=1e-5)
    assert res["ensemble"] == pytest.approx(_epoch_mean(fn, members, batches), rel=1e-4)
    assert res["ensemble"] != pytest.approx(res["members"][0])  # the members do differ
    assert "at the module's forward" in res["combined"]
    assert all(m.training for m in members)  # modes restored, hooks and log patches removed
    assert all(not m._forward_hooks and "log" not in vars(m) for m in members)


def test_evaluate_members_on_torchmetrics_and_a_submodule_prediction() -> None:
    pl.seed_everything(0, verbose=False)
    members = [FAMILIES["dict_batches"]().module for _ in range(2)]  # val/acc: torchmetrics
    batches = [b for _, b in zip(range(2), FAMILIES["dict_batches"]().val, strict=False)]
    res = evaluate_members(members, batches)
    x = torch.cat([b["pixel_values"] for b in batches])
    y = torch.cat([b["labels"] for b in batches])
    with torch.no_grad():
        probs = torch.stack([m(x).softmax(1) for m in members]).mean(0)
    assert res["ensemble"]["val/acc"] == pytest.approx(float((probs.argmax(1) == y).float()
                                                             .mean()))
    assert "10-class logits" in res["combined"]
    # a step calling `self.net(x)` (no forward of its own): the ensemble combines `net`
    nets = [_NetStep(mlp()) for _ in range(2)]
    ds = digits(64)
    res = evaluate_members(nets, loader(ds, 32, shuffle=False))
    x, y = ds.tensors
    with torch.no_grad():
        want = F.nll_loss(torch.stack([m.net(x).softmax(1) for m in nets]).mean(0).log(), y)
    assert res["ensemble"]["val_loss"] == pytest.approx(float(want), rel=1e-5)
    assert "at `self.net`" in res["combined"]


class _Counted(Classifier):
    """A classifier counting its forward calls (by instance: the ensemble's host is a copy),
    its step scaling the input by its own ``scale`` and calling the model ``repeats`` times."""

    def __init__(self, scale: float = 1.0, repeats: int = 1) -> None:
        super().__init__(mlp())
        self.scale, self.repeats, self.calls = scale, repeats, [0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls[0] += 1
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        inputs = x if self.scale == 1 else x * self.scale
        self.log("val_loss", sum(F.cross_entropy(self(inputs), y) for _ in range(self.repeats))
                 / self.repeats)


@pytest.mark.parametrize(("scales", "repeats", "runs"), [
    ((1.0, 1.0, 1.0), 1, [2, 2, 2]),  # 2 batches: each member's own steps only
    ((1.0, 0.5, 2.0), 1, [2, 4, 4]),  # other arguments: run again on the ensemble's
    ((1.0, 1.0, 1.0), 10, [24] * 3)])  # 8 calls a batch kept, the 2 others run again
def test_the_ensemble_reuses_a_members_prediction_only_for_the_same_arguments(
        scales, repeats, runs) -> None:
    """Each member runs once a batch in its own step; the ensemble's step merges the members'
    outputs of those steps when its call got the same arguments, and runs the members on its
    own arguments when not (a step whose input depends on the member): the metrics are those
    of the ensemble's own arguments either way, the members' their own."""
    pl.seed_everything(0, verbose=False)
    members = [_Counted(scale, repeats) for scale in scales]
    counts = [m.calls for m in members]  # deepcopy gives the host a list of its own
    ds = digits(64)
    res = evaluate_members(members, loader(ds, 32, shuffle=False))
    x, y = ds.tensors
    with torch.no_grad():  # the host is a copy of the first member: its arguments count
        probs = torch.stack([m.net(x * scales[0]).softmax(1) for m in members]).mean(0)
        own = [F.cross_entropy(m.net(x * m.scale), y) for m in members]
    assert res["ensemble"]["val_loss"] == pytest.approx(float(F.nll_loss(probs.log(), y)),
                                                        rel=1e-5)
    assert [r["val_loss"] for r in res["members"]] == pytest.approx([float(v) for v in own])
    assert [c[0] for c in counts] == runs
    assert all(not m._forward_hooks for m in members)


class _NetStep(Classifier):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))


class _TwoHeads(Classifier):
    def __init__(self) -> None:
        super().__init__(mlp())
        self.head = nn.Linear(10, 10)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self.head(self.net(batch[0])), batch[1]))


def test_evaluate_members_refuses_what_it_cannot_compare() -> None:
    with pytest.raises(EnsembleError, match="LightningModules with a `validation_step`"):
        evaluate_members([nn.Linear(64, 10)], [(torch.zeros(2, 64), torch.zeros(2).long())])
    with pytest.raises(EnsembleError, match=r"define `forward` and call `self\(...\)`"):
        evaluate_members([_TwoHeads(), _TwoHeads()], loader(digits(32), 16))
    with pytest.raises(EnsembleError, match="batches were empty"):
        evaluate_members([Classifier(mlp())], [])


def _save(path: Path, **hp: object) -> DigitsClassifier:
    model = DigitsClassifier(arch="mlp", **hp)  # type: ignore[arg-type]
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return model


def test_from_checkpoints_rebuilds_members(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = [_save(tmp_path / f"{i}.ckpt", width=8) for i in range(2)]
    ens = EnsembleModel.from_checkpoints(DigitsClassifier,
                                         [tmp_path / "0.ckpt", tmp_path / "1.ckpt"])
    assert not ens.training and all(not m.training for m in ens.members)
    x = torch.rand(5, 1, 8, 8)
    with torch.inference_mode():
        want = torch.stack([s.eval()(x).softmax(-1) for s in saved]).mean(0)
        torch.testing.assert_close(ens(x).exp(), want)


def test_from_checkpoints_checks_every_member_before_loading_any(tmp_path: Path) -> None:
    _save(tmp_path / "a.ckpt", width=8)
    _save(tmp_path / "b.ckpt", width=16)
    loaded: list[int] = []
    orig = nn.Module.load_state_dict

    def spy(self: nn.Module, *a: object, **k: object) -> object:
        loaded.append(1)
        return orig(self, *a, **k)  # type: ignore[arg-type]

    nn.Module.load_state_dict = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(CheckpointLoadError, match=r"b\.ckpt.*shape mismatches"):
            EnsembleModel.from_checkpoints(DigitsClassifier, [tmp_path / "a.ckpt",
                                                              tmp_path / "b.ckpt"], width=8)
    finally:
        nn.Module.load_state_dict = orig  # type: ignore[method-assign]
    assert loaded == []
    with pytest.raises(CheckpointLoadError, match=r"nope\.ckpt.*file not found"):
        EnsembleModel.from_checkpoints(DigitsClassifier, [tmp_path / "a.ckpt",
                                                          tmp_path / "nope.ckpt"])
    (tmp_path / "bad.ckpt").write_bytes((tmp_path / "a.ckpt").read_bytes()[:100])
    with pytest.raises(CheckpointLoadError, match=r"bad\.ckpt.*truncated"):
        EnsembleModel.from_checkpoints(DigitsClassifier, [tmp_path / "bad.ckpt"])
    with pytest.raises(ValueError, match="paths"):
        EnsembleModel.from_checkpoints(DigitsClassifier, str(tmp_path / "a.ckpt"))  # type: ignore


def _data() -> tuple[object, object]:
    ds = digits(96)
    return loader(ds, 32), loader(ds, 96, shuffle=False)


def test_train_ensemble_members_differ_by_seed_and_are_reproducible() -> None:
    factory = lambda: DigitsClassifier(arch="mlp", width=8)  # noqa: E731
    ens = train_ensemble(factory, _data(), seeds=(0, 1), max_steps=2, accelerator="cpu")
    again = train_ensemble(factory, _data(), seeds=(0,), max_steps=2, accelerator="cpu")
    w = [m.net[1].weight for m in ens.members]
    assert not torch.equal(w[0], w[1]) and torch.equal(w[0], again.members[0].net[1].weight)
    with pytest.raises(ValueError, match="seeds"):
        train_ensemble(factory, _data(), seeds=())


def test_train_top_configs_builds_one_member_per_config() -> None:
    configs = [{"arch": "mlp", "width": 8, "lr": 1e-2}, {"arch": "mlp", "width": 12},
               {"arch": "mlp", "width": 4}]
    ens = train_top_configs(DigitsClassifier, configs, _data(), k=2, max_steps=1,
                            accelerator="cpu")
    assert [m.hparams["width"] for m in ens.members] == [8, 12]
    with pytest.raises(ValueError, match="configs"):
        train_top_configs(DigitsClassifier, [], _data())
    with pytest.raises(ValueError, match="`k`"):
        train_top_configs(DigitsClassifier, configs, _data(), k=0)

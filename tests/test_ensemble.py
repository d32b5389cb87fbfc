"""EnsembleModel, its combination rules, safe loading from checkpoints, and the trainers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_diag.examples.digits import DigitsClassifier
from lightning_diag.functional.ensemble import combine_logits
from lightning_diag.inference.checkpoints import CheckpointLoadError
from lightning_diag.inference.ensemble import (
    EnsembleModel,
    evaluate_members,
    train_ensemble,
    train_top_configs,
)
from tests.helpers import digits, loader


def _members(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 5) for _ in range(n)]


def test_mean_prob_equals_mean_of_members_softmax() -> None:
    members, x = _members(), torch.randn(6, 4)
    want = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    with torch.inference_mode():
        got = EnsembleModel(members)(x)
    torch.testing.assert_close(got, want)


def test_mean_logit_and_vote() -> None:
    members, x = _members(), torch.randn(6, 4)
    logits = torch.stack([m(x) for m in members])
    with torch.no_grad():
        torch.testing.assert_close(EnsembleModel(members, "mean_logit")(x), logits.mean(0))
        votes = EnsembleModel(members, "vote")(x)
    for i in range(6):
        for c in range(5):
            assert votes[i, c] == sum(int(logits[k, i].argmax() == c) for k in range(3)) / 3
    with pytest.raises(ValueError, match="combine"):
        EnsembleModel(members, "median")
    with pytest.raises(ValueError, match="models"):
        EnsembleModel([])
    with pytest.raises(ValueError, match="members, batch, classes"):
        combine_logits(torch.zeros(2, 3))


def test_evaluate_members_matches_direct_computation() -> None:
    members = [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(2)]
    ds = digits(64)
    res = evaluate_members(members, loader(ds, 16, shuffle=False))
    x, y = ds.tensors
    with torch.no_grad():
        probs = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
        m0 = members[0](x)
    assert res["ensemble"]["loss"] == pytest.approx(float(F.nll_loss(probs.log(), y)), rel=1e-5)
    assert res["ensemble"]["acc"] == pytest.approx(float((probs.argmax(1) == y).float().mean()))
    assert res["members"][0]["loss"] == pytest.approx(float(F.cross_entropy(m0, y)), rel=1e-5)


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
        torch.testing.assert_close(ens(x), want)


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

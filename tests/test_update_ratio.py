import math
import statistics
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.tensorboard.tags import (
    GUIDE_RUN,
    UPDATE_RATIO,
    UPDATE_RATIO_MEDIAN,
    update_ratio_layer,
)
from tests.helpers import Classifier, cnn, codes, digits, events, loader, mlp, trainer
from tests.shared_cases import Shared, T, V


def _fit(tmp_path, model, cb, epochs=2, n=256, logger=False, **kw):
    t = trainer(tmp_path, [cb], max_epochs=epochs, logger=logger, **kw)
    t.fit(model, loader(digits(n), batch_size=32))
    return t


@pytest.mark.parametrize("net,opt,lr", [
    (lambda: mlp(), "adam", 1e-3),
    (lambda: mlp(), "sgd", 0.1),
    (lambda: cnn(), "sgd", 0.05),
])
def test_healthy_optimizers_are_quiet(tmp_path, net, opt, lr):
    pl.seed_everything(0)
    cb = UpdateRatioMonitor(every_n_steps=2)
    _fit(tmp_path, Classifier(net(), lr=lr, optimizer=opt), cb)
    assert codes(cb.findings) == set()
    assert 1e-4 < sorted(cb.last.values())[len(cb.last) // 2] < 0.2
    assert not cb._pending


def test_tiny_learning_rate_is_too_low(tmp_path):
    pl.seed_everything(0)
    cb = UpdateRatioMonitor(every_n_steps=2)
    _fit(tmp_path, Classifier(mlp(), lr=1e-6, optimizer="sgd"), cb, epochs=1)
    (f,) = [f for f in cb.findings if f.severity >= "warn"]
    assert f.code == "update_ratio.too_low" and f.value is not None and f.value < 1e-6
    assert "1e-05" in f.message


def test_diverging_learning_rate_is_too_high(tmp_path):
    pl.seed_everything(0)
    cb = UpdateRatioMonitor(every_n_steps=100)  # the early steps 1, 2, 4 catch the spike
    _fit(tmp_path, Classifier(mlp(), lr=20.0, optimizer="sgd"), cb, epochs=1)
    high = [f for f in cb.findings if f.code == "update_ratio.too_high"]
    value = high[0].value if high else None
    assert value is not None and value >= 1.0 and high[0].step in (1, 2)


def test_zero_gradients_are_zero_updates_not_a_small_lr(tmp_path):
    pl.seed_everything(0)
    net = mlp()
    with torch.no_grad():
        cast(nn.Linear, net[1]).bias.fill_(-50.0)  # every ReLU dead: all gradients zero
        cast(nn.Linear, net[3]).bias.fill_(-50.0)
    cb = UpdateRatioMonitor(every_n_steps=1)
    _fit(tmp_path, Classifier(net, lr=0.1, optimizer="sgd"), cb, epochs=1)
    found = codes(cb.findings)
    assert found == {"update_ratio.zero_updates"}
    (f,) = [f for f in cb.findings if f.code in found]
    assert "3 of 3 weight tensors" in f.message and "gradients are zero" in f.message
    assert "not a learning rate" in f.message


def test_log10_median_and_guide_run_are_logged_with_a_layout(tmp_path):
    pl.seed_everything(0)
    cb = UpdateRatioMonitor(every_n_steps=4)
    t = _fit(tmp_path, Classifier(mlp()), cb, epochs=1, logger=True)
    acc = events(t.logger.log_dir)
    median = acc.Scalars(UPDATE_RATIO_MEDIAN)
    assert [e.step for e in median] == [0, 1, 2, 4]
    assert median[-1].value == pytest.approx(
        math.log10(statistics.median(cb.last.values())), abs=1e-6)
    assert cb.tag_names["net.1.weight"] == "net.1_Linear.weight"  # with the layer's type
    layer = acc.Scalars(update_ratio_layer(cb.tag_names["net.1.weight"]))
    assert layer[-1].value == pytest.approx(math.log10(cb.last["net.1.weight"]), abs=1e-6)
    assert -5 < layer[-1].value < -1  # Adam 1e-3: near the recipe's -3, far from a raw ratio
    assert update_ratio_layer(cb.tag_names["net.1.bias"]) not in acc.Tags()["scalars"]
    guide = events(Path(t.logger.log_dir) / GUIDE_RUN)  # the -3 line, on the same charts
    assert set(guide.Tags()["scalars"]) == {t for t in acc.Tags()["scalars"]
                                            if t.startswith(UPDATE_RATIO.prefix)}
    assert [e.value for e in guide.Scalars(UPDATE_RATIO_MEDIAN)] == [-3.0] * 4
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_a_weight_that_did_not_move_is_minus_infinity(tmp_path):
    net = mlp()
    cb = UpdateRatioMonitor(every_n_steps=1)
    t = _fit(tmp_path, Classifier(net, lr=0.0, optimizer="sgd"), cb, epochs=1, logger=True)
    values = [e.value for e in events(t.logger.log_dir).Scalars(UPDATE_RATIO_MEDIAN)]
    assert values and all(v == -math.inf for v in values)


def test_exact_ratio_once_per_optimizer_step_with_accumulation_and_clipping(tmp_path):
    ratios = []

    class Spy(UpdateRatioMonitor):
        def _judge(self, trainer, reading, window):
            ratios.append(dict(reading.last))
            super()._judge(trainer, reading, window)

    pl.seed_everything(0)
    model = Classifier(mlp(), lr=0.1, optimizer="sgd")
    snapshots = []

    class Recorder(pl.Callback):  # the same step, measured independently
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            snapshots.append(pl_module.net[3].weight.detach().clone())

        def on_train_batch_end(self, trainer, pl_module, *args):
            if len(snapshots) > len(after):
                after.append(pl_module.net[3].weight.detach().clone())

    after: list[torch.Tensor] = []
    t = trainer(tmp_path, [Spy(every_n_steps=1), Recorder()], max_epochs=1, logger=False,
                accumulate_grad_batches=2, gradient_clip_val=0.5)
    t.fit(model, loader(digits(256), batch_size=32))
    assert len(ratios) == 4 == t.global_step  # 8 batches, 4 optimizer steps
    direct = ((after[0] - snapshots[0]).norm() / snapshots[0].norm()).item()
    assert ratios[0]["net.3.weight"] == pytest.approx(direct, rel=1e-5)


def test_several_optimizers_and_param_groups(tmp_path):
    class TwoOpts(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt_a, opt_b = cast("list[Any]", self.optimizers())
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            opt_a.zero_grad()
            opt_b.zero_grad()
            self.manual_backward(loss)
            opt_a.step()
            opt_b.step()

        def configure_optimizers(self):
            net = cast(nn.Sequential, self.net)
            head = list(net[5].parameters())
            body = [{"params": net[1].parameters(), "lr": 1e-3},
                    {"params": net[3].parameters(), "lr": 1e-4}]
            return torch.optim.Adam(body), torch.optim.SGD(head, lr=0.1)

    cb = UpdateRatioMonitor(every_n_steps=2)
    _fit(tmp_path, TwoOpts(), cb, epochs=1, n=128)
    assert set(cb.last) == {"net.1.weight", "net.3.weight", "net.5.weight"}
    assert all(v > 0 for v in cb.last.values()) and codes(cb.findings) == set()


def test_main_run_weights_unchanged(tmp_path):
    def run(cbs):
        pl.seed_everything(0)
        model = Classifier(mlp(), optimizer="adam")
        t = trainer(tmp_path, cbs, max_epochs=1, deterministic=True, logger=False)
        t.fit(model, loader(digits(128), batch_size=32))
        return [p.detach().clone() for p in model.parameters()]

    plain, watched = run([]), run([UpdateRatioMonitor(every_n_steps=1)])
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def test_state_dict_keeps_streaks():
    cb = UpdateRatioMonitor()
    cb.streak["too_low"] = 2
    other = UpdateRatioMonitor()
    other.load_state_dict(cb.state_dict())
    assert other.streak["too_low"] == 2


@pytest.mark.parametrize("kwargs,error,match", [
    ({"every_n_steps": 0}, ValueError, "every_n_steps"),
    ({"patience": True}, TypeError, "patience"),
    ({"low": 0.5, "high": 0.1}, ValueError, "low"), ({"extreme": 0.01}, ValueError, "extreme"),
])
def test_arguments_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        UpdateRatioMonitor(**kwargs)


SHARED = Shared(
    UpdateRatioMonitor,
    run={"every_n_steps": 2},
    guard={"every_n_steps": 1},
    bad=[("every_n_steps", True, T), ("low", 0, V), ("low", "a", T), ("high", 1e-6, V),
         ("extreme", 0.01, V), ("patience", True, T), ("patience", 0, V),
         ("log_charts", "no", T), ("strict", "x", T), ("early_steps", None, T),
         ("min_samples", 0, V), ("min_samples", True, T)],
    state=(lambda d: (UpdateRatioMonitor(every_n_steps=1),
                      UpdateRatioMonitor(every_n_steps=1, low=0.5, high=0.9, patience=100)),
           lambda cb: cb.streak["too_low"], None),
)

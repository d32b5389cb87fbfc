from typing import cast

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.tensorboard.tags import (
    ACTIVATIONS_SUMMARY,
    activation_histogram,
    activation_stat,
    typed_layer,
)
from tests.helpers import Classifier, cnn, codes, digits, events, loader, mlp, trainer
from tests.shared_cases import Shared, T, V


def _fit(tmp_path, model, cb, epochs=2, n=256, val=False, **kw):
    t = trainer(tmp_path, [cb], max_epochs=epochs, **kw)
    t.fit(model, loader(digits(n), batch_size=32),
          loader(digits(64), batch_size=32, shuffle=False) if val else None)
    return t


def _no_hooks(module):
    return not any(m._forward_hooks or m._backward_hooks for m in module.modules())


@pytest.mark.parametrize("net,opt,lr", [
    (lambda: mlp(), "adam", 1e-3),
    (lambda: cnn(), "sgd", 0.1),   # with BatchNorm
    (lambda: mlp(), "sgd", 0.05),  # without BatchNorm
])
def test_healthy_models_are_quiet_and_logged(tmp_path, net, opt, lr):
    pl.seed_everything(0)
    cb = ActivationHistogram(every_n_steps=4)
    model = Classifier(net(), lr=lr, optimizer=opt)
    t = _fit(tmp_path, model, cb, logger=opt == "adam")
    assert codes(cb.findings) == set()
    assert cb.last and _no_hooks(model) and len(cb.hooks) == 0
    assert all(not torch.isnan(torch.tensor(s["grad_norm"])) for n, s in cb.last.items()
               if n != "net.0")  # the Flatten of the input gets no gradient
    if opt == "adam":  # read everything back once
        acc = events(t.logger.log_dir)
        tags = acc.Tags()
        relu = typed_layer("net.2", "ReLU")  # the layer's module type is in its tags
        assert relu == "net.2_ReLU" and cb.layer_types["net.2"] == "ReLU"
        assert {activation_histogram("act", relu), activation_histogram("grad", relu)} <= set(
            tags["histograms"])
        hist = acc.Histograms(activation_histogram("act", relu))
        assert [h.step for h in hist] == [0, 4, 8, 12]  # 2 epochs x 8 steps: step 0, every 4
        assert hist[0].histogram_value.num == 32 * 32  # batch x width
        assert ACTIVATIONS_SUMMARY in tags["images"]
        assert activation_stat("dead_fraction", relu) in tags["scalars"]
        assert activation_stat("saturated_fraction", relu) not in tags["scalars"]


def test_dead_relus_are_flagged(tmp_path):
    pl.seed_everything(0)
    net = mlp()
    with torch.no_grad():
        cast(nn.Linear, net[1]).bias.fill_(-20.0)  # every first-layer ReLU off for inputs in [0, 1]
    cb = ActivationHistogram(every_n_steps=4)
    _fit(tmp_path, Classifier(net), cb, epochs=1, logger=False)
    dead = [f for f in cb.findings if f.code == "activations.dead_units"]
    assert dead and dead[0].details["layer"] == "net.2" and dead[0].value == 1.0
    assert len(dead) == len({f.details["layer"] for f in dead})  # once per layer


def test_a_dead_relu_before_a_max_pool_is_one_finding_that_blocks_every_gradient(tmp_path):
    pl.seed_everything(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        cast(nn.Conv2d, net[0]).bias.fill_(-20.0)  # every ReLU off for inputs in [0, 1]
    cb = ActivationHistogram(every_n_steps=2)
    _fit(tmp_path, Classifier(net), cb, epochs=1, n=128, logger=False)
    # the max-pool only passes the ReLU's zeros on: one fact, one finding, on the ReLU
    (dead,) = [f for f in cb.findings if f.code == "activations.dead_units"]
    assert (dead.subject, dead.details["passed_on_by"], dead.value) == ("net.1", ["net.2"], 1.0)
    assert "net.1 (ReLU)" in dead.message and "net.2 (MaxPool2d) after it" in dead.message
    assert dead.steps() == [0, 2]  # one finding, updated at each logging step
    (vanishing,) = [f for f in cb.findings if f.code == "gradients.vanishing"]
    assert "0x" not in vanishing.message
    assert vanishing.message.startswith("No gradient reaches net.0 (Conv2d): their gradient is "
                                        "exactly 0")
    assert "net.1 (ReLU) blocks it: every one of its units is dead" in vanishing.message
    assert vanishing.details["blocker"] == "net.1" and "LeakyReLU" in vanishing.advice
    (summary,) = [f for f in cb.findings if f.code == "activations.summary"]
    assert summary.value == 1.0 and "at net.1 (ReLU), step 0" in summary.message


def test_saturated_tanh_is_flagged(tmp_path):
    pl.seed_everything(0)
    net = mlp(nn.Tanh)
    with torch.no_grad():
        for layer in (cast(nn.Linear, net[1]), cast(nn.Linear, net[3])):
            layer.weight.mul_(30.0)
    cb = ActivationHistogram(every_n_steps=4)
    _fit(tmp_path, Classifier(net), cb, epochs=1, logger=False)
    assert "activations.saturation" in codes(cb.findings)
    assert cb.last["net.2"]["saturated_fraction"] > 0.5


def test_vanishing_gradients_in_a_deep_sigmoid_net(tmp_path):
    pl.seed_everything(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(8):
        layers += [nn.Linear(64 if i == 0 else 32, 32), nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(32, 10))
    cb = ActivationHistogram(every_n_steps=4)
    _fit(tmp_path, Classifier(net, optimizer="sgd", lr=0.01), cb, epochs=1, n=64,
         logger=False)
    assert "gradients.vanishing" in codes(cb.findings)


def test_hooks_exist_only_on_logging_training_steps(tmp_path):
    seen = []

    class Probe(Classifier):
        def training_step(self, batch, batch_idx):
            seen.append(("train", self.global_step, not _no_hooks(self)))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            seen.append(("val", self.global_step, not _no_hooks(self)))
            return super().validation_step(batch, batch_idx)

    model = Probe(mlp())
    _fit(tmp_path, model, ActivationHistogram(every_n_steps=4), epochs=1, val=True,
         logger=False)
    assert [s for kind, s, hooked in seen if hooked] == [0, 4]
    assert all(kind == "train" for kind, _, hooked in seen if hooked)
    assert any(kind == "val" for kind, _, _ in seen) and _no_hooks(model)


def test_hooks_removed_after_exception(tmp_path):
    class Boom(Classifier):
        def training_step(self, batch, batch_idx):
            self(batch[0])  # hooks fire, then the step fails
            raise RuntimeError("boom")

    model, cb = Boom(mlp()), ActivationHistogram(every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, model, cb, epochs=1)
    assert _no_hooks(model) and len(cb.hooks) == 0 and not cb._act


def test_on_cpu_the_worker_measures_and_nothing_is_lost_when_the_run_stops(tmp_path):
    """On CPU a logging step's numbers are computed off the training thread: the steps measured
    before an error still reach TensorBoard and the findings, and no thread is left."""
    import threading

    class FailsAtStep(Classifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    pl.seed_everything(0)
    net = mlp()
    net[1].bias.data.fill_(-20.0)  # dead ReLUs: a finding at every logging step
    cb = ActivationHistogram(every_n_steps=1)
    t = trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(FailsAtStep(net), loader(digits(256), batch_size=32))
    relu = typed_layer("net.2", "ReLU")
    hist = events(t.logger.log_dir).Histograms(activation_histogram("act", relu))
    assert [h.step for h in hist] == [0, 1, 2, 3, 4]  # every measured step, none lost
    (dead,) = [f for f in cb.findings if f.code == "activations.dead_units"]
    assert dead.steps() == [0, 1, 2, 3, 4]
    assert cb.last["net.2"]["act_hist"][2] == 32 * 32  # the counts, from the worker
    assert not any(th.name.startswith("lightning_diag") for th in threading.enumerate())


def test_main_run_weights_unchanged(tmp_path):
    def run(cbs):
        pl.seed_everything(0)
        model = Classifier(cnn(), optimizer="sgd", lr=0.05)
        t = trainer(tmp_path, cbs, max_epochs=1, deterministic=True, logger=False)
        t.fit(model, loader(digits(128), batch_size=32))
        return [p.detach().clone() for p in model.parameters()]

    plain, watched = run([]), run([ActivationHistogram(every_n_steps=1)])
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def test_gradients_are_unscaled_under_a_grad_scaler(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    def grad_norms(plugins):
        pl.seed_everything(0)
        cb = ActivationHistogram(every_n_steps=100)
        _fit(tmp_path, Classifier(mlp()), cb, epochs=1, n=32, logger=False, plugins=plugins)
        return {n: s["grad_norm"] for n, s in cb.last.items() if n != "net.0"}

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plain = grad_norms([])
    scaled = grad_norms([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    for name, value in plain.items():
        assert scaled[name] == pytest.approx(value, rel=0.05)


def test_bf16_run_and_accumulation_never_raise(tmp_path):
    cb = ActivationHistogram(every_n_steps=2)
    _fit(tmp_path, Classifier(cnn()), cb, epochs=1, n=128, precision="bf16-mixed",
         accumulate_grad_batches=2, logger=False)
    assert cb.last and codes(cb.findings) == set()


def test_layer_filter_and_state_dict():
    cb = ActivationHistogram(layers=["net.2"])
    model = Classifier(mlp())
    assert [n for n, _ in cb._chosen(model)] == ["net.2"]
    cb_fn = ActivationHistogram(layers=lambda n, m: isinstance(m, nn.Linear))
    assert [n for n, _ in cb_fn._chosen(model)] == ["net.1", "net.3", "net.5"]
    with pytest.raises(ValueError, match="net.99"):
        ActivationHistogram(layers=["net.99"])._chosen(model)
    cb._logs = 3
    other = ActivationHistogram()
    other.load_state_dict(cb.state_dict())
    assert other._logs == 3
    other.load_state_dict({"reported": ["activations.dead_units:net.2"], "logs": 1})  # older
    assert other._logs == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"every_n_steps": 0}, "every_n_steps"), ({"bins": 1.5}, "bins"),
    ({"dead_fraction": 2}, "dead_fraction"), ({"vanishing_ratio": 2}, "vanishing_ratio"),
    ({"layers": 3}, "layers"), ({"figure_every_n_logs": -1}, "figure_every_n_logs"),
])
def test_arguments_are_validated(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ActivationHistogram(**kwargs)


SHARED = Shared(
    ActivationHistogram,
    run={"every_n_steps": 2},
    guard={"every_n_steps": 1, "figure_every_n_logs": 1},
    bad=[("every_n_steps", True, T), ("every_n_steps", 0, V), ("layers", 3, T),
         ("layers", "net.1", T), ("layers", [], V), ("layers", ["net.1", 2], T),
         ("bins", 1.5, T), ("dead_fraction", 2, V), ("dead_fraction", 0, V),
         ("saturated_fraction", 0.0, V), ("vanishing_ratio", 2, V), ("exploding_ratio", 1, V),
         ("figure_every_n_logs", -1, V), ("figure_every_n_logs", True, T),
         ("log_charts", 1, T), ("strict", 0, T), ("bins", 10**6, V), ("early_steps", 1, T),
         ("min_samples", 0, V), ("min_samples", 2.5, T)],
    state=(lambda d: (ActivationHistogram(every_n_steps=1, layers=["net.1"], min_samples=1),
                      ActivationHistogram(every_n_steps=2, layers=["net.3"], min_samples=1)),
           lambda cb: cb._logs, None),
)

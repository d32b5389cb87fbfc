import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_diag.callbacks import InitialLossCheck
from lightning_diag.checks.initial_loss import check_initial_loss, loss_tolerance
from tests.helpers import Classifier, cnn, codes, digits, events, loader, mlp, text_events, trainer


def batches(n=2, size=64, flatten=False):
    data = digits(n * size, flatten=flatten)
    x, y = data.tensors
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n)]


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 1)

    def forward(self, x):
        return self.net(x).squeeze(1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Manual(Classifier):
    def __init__(self):
        super().__init__(mlp(width=8))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_healthy_default_init_passes(make, act):
    torch.manual_seed(0)  # the same initialization whatever ran before
    net = mlp(act, dropout=0.2) if make == "mlp" else cnn(act, dropout=0.2)
    found = check_initial_loss(Classifier(net), batches())
    assert codes(found) == set()
    ok = next(f for f in found if f.code == "initial_loss.ok")
    assert ok.expected[0] < math.log(10) < ok.expected[1]
    assert ok.value == pytest.approx(math.log(10), abs=0.15)


@pytest.mark.parametrize("seed", [0, 5, 7])
def test_scaled_up_last_layer_fails(seed):
    torch.manual_seed(seed)
    net = mlp(width=32)
    with torch.no_grad():
        net[-1].weight.mul_(30)
    found = check_initial_loss(Classifier(net), batches())
    assert "initial_loss.mismatch" in codes(found, "fail")
    (f,) = [f for f in found if f.code == "initial_loss.mismatch"]
    assert f.value > f.expected[1] and "log 10" in f.message and "last layer" in f.advice


def test_collapse_needs_confidence():
    timid, bold = mlp(width=16), mlp(width=16)
    with torch.no_grad():
        for net, bias in ((timid, 0.2), (bold, 6.0)):
            net[-1].weight.zero_()
            net[-1].bias.zero_()
            net[-1].bias[3] = bias
    # timid: every argmax is class 3 but probabilities stay near uniform (a healthy init)
    assert "initial_loss.collapsed" not in codes(check_initial_loss(Classifier(timid), batches()))
    found = check_initial_loss(Classifier(bold), batches())
    assert "initial_loss.collapsed" in codes(found, "warn")
    assert "class 3" in next(f.message for f in found if f.code == "initial_loss.collapsed")


def test_loss_tolerance_is_documented_band():
    assert loss_tolerance(math.log(10)) == pytest.approx(0.1 * math.log(10) + 0.05)
    assert loss_tolerance(1.0, rel_tol=0.0, abs_tol=0.2) == 0.2


def test_nan_loss_fails():
    net = mlp(width=8)
    with torch.no_grad():
        net[1].bias[0] = float("nan")
    found = check_initial_loss(Classifier(net), batches())
    assert "initial_loss.non_finite" in codes(found, "fail")


def test_regularization_must_raise_the_loss():
    good = Classifier(mlp(width=8), reg_strength=1e-3)
    found = check_initial_loss(good, batches(1), reg_attr="reg_strength")
    assert codes(found) == set()
    info = next(f for f in found if f.code == "initial_loss.regularization")
    assert "rises" in info.message
    bad = Classifier(mlp(width=8), reg_strength=1e-3, reg_sign=-1.0)
    found = check_initial_loss(bad, batches(1), reg_attr="reg_strength")
    assert "initial_loss.reg_not_increasing" in codes(found, "fail")
    assert bad.reg_strength == 1e-3  # restored
    # the data loss is measured at strength 0: a huge term does not cause a mismatch
    huge = Classifier(mlp(width=8), reg_strength=10.0)
    assert codes(check_initial_loss(huge, batches(1), reg_attr="reg_strength")) == set()
    with pytest.raises(AttributeError, match="nope"):
        check_initial_loss(good, batches(1), reg_attr="nope")


def test_without_reg_attr_reports_weight_decay():
    found = check_initial_loss(Classifier(mlp(width=8), weight_decay=0.01), batches(1))
    info = next(f for f in found if f.code == "initial_loss.regularization")
    assert info.severity == "info" and "weight decay 0.01" in info.message


def test_regression_gets_no_expectation_unless_given():
    x = torch.randn(32, 3)
    data = [(x, x.sum(1))]
    model = Regressor()
    found = check_initial_loss(model, data)
    assert "initial_loss.no_expectation" in codes(found, "info") and codes(found) == set()
    value = next(f.value for f in found if f.code == "initial_loss.no_expectation")
    assert codes(check_initial_loss(model, data, expected_loss=value)) == set()
    assert "initial_loss.mismatch" in codes(
        check_initial_loss(model, data, expected_loss=value + 10))


def test_num_classes_given_overrides_logit_width():
    found = check_initial_loss(Classifier(mlp(width=8)), batches(1), num_classes=1000)
    assert "initial_loss.mismatch" in codes(found)


def test_model_buffers_and_rng_untouched():
    model = Classifier(cnn(dropout=0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_initial_loss(model, batches())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_callback_in_trainer_logs_findings(tmp_path):
    cb = InitialLossCheck(num_batches=2)
    model = Classifier(mlp(width=8))
    trainer(tmp_path, [cb], limit_train_batches=1).fit(model, loader(digits(128, True)))
    assert {f.code for f in cb.findings} == {"initial_loss.ok", "initial_loss.regularization"}
    assert all(f.check == "InitialLossCheck" and f.step == 0 for f in cb.findings)
    table = text_events(events(tmp_path / "tb" / "version_0"), "diagnostics/InitialLossCheck")
    assert "initial_loss.ok" in table[0]
    assert len(cb.hooks) == 0 and not any(m._forward_hooks for m in model.modules())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


def test_bad_inputs_give_findings(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            x, y = digits(64, flatten=True).tensors
            return iter(zip(x, y, strict=True))

    cb = InitialLossCheck()
    trainer(tmp_path, [cb], limit_train_batches=1).fit(
        Classifier(mlp(width=8)), DataLoader(Stream(), batch_size=16))
    assert "initial_loss.ok" in {f.code for f in cb.findings}
    cb = InitialLossCheck()
    trainer(tmp_path, [cb]).fit(Classifier(mlp(width=8)),
                                loader(digits(0, True), shuffle=False))
    assert [f.code for f in cb.findings] == ["initial_loss.skipped"]
    cb = InitialLossCheck()
    trainer(tmp_path, [cb], limit_train_batches=1).fit(Manual(), loader(digits(32, True)))
    assert [f.code for f in cb.findings] == ["initial_loss.skipped"]
    assert "manual optimization" in cb.findings[0].message
    with pytest.raises(ValueError, match="batches"):
        check_initial_loss(Classifier(mlp()), [])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_batches": 0}, "num_batches"), ({"num_classes": 1}, "num_classes"),
    ({"expected_loss": float("nan")}, "expected_loss"), ({"rel_tol": -0.1}, "rel_tol"),
    ({"abs_tol": "x"}, "abs_tol"), ({"reg_attr": ""}, "reg_attr"),
    ({"reg_strengths": [0.0, 0.0]}, "reg_strengths"), ({"batch_to_input": 3}, "batch_to_input"),
    ({"batch_to_target": None}, "batch_to_target"), ({"strict": "no"}, "strict")])
def test_init_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        InitialLossCheck(**kwargs)

"""The prediction inside a user's step, and its replacement through forward hooks
(lightning_diag.checks.reference_outputs)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_diag.checks.reference_outputs import (
    PredictionTap,
    Substitution,
    main_prediction,
    record_predictions,
)
from tests.loss_programs import program

g = torch.Generator().manual_seed(0)
X, Y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


class Step(pl.LightningModule):
    """A step given as a function of the module and the batch."""

    def __init__(self, step, **modules):
        super().__init__()
        self.step = step
        for name, m in modules.items():
            setattr(self, name, m)

    def training_step(self, batch, batch_idx):
        return self.step(self, batch)


def _names(module, batch=(X, Y)):
    _, found, _ = record_predictions(module, batch)
    return [p.name for p in found]


def test_a_frozen_teacher_and_a_metric_are_no_predictions():
    teacher = nn.Linear(4, 3).requires_grad_(False)

    def step(m, batch):
        x, y = batch
        with torch.no_grad():
            soft = m.teacher(x).softmax(1)
        logits = m.student(x)
        return F.kl_div(logits.log_softmax(1), soft, reduction="batchmean") + m.ce(logits, y)

    module = Step(step, student=nn.Linear(4, 3), teacher=teacher, ce=nn.CrossEntropyLoss())
    assert _names(module) == ["student output"]


def test_every_head_the_loss_uses_and_no_state_kept_for_later():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 1)

        def forward(self, x):
            h = self.body(x)
            return {"logits": self.a(h), "value": self.b(h), "features": h}

    def step(m, batch):
        out = m.net(batch[0])
        m.kept = out["features"]  # not in this loss: no prediction
        return F.cross_entropy(out["logits"], batch[1]) + out["value"].pow(2).mean()

    assert _names(Step(step, net=Heads())) == ["net output['logits']", "net output['value']"]


def test_features_a_head_turns_into_logits_are_no_prediction():
    def step(m, batch):
        return F.cross_entropy(m.head(m.encoder(batch[0])), batch[1])

    module = Step(step, encoder=nn.Linear(4, 8), head=nn.Linear(8, 3))
    assert _names(module) == ["head output"]


def test_both_views_of_a_siamese_encoder_are_predictions():
    def step(m, batch):
        x = batch[0]
        return (m.encoder(x) - m.encoder(x.flip(0))).pow(2).mean()

    names = _names(Step(step, encoder=nn.Linear(4, 2)))
    assert names == ["encoder output (call 1)", "encoder output (call 2)"]


def test_substitution_replaces_through_hooks_and_keeps_the_structure():
    def step(m, batch):
        logits, value = m(batch[0])
        return F.cross_entropy(logits, batch[1]) + F.mse_loss(value, batch[0][:, 0])

    class TwoHeads(Step):
        def forward(self, x):
            return self.a(x), self.b(x).squeeze(-1)

    module = TwoHeads(step, a=nn.Linear(4, 3), b=nn.Linear(4, 1))
    _, found, _ = record_predictions(module, (X, Y))
    assert [p.name for p in found] == ["output[0]", "output[1]"]
    with Substitution(found, lambda j, out: found[j].form.know_nothing(out)) as sub:
        loss = float(sub.step(module, (X, Y)))
    # the know-nothing loss by hand: log 3 for zero logits, mean(x0^2) for a zero value
    assert loss == pytest.approx(math.log(3) + float((X[:, 0] ** 2).mean()), rel=1e-6)
    assert not module._forward_hooks and not module.a._forward_hooks
    # outside the context the step is the user's again
    assert float(module.training_step((X, Y), 0).detach()) != pytest.approx(loss)


def test_the_main_prediction_skips_a_loss_module_called_last():
    def step(m, batch):
        return m.criterion(m.net(batch[0]), batch[1])

    module = Step(step, net=nn.Linear(4, 3), criterion=nn.CrossEntropyLoss())
    _, found, tensors = record_predictions(module, (X, Y))
    # the outermost output is the criterion's loss, no prediction: the net's logits are the main
    assert main_prediction(found, tensors, torch.tensor(1.0)) == 0
    with PredictionTap(found[0]) as tap:
        tap.reset()
        module.training_step((X, Y), 0)
    assert tap.value is not None and tap.value.shape == (8, 3)


def test_activations_are_read_from_values_and_autograd():
    def step(m, batch):
        probs = m.net(batch[0])
        return F.nll_loss(probs.log(), batch[1]) + m.rate(batch[0]).exp().mean()

    module = Step(step, net=nn.Sequential(nn.Linear(4, 3), nn.Softmax(1)),
                  rate=nn.Linear(4, 1))
    _, found, _ = record_predictions(module, (X, Y))
    # the softmax is seen in the values; exp() is applied in the step, after the prediction
    assert [(p.form.activation, p.form.dim) for p in found] == [("softmax", 1), ("none", None)]


def test_the_programs_predictions():
    names = {"distillation": ["student output"], "vae": ["output[0]"],
             "infonce": ["output (call 1)", "output (call 2)"],
             "multitask": ["output[0]", "output[1]"], "density": ["net output"]}
    for name, expected in names.items():
        prog = program(name)
        batch = next(iter(prog.train))
        assert _names(prog.module, batch) == expected, name


def test_a_replay_gives_the_networks_own_losses_without_running_it():
    from lightning_diag.checks.reference_outputs import Replay

    prog = program("distillation")
    batches = [b for _, b in zip(range(3), prog.train, strict=False)]
    _, found, _ = record_predictions(prog.module, batches[0])
    replay = Replay(found)
    with torch.no_grad():
        with replay.recording():
            for i, b in enumerate(batches):
                replay.step(i)
                replay.losses[i] = float(prog.module.training_step(b, i))
        calls = []  # the network inside the student never runs while replayed
        handle = prog.module.student[0].register_forward_pre_hook(lambda m, a: calls.append(1))
        with replay.replaying(), Substitution(found, lambda j, out: found[j].form.know_nothing(
                out)) as sub:
            replayed = {}
            for i, b in enumerate(batches):
                replay.step(i)
                replayed[i] = float(sub.step(prog.module, b, i))
        handle.remove()
        assert calls == []
        # the know-nothing losses through the replay are those of the network run again
        with Substitution(found, lambda j, out: found[j].form.know_nothing(out)) as sub:
            real = {i: float(sub.step(prog.module, b, i)) for i, b in enumerate(batches)}
    assert replayed == pytest.approx(real, rel=1e-6)
    assert "forward" not in prog.module.student.__dict__  # the stand-in is gone
    with torch.no_grad(), replay.replaying():
        replay.step(0)
        assert replay.matches({0: float(prog.module.training_step(batches[0], 0)),
                               **{i: v for i, v in replay.losses.items() if i}})


def test_a_model_computing_its_own_loss_is_looked_into():
    # as a Hugging Face model given its labels: forward returns {"loss", "logits"}
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x, labels=None):
            logits = self.classifier(torch.relu(self.body(x)))
            loss = None if labels is None else F.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    def step(m, batch):
        return m.model(batch[0], labels=batch[1])["loss"]

    module = Step(step, model=WithLoss())
    _, found, _ = record_predictions(module, (X, Y))
    assert [p.name for p in found] == ["model.classifier output"]
    with Substitution(found, lambda j, out: found[j].form.know_nothing(out)) as sub:
        assert float(sub.step(module, (X, Y))) == pytest.approx(math.log(3), rel=1e-6)

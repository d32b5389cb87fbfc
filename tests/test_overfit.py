import math
import re

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_diag.callbacks import OverfitSmallBatch
from lightning_diag.checks.overfit import (
    BEYOND_CONSTANT,
    OverfitResult,
    overfit_batches,
    overfit_small_batch,
)
from lightning_diag.isolation import OptimizationSettings, first_batches
from lightning_diag.tensorboard.tags import OVERFIT_ACCURACY, OVERFIT_LOSS, overfit_ladder
from tests.families import FAMILIES
from tests.helpers import Classifier, cnn, codes, digits, events, loader, mlp, trainer
from tests.shared_cases import Shared, T, V


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):  # does not go through forward()
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(1), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(n=64, flatten=True, batch_size=16):
    return loader(digits(n, flatten=flatten), batch_size=batch_size)


@pytest.mark.parametrize(("make", "act"), [("mlp", nn.ReLU), ("mlp", nn.Tanh), ("cnn", nn.ReLU),
                                           ("cnn", nn.Tanh)])
def test_healthy_models_overfit(make, act):
    net = mlp(act, width=32, dropout=0.3) if make == "mlp" else cnn(act, dropout=0.3)
    result = overfit_small_batch(Classifier(net, lr=1e-2), data(flatten=make == "mlp"),
                                 num_batches=2, max_steps=400)
    assert result.reached and result.best_accuracy == 1.0
    assert result.best_loss <= 0.05 * result.initial_loss
    assert result.steps < 400 and "1 dropout layer(s)" in result.turned_off
    assert codes(result.findings()) == set()
    assert [f.code for f in result.findings()] == ["overfit.reached"]


def test_softmax_before_cross_entropy_fails_on_the_loss_floor():
    model = Classifier(mlp(width=32), lr=1e-2, softmax_before_ce=True)
    result = overfit_small_batch(model, data(), num_batches=2, max_steps=300)
    assert not result.reached and result.steps == 300
    assert result.best_loss > 0.3 * result.initial_loss  # stuck near log(1 + 9/e) = 1.46
    (f,) = result.findings()
    assert f.code == "overfit.not_reached" and f.severity == "fail"
    assert "best loss" in f.message and "300 steps" in f.message and "softmax" in f.advice


def test_unlearnable_labels_with_a_tiny_model_fail():
    x, _ = digits(96, flatten=True).tensors
    y = torch.randint(0, 10, (96,), generator=torch.Generator().manual_seed(0))
    tiny = Classifier(mlp(width=2), lr=1e-2)
    result = overfit_small_batch(tiny, loader(TensorDataset(x, y), batch_size=32),
                                 num_batches=3, max_steps=150)
    assert not result.reached and result.best_accuracy < 1.0
    assert [f.code for f in result.findings()] == ["overfit.not_reached"]


def test_regularization_is_turned_off_on_the_copy_only():
    model = Classifier(mlp(width=32, dropout=0.5), lr=1e-2, weight_decay=0.5, reg_strength=1.0)
    result = overfit_small_batch(model, data(), num_batches=2, max_steps=400,
                                 reg_attr="reg_strength")
    assert result.reached
    assert set(result.turned_off) == {"1 dropout layer(s)", "optimizer weight decay",
                                      "`reg_strength`"}
    assert model.reg_strength == 1.0 and model.net[3].training


def test_regression_uses_the_loss_criterion_only():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    dl = DataLoader(TensorDataset(x, x.sin().sum(1)), batch_size=16)
    result = overfit_small_batch(Regressor(), dl, num_batches=2, max_steps=600)
    assert result.best_accuracy is None and not result.classification
    assert result.reached and result.best_loss <= 0.05 * result.initial_loss


def test_nan_loss_is_a_clear_failure():
    net = mlp(width=8)
    with torch.no_grad():
        net[1].bias[0] = float("nan")
    result = overfit_small_batch(Classifier(net), data(), num_batches=1, max_steps=10)
    assert [f.code for f in result.findings()] == ["overfit.non_finite"]


def test_model_rng_and_sampler_untouched():
    model = Classifier(cnn(dropout=0.5), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dl = data(flatten=False)
    gen, rng = dl.generator.get_state().clone(), torch.get_rng_state()
    overfit_small_batch(model, dl, num_batches=2, max_steps=20, progress_bar=True)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(dl.generator.get_state(), gen)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model._forward_hooks


def test_curve_is_reported_per_pass():
    seen = []
    result = overfit_batches(Classifier(mlp(width=16), lr=1e-2),
                             [next(iter(data()))] * 3, max_steps=7,
                             on_pass=lambda s, loss, acc: seen.append(s), loss_fraction=0.001)
    assert seen == [3, 6, 7] and [s for s, _, _ in result.curve] == seen
    assert isinstance(result, OverfitResult) and result.num_batches == 3


def test_callback_logs_curve_to_tensorboard(tmp_path):
    cb = OverfitSmallBatch(num_batches=2, max_steps=400)
    model = Classifier(mlp(width=32), lr=1e-2)
    trainer(tmp_path, [cb], limit_train_batches=1).fit(model, data())
    assert [f.code for f in cb.findings] == ["overfit.reached"]
    acc = events(tmp_path / "tb" / "version_0")
    losses = acc.Scalars(OVERFIT_LOSS)
    assert len(losses) == len(cb.result.curve) and losses[-1].step == cb.result.steps
    assert acc.Scalars(OVERFIT_ACCURACY)[-1].value == 1.0
    assert len(cb.hooks) == 0 and not any(m._forward_hooks for m in model.modules())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


def test_bad_inputs_give_findings_or_clear_errors(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            x, y = digits(32, flatten=True).tensors
            return iter(zip(x, y, strict=True))

    cb = OverfitSmallBatch(num_batches=2, max_steps=300)
    trainer(tmp_path, [cb], limit_train_batches=1).fit(
        Classifier(mlp(width=32), lr=1e-2), DataLoader(Stream(), batch_size=16))
    assert [f.code for f in cb.findings] == ["overfit.reached"]
    cb = OverfitSmallBatch()
    trainer(tmp_path, [cb]).fit(Classifier(mlp(width=8)), loader(digits(0, True), shuffle=False))
    assert [f.code for f in cb.findings] == ["overfit.skipped"]
    with pytest.raises(ValueError, match="no batch"):
        overfit_small_batch(Classifier(mlp()), loader(digits(0, True), shuffle=False))
    manual = Classifier(mlp())
    manual.automatic_optimization = False  # its step returns the loss: judged as it is
    assert overfit_small_batch(manual, data(), max_steps=2).steps == 2


def test_several_optimizers_are_refused_clearly_by_lightning(tmp_path):
    class Two(Classifier):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.1),
                    torch.optim.SGD(self.parameters(), lr=0.1)]

    with pytest.raises(Exception, match="multiple optimizers") as info:
        trainer(tmp_path, [OverfitSmallBatch()]).fit(Two(mlp(width=8)), data())
    assert "lightning_diag" not in str(info.traceback[-1].path)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_batches": 0}, "num_batches"), ({"max_steps": 2.5}, "max_steps"),
    ({"loss_fraction": 1.0}, "loss_fraction"), ({"reg_attr": 3}, "reg_attr"),
    ({"batch_to_target": 1}, "batch_to_target"),
    ({"progress_bar": 1}, "progress_bar"), ({"strict": None}, "strict")])
def test_init_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        OverfitSmallBatch(**kwargs)


FAMILY_NAMES = sorted(FAMILIES)


def family_batches(name, broken=None, num_batches=2, seed=0):
    torch.manual_seed(seed)
    fam = FAMILIES[name](broken)
    return fam, first_batches(fam.train, num_batches, torch.device("cpu"))


#: The accuracy each family's output gets, and whether 100 % of it is required.
SHAPES = {"image_classifier": ("10-class logits", True), "dict_batches": ("10-class logits", True),
          "segmentation": ("3-class logits", False), "token_lm": ("16-class log-probs", False),
          "recurrent_lm": ("16-class log-probs", False),
          "multilabel": ("4 binary label(s) (logits)", True), "regression": (None, True)}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_healthy_family_overfits_with_accuracy_per_shape(name):
    fam, batches = family_batches(name)
    settings = OptimizationSettings.from_trainer(pl.Trainer(logger=False, **fam.trainer_kwargs))
    # the regression family's batches are one tensor each: features, then the target
    target = {"batch_to_target": fam.batch_to_target} if fam.batch_to_target else {}
    result = overfit_batches(fam.module, batches, max_steps=600, settings=settings, **target)
    task, required = SHAPES[name]
    assert result.reached, result.findings()[0].message
    assert [f.code for f in result.findings()] == ["overfit.reached"]
    assert result.accuracy_required is required
    if task is None:  # regression: the loss rule alone
        assert result.best_accuracy is None and result.task == "regression"
    else:  # measured per sample, pixel, token or label
        assert result.task == task and result.best_accuracy is not None
        assert result.best_accuracy == 1.0 or not required


def test_pooled_accuracy_matches_a_count_by_hand():
    fam, batches = family_batches("segmentation")

    class Frozen(type(fam.module)):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # the outputs never change

    fam.module.__class__ = Frozen
    result = overfit_batches(fam.module, batches, max_steps=2)
    with torch.no_grad():
        hits = sum(int((fam.module(x).argmax(1) == y).sum()) for x, y in batches)
    assert result.best_accuracy == hits / sum(y.numel() for _, y in batches)


@pytest.mark.parametrize("name", ["segmentation", "multilabel", "dict_batches"])
def test_a_squashing_before_the_loss_fails_on_the_loss(name):
    fam, batches = family_batches(name, "softmax_before_loss")
    result = overfit_batches(fam.module, batches, max_steps=300)
    assert not result.reached and result.best_loss > 0.3 * result.initial_loss
    assert [f.code for f in result.findings()] == ["overfit.not_reached"]


def test_a_negative_initial_loss_cannot_be_overfit():
    fam, batches = family_batches("token_lm", "softmax_before_loss")  # nll_loss of probabilities
    result = overfit_batches(fam.module, batches, max_steps=50)
    (f,) = result.findings()
    assert f.code == "overfit.not_reached" and result.steps == 0
    assert "is not positive" in f.message and "nll_loss" in f.message


def recurrent_callback_run(tmp_path, **trainer_kwargs):
    fam, batches = family_batches("recurrent_lm")
    cb = OverfitSmallBatch(num_batches=2, max_steps=60, progress_bar=False)
    trainer(tmp_path, [cb], logger=False, limit_train_batches=1, **trainer_kwargs).fit(
        fam.module, fam.train)
    return fam, batches, cb.result


def test_recurrent_lm_overfits_with_the_trainers_clipping(tmp_path):
    _, batches, result = recurrent_callback_run(tmp_path, gradient_clip_val=0.25)
    assert result.reached and "gradient clipping (norm) at 0.25" in result.settings
    assert result.lr == 5.0  # the family's configure_optimizers
    # The Trainer-free call with the same settings trains the same copy, step for step ...
    torch.manual_seed(0)
    fresh = FAMILIES["recurrent_lm"]().module
    clipped = overfit_batches(fresh, batches, max_steps=60,
                              settings=OptimizationSettings(gradient_clip_val=0.25))
    assert clipped.curve == result.curve
    # ... and without the clipping it trains another way
    plain = overfit_batches(fresh, batches, max_steps=60)
    assert plain.curve != clipped.curve and "no gradient clipping" in plain.settings


def test_recurrent_lm_without_the_trainers_clipping(tmp_path):
    _, _, result = recurrent_callback_run(tmp_path)
    assert result.settings.startswith("no gradient clipping")
    # measured: the tiny LSTM survives its lr unclipped, the loss rule is met more slowly
    assert result.reached


def test_accumulation_counts_optimizer_steps(tmp_path):
    fam, batches = family_batches("image_classifier", num_batches=3)
    settings = OptimizationSettings(accumulate_grad_batches=2)
    result = overfit_batches(fam.module, batches, max_steps=6, loss_fraction=1e-3,
                             settings=settings)
    # a pass of 3 batches is 2 steps (a window of 2, then the pass's end), as in an epoch
    assert [s for s, _, _ in result.curve] == [2, 4, 6]
    assert "2 batches accumulated per step" in result.settings


def test_precision_of_the_run_is_used():
    seen = []

    class Recording(Classifier):
        def training_step(self, batch, batch_idx):
            seen.append((batch[0].dtype, self.net[1].weight.dtype, self(batch[0]).dtype))
            return super().training_step(batch, batch_idx)

    model = Recording(mlp(width=8), lr=1e-2)
    for precision, dtypes in (("64-true", (torch.float64,) * 3),
                              ("bf16-mixed", (torch.float32, torch.float32, torch.bfloat16))):
        seen.clear()
        result = overfit_batches(model, [next(iter(data()))], max_steps=2,
                                 settings=OptimizationSettings(precision=precision))
        assert set(seen) == {dtypes} and precision in result.settings
    assert model.net[1].weight.dtype == torch.float32


def test_the_learning_rate_is_the_one_configure_optimizers_sets():
    class Warmup(Classifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.5)
            return [opt], [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1)]

    result = overfit_batches(Warmup(mlp(width=8)), [next(iter(data()))], max_steps=1)
    assert result.lr == pytest.approx(0.05) and "lr 0.05" in result.findings()[0].message


def _ladder(model, steps=300, **kwargs):
    torch.manual_seed(0)
    return overfit_small_batch(model, data(), num_batches=2, max_steps=steps, **kwargs)


def test_the_ladder_finds_a_learning_rate_too_low():
    result = _ladder(Classifier(mlp(width=32), lr=1e-5))
    (f,) = result.findings()
    assert not result.reached and f.code == "overfit.not_reached" and f.severity == "warn"
    ladder = f.details["ladder"]
    assert ladder["verdict"] == "lr_too_low" and ladder["configured_lr"] == pytest.approx(1e-5)
    found = result.rung()
    assert found is not None and found.lr == ladder["overfits_at"] > 1e-5
    assert [r["lr"] for r in ladder["tried"]] == [1e-4, 1e-6, 0.1][:len(ladder["tried"])]
    assert (f"overfits at lr {found.lr:.0e} in {found.steps} steps: the configured 1e-05 is too "
            "low") in f.message
    assert f"Train at about lr {found.lr:.0e}" in f.advice


def test_the_ladder_finds_a_learning_rate_too_high():
    result = _ladder(Classifier(mlp(width=32), lr=50.0, optimizer="sgd"))
    (f,) = result.findings()
    assert f.severity == "warn" and f.details["ladder"]["verdict"] == "lr_too_high"
    assert f.details["ladder"]["overfits_at"] < 50.0
    assert "the configured 50 is too high" in f.message


def test_no_learning_rate_fixes_a_true_bug():
    x, _ = digits(64, flatten=True).tensors
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))  # noise labels
    torch.manual_seed(0)
    result = overfit_small_batch(Classifier(mlp(width=2), lr=1e-2),
                                 loader(TensorDataset(x, y), batch_size=32), num_batches=2,
                                 max_steps=150)
    (f,) = result.findings()
    assert f.severity == "fail" and f.details["ladder"]["verdict"] == "no_rate"
    assert [r.lr for r in result.ladder] == [0.1, 1e-3, 1e-4] and not result.rung()
    assert ("No learning rate from 1e-04 to 1e-01 overfits (tried 1e-01, 1e-03, 1e-04, up to 150 "
            "steps each): look at the loss, the labels and the data pipeline.") in f.message
    assert "architectures" in f.advice


def test_the_ladder_runs_only_when_the_sample_is_not_overfit():
    assert _ladder(Classifier(mlp(width=32), lr=1e-2)).ladder == []
    off = _ladder(Classifier(mlp(width=32), lr=1e-5), lr_ladder=False)
    assert off.ladder == [] and "ladder" not in off.findings()[0].details


def test_full_accuracy_with_a_slowly_falling_loss_has_overfit():
    # a trainable head on frozen random features: 100% accuracy long before the loss reaches a
    # strict target; the recipe's criterion is the accuracy, the loss is information
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))
    net[1].requires_grad_(False)
    result = overfit_small_batch(Classifier(net, lr=1e-2), data(160), num_batches=5,
                                 max_steps=150, loss_fraction=0.002)
    assert result.reached and result.loss_above_target and result.steps == 150
    assert result.accuracy_step is not None and result.accuracy_step < 150
    (f,) = result.findings()
    assert f.code == "overfit.reached" and f.severity == "info" and not result.ladder
    assert f"100% accuracy at step {result.accuracy_step} (the recipe's criterion)" in f.message
    assert {k: f.details[k] for k in ("accuracy_step", "loss_above_target")} == {
        "accuracy_step": result.accuracy_step, "loss_above_target": True}
    # the loss's own floor, measured at memorising outputs: a plain cross-entropy's is ~0
    assert f.details["floor"]["value"] < 1e-6 and not f.details["floor"]["squashed"]


def test_callback_logs_one_ladder_curve_per_learning_rate(tmp_path):
    cb = OverfitSmallBatch(num_batches=2, max_steps=100, progress_bar=False)
    torch.manual_seed(0)
    trainer(tmp_path, [cb], limit_train_batches=1).fit(Classifier(mlp(width=32), lr=1e-5),
                                                       data())
    assert cb.result is not None and cb.result.ladder
    acc = events(tmp_path / "tb" / "version_0")
    for rung in cb.result.ladder:
        points = acc.Scalars(overfit_ladder(rung.lr))
        assert [p.step for p in points] == [s for s, _, _ in rung.curve]
        assert points[-1].value == pytest.approx(rung.curve[-1][1])
    from tensorboard.plugins.custom_scalar import layout_pb2

    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    (chart,) = [c for cat in layout.category for c in cat.chart
                if c.title == "loss on the small sample per learning rate"]
    wanted = [OVERFIT_LOSS] + [overfit_ladder(r.lr) for r in cb.result.ladder]
    patterns = list(chart.multiline.tag)  # regular expressions, one per series
    assert len(patterns) == len(wanted)
    assert all(re.fullmatch(p, tag) for p, tag in zip(patterns, wanted, strict=True))


# --- floors measured, not assumed (issue 20) --------------------------------------------------
def _program_batches(name, **kwargs):
    from tests.loss_programs import program

    prog = program(name, **kwargs)
    return prog, first_batches(prog.train, 5, torch.device("cpu"))


def test_a_softmax_as_the_models_last_layer_is_shown_to_be_probabilities():
    class SoftmaxLast(Classifier):
        def __init__(self):
            super().__init__(nn.Sequential(mlp(width=32), nn.Softmax(dim=1)), lr=1e-2)
            self.criterion = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            return self.criterion(self(batch[0]), batch[1])

    result = overfit_small_batch(SoftmaxLast(), data(), num_batches=2, max_steps=200)
    (f,) = result.findings()
    assert f.code == "overfit.not_reached" and f.severity == "fail" and not result.ladder
    assert result.squashed and result.probabilities
    assert result.floor.value == pytest.approx(math.log(1 + 9 / math.e), rel=1e-3)
    assert "output itself is probabilities" in f.message and "softmax" in f.advice


def test_a_softmax_before_a_smoothed_cross_entropy_is_still_squashed():
    prog, batches5 = _program_batches("smoothing_0.2_functional")

    class Squashed(type(prog.module)):
        def loss(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x).softmax(1), y, label_smoothing=0.2)

    prog.module.__class__ = Squashed
    result = overfit_batches(prog.module, batches5, max_steps=100)
    assert result.squashed and not result.reached and not result.ladder
    assert result.findings()[0].severity == "fail"
    # no captured probabilities here: the squash is in the step, said so without the claim
    assert not result.probabilities
    assert "output itself" not in result.findings()[0].message


def test_a_frozen_network_and_a_zero_learning_rate_fail():
    prog, batches5 = _program_batches("noisy_regressor")
    prog.module.requires_grad_(False)
    prog.module.net[-1].bias.requires_grad_(True)  # an optimizer needs one parameter
    frozen = overfit_batches(prog.module, batches5, max_steps=200, lr_ladder=False)
    prog, batches5 = _program_batches("noisy_regressor")
    prog.module.lr = 0.0
    still = overfit_batches(prog.module, batches5, max_steps=200)
    for result in (frozen, still):
        (f,) = result.findings()
        assert f.code == "overfit.not_reached" and f.severity == "fail"
        assert not result.natural_floor and not result.ladder
        assert (result.beyond_constant() or 0.0) < BEYOND_CONSTANT
    assert "shared by every sample" in frozen.findings()[0].message


def test_targets_shuffled_apart_from_their_inputs_are_no_natural_floor():
    prog, _ = _program_batches("noisy_regressor")
    x, y = prog.train.dataset.tensors
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(99))]
    shuffled = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 80, 16)]
    result = overfit_batches(prog.module, shuffled, lr_ladder=False)
    (f,) = result.findings()
    assert f.code == "overfit.not_reached" and f.severity == "fail"
    assert result.constant_loss is not None and not result.natural_floor
    # the same network on the true targets learns from its inputs down to the noise
    healthy, batches5 = _program_batches("noisy_regressor")
    floor = overfit_batches(healthy.module, batches5)
    assert floor.natural_floor and floor.findings()[0].code == "overfit.floor"
    assert floor.beyond_constant() > 3 * (result.beyond_constant() or 0.0)


@pytest.mark.slow
def test_a_vae_that_cannot_see_its_inputs_fails():
    prog, batches5 = _program_batches("vae")

    class Blind(type(prog.module)):
        def forward(self, x):
            return super().forward(torch.zeros_like(x))

    prog.module.__class__ = Blind
    result = overfit_batches(prog.module, batches5, lr_ladder=False)
    assert result.findings()[0].code == "overfit.not_reached"
    assert (result.beyond_constant() or 0.0) < 0.05 < BEYOND_CONSTANT


def test_mixup_inside_the_step_reports_accuracy_without_requiring_it():
    prog, batches5 = _program_batches("mixup")
    result = overfit_batches(prog.module, batches5)
    assert not result.accuracy_required and result.best_accuracy is not None
    assert result.findings()[0].severity == "info"


def test_a_sigmoid_before_a_regression_loss_is_shown_squashed():
    fam, batches2 = family_batches("regression", "softmax_before_loss")  # a sigmoid, in fact
    result = overfit_batches(fam.module, batches2, max_steps=300,
                             batch_to_target=fam.batch_to_target)
    (f,) = result.findings()
    assert f.code == "overfit.not_reached" and f.severity == "fail" and not result.ladder
    assert result.squashed and not result.natural_floor
    assert "comes out of a sigmoid, in (0, 1)" in f.message and "remove it" in f.advice


SHARED = Shared(
    OverfitSmallBatch,
    run={"num_batches": 1, "max_steps": 10, "progress_bar": False},
    guard={"num_batches": 1, "max_steps": 50, "loss_fraction": 0.5, "progress_bar": False},
    bad=[("num_batches", 0, V), ("max_steps", 2.5, T), ("loss_fraction", 1.0, V),
         ("loss_fraction", 0, V), ("reg_attr", 3, T), ("batch_to_target", 1, T),
         ("progress_bar", 1, T), ("lr_ladder", "yes", T), ("strict", None, T)],
    state=(lambda d: (OverfitSmallBatch(num_batches=1, max_steps=2, progress_bar=False),
                      OverfitSmallBatch(num_batches=1, max_steps=3, progress_bar=False)),
           lambda cb: cb.done, lambda cb: setattr(cb, "done", False)),
)

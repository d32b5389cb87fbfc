"""Side experiments on steps that read ``self.trainer``, and under manual optimization.

The copy a side experiment runs sees a :class:`~lightning_diag.isolation.TrainerView`: the run's
epoch, step and datamodule, logging made harmless, its own optimizers (whose steps change
nothing) and ``manual_backward`` recorded, so that the pre-flight checks run on such steps and
leave the main run bit-identical.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_diag.batch import NoLossError, step_loss
from lightning_diag.callbacks import GradientCheck, InitialLossCheck, OverfitSmallBatch
from lightning_diag.checks.gradients import check_gradients
from lightning_diag.checks.initial_loss import check_initial_loss
from lightning_diag.findings import Severity
from lightning_diag.isolation import TrainerView, clone_module, configured_optimizers
from tests.families import FAMILIES
from tests.helpers import Classifier, codes, digits, events, loader, mlp, trainer


def side_checks(overfit: bool = True) -> list[pl.Callback]:
    checks: list[pl.Callback] = [InitialLossCheck(num_batches=1),
                                 GradientCheck(num_samples=2, coords_per_tensor=3)]
    if overfit:
        checks.append(OverfitSmallBatch(num_batches=1, max_steps=300, progress_bar=False))
    return checks


def fit(model: pl.LightningModule, tmp_path: Any, checks: list[pl.Callback], **kw: Any) -> Any:
    t = trainer(tmp_path, checks, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                **kw)
    t.fit(model, loader(digits(64), batch_size=16))
    return t


def findings_of(checks: list[pl.Callback]) -> list[Any]:
    return [f for c in checks for f in c.findings]  # type: ignore[attr-defined]


# --- 4. steps that read self.trainer -------------------------------------------------------
READS = {
    "trainer.current_epoch": lambda m: m.trainer.current_epoch + 1,
    "trainer.global_step": lambda m: m.trainer.global_step + 1,
    "current_epoch and global_step": lambda m: (m.current_epoch, m.global_step),
    "log sync_dist": lambda m: m.log("extra", torch.tensor(1.0), sync_dist=True),
    "trainer.max_epochs": lambda m: m.trainer.max_epochs,
    "logger.experiment": lambda m: m.logger.experiment.add_scalar("side/extra", 1.0, 0),
    "trainer.datamodule": lambda m: m.trainer.datamodule,
}


class Reading(Classifier):
    def __init__(self, read: str) -> None:
        super().__init__(mlp(), lr=1e-2)
        self.read = read

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        READS[self.read](self)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("read", list(READS))
def test_steps_reading_the_trainer_are_checked(read, tmp_path):
    checks = side_checks()
    fit(Reading(read), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert {"gradient_check.ok", "initial_loss.ok", "overfit.reached"} <= codes(found, "info")


class Data(pl.LightningDataModule):
    classes = 10

    def train_dataloader(self) -> Any:
        return loader(digits(64), batch_size=16)


class ReadsDatamodule(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.trainer.datamodule.classes == 10
        return super().training_step(batch, batch_idx)


def test_the_datamodule_is_the_runs(tmp_path):
    checks = side_checks(overfit=False)
    t = trainer(tmp_path, checks, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    t.fit(ReadsDatamodule(mlp()), datamodule=Data())
    assert codes(findings_of(checks)) == set()
    assert {"gradient_check.ok", "initial_loss.ok"} <= codes(findings_of(checks), "info")


class Family(pl.LightningModule):
    """A mixin for a family's module: its step reads the trainer before running."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("epoch_seen", float(self.trainer.current_epoch + self.global_step),
                 sync_dist=True)
        _ = self.trainer.max_epochs, self.trainer.datamodule
        return super().training_step(batch, batch_idx)  # type: ignore[misc]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_reading_the_trainer_is_checked(name, tmp_path):
    # the initial weights: unseeded, the segmentation family's first batch misses its initial-
    # loss band at about 1 init in 30, and 2 in 30 multilabel and dict-batch inits leave fewer
    # than 10 judged comparisons at coords_per_tensor=3 (measured, seeds 0-29)
    torch.manual_seed(0)
    family = FAMILIES[name]()
    module = family.module
    module.__class__ = type(f"Reading{type(module).__name__}", (Family, type(module)), {})
    kw = {} if family.batch_to_target is None else {"batch_to_target": family.batch_to_target}
    checks = [InitialLossCheck(num_batches=1, **kw),
              GradientCheck(num_samples=2, coords_per_tensor=3)]
    t = trainer(tmp_path, checks, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                **family.trainer_kwargs)
    t.fit(module, family.train)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert not any(f.code.endswith((".user_error", ".skipped")) for f in found)


def test_writes_stay_on_the_view_and_nothing_reaches_the_real_logs(tmp_path):
    class Stopper(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if isinstance(self.trainer, TrainerView):
                self.trainer.should_stop = True
                self.logger.experiment.add_scalar("from_the_copy", 1.0, 0)
            return super().training_step(batch, batch_idx)

    checks = side_checks(overfit=False)
    model = Stopper(mlp())
    t = fit(model, tmp_path, checks)
    assert not t.should_stop and t.global_step == 2  # the main run trained on
    assert "from_the_copy" not in events(tmp_path).Tags()["scalars"]


ACTIONS = {  # what the step does, and what the skip names
    "save_checkpoint": (lambda m, path: m.trainer.save_checkpoint(path / f"s{m.global_step}.ckpt"),
                        "`self.trainer.save_checkpoint`"),
    "fit_loop": (lambda m, path: m.trainer.fit_loop.epoch_loop.batch_progress,
                 "`self.trainer.fit_loop`"),
    "iterating train_dataloader": (lambda m, path: next(iter(m.trainer.train_dataloader)),
                                   "`self.trainer.train_dataloader`"),
    "callbacks": (lambda m, path: m.trainer.callbacks, "`self.trainer.callbacks`"),
    "strategy.checkpoint_io": (lambda m, path: m.trainer.strategy.checkpoint_io,
                               "`self.trainer.strategy.checkpoint_io`"),
    "precision_plugin.forward_context": (
        lambda m, path: m.trainer.precision_plugin.forward_context,
        "`self.trainer.precision_plugin.forward_context`"),
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_what_could_act_on_the_real_run_is_refused_and_the_checks_step_aside(action, tmp_path):
    """A step reading what is not one of the run's read-only facts: every side experiment
    steps aside (INFO ``.skipped`` naming the attribute), the real Trainer is never called
    from the copy."""
    calls: list[str] = []
    act, named = ACTIONS[action]

    class Acting(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            calls.append(type(self.trainer).__name__)
            act(self, tmp_path)
            return super().training_step(batch, batch_idx)

    checks = side_checks()
    fit(Acting(mlp()), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert {f.code for f in found} == {"initial_loss.skipped", "gradient_check.skipped",
                                       "overfit.skipped"}, [f.message for f in found]
    assert all(f"{named} is not offered to a side experiment" in f.message
               for f in found), found[0].message
    assert calls.count("TrainerView") == 3  # one step per check, then each stepped aside
    assert calls.count("Trainer") == 2  # the main run's own steps ran
    if action == "save_checkpoint":  # only the main run's two steps wrote
        assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["s0.ckpt", "s1.ckpt"]


def test_configure_optimizers_reading_what_is_refused_steps_aside(tmp_path):
    class Acting(Classifier):
        def configure_optimizers(self) -> Any:
            _ = self.trainer.fit_loop.epoch_loop
            return super().configure_optimizers()

    checks = side_checks()
    fit(Acting(mlp()), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert "overfit.skipped" in codes(found, "info")
    assert "`self.trainer.fit_loop` is not offered" in next(
        f.message for f in found if f.code == "initial_loss.regularization")


def test_the_length_of_the_runs_loader_is_read_not_its_batches(tmp_path):
    class PerEpoch(Classifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            total = self.trainer.estimated_stepping_batches  # sets the loaders up
            per_epoch = len(self.trainer.train_dataloader)
            assert self.trainer.train_dataloader.batch_size == 16
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(
                opt, 0.1, total_steps=int(total), steps_per_epoch=per_epoch, epochs=1)}

    checks = side_checks()
    t = fit(PerEpoch(mlp()), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert {"gradient_check.ok", "initial_loss.ok", "overfit.reached"} <= codes(found, "info")
    assert t.global_step == 2


def test_the_view_reads_what_lightning_modules_read(tmp_path):
    """The facts a step reads (Lightning's own LightningModule properties among them) come
    from the real run; the logged metrics are copies. (``num_training_batches`` is read too,
    but the Trainer sets it after fit start, when the side experiments have run.)"""
    seen: dict[str, Any] = {}

    class Facts(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            t = self.trainer
            facts = {n: getattr(t, n) for n in (
                "current_epoch", "global_step", "max_epochs", "max_steps", "world_size",
                "global_rank", "local_rank", "node_rank", "is_global_zero", "precision",
                "estimated_stepping_batches", "accumulate_grad_batches",
                "training", "sanity_checking", "log_every_n_steps", "datamodule")}
            facts.update(local=self.local_rank, rank=self.global_rank,
                         device=t.strategy.root_device, module=t.lightning_module is self,
                         model=t.strategy.model is self)
            if isinstance(t, TrainerView):
                t.callback_metrics["from_the_copy"] = torch.tensor(1.0)
            self.print("a step that prints")  # reads is_global_zero and progress_bar_callback
            seen.setdefault(type(t).__name__, facts)
            return super().training_step(batch, batch_idx)

    checks = side_checks(overfit=False)
    t = fit(Facts(mlp()), tmp_path, checks, max_steps=5)
    assert codes(findings_of(checks)) == set()
    view, real = seen["TrainerView"], seen["Trainer"]
    assert view.pop("module") and view.pop("model") and real.pop("module")
    real.pop("model")
    assert view == real
    assert "from_the_copy" not in t.callback_metrics


def test_a_copy_checked_without_a_trainer_reads_epoch_and_step_zero():
    model = Reading("current_epoch and global_step")
    x, y = digits(8, flatten=True).tensors
    assert [f.code for f in check_gradients(model, (x, y), coords_per_tensor=3)] == [
        "gradient_check.ok"]
    view = clone_module(model).trainer
    assert isinstance(view, TrainerView) and view.current_epoch == view.global_step == 0
    with pytest.raises(AttributeError, match="without a Trainer"):
        _ = view.datamodule


# --- 5. manual optimization ------------------------------------------------------------------
class Manual(Classifier):
    """One optimizer stepped by hand; ``zero_grad`` and a scheduler as people write them."""

    def __init__(self, closure: bool = False, zero_grad: bool = True, **kw: Any) -> None:
        super().__init__(mlp(**kw), lr=1e-2)
        self.automatic_optimization = False
        self.closure, self.zero = closure, zero_grad

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        x, y = batch
        opt = self.optimizers()

        def compute() -> torch.Tensor:
            loss = F.cross_entropy(self(x), y)
            if self.zero:
                opt.zero_grad()
            self.manual_backward(loss)
            self.log("train_loss", loss)
            return loss

        if self.closure:
            opt.step(closure=compute)
        else:
            compute()
            self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
            opt.step()
        self.lr_schedulers().step()

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


@pytest.mark.parametrize("closure", [False, True])
def test_manual_optimization_gets_the_pre_flight_checks(closure, tmp_path):
    torch.manual_seed(0)  # the initial weights: a step that clips must pass at any of them
    checks = side_checks()
    fit(Manual(closure=closure), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert {"gradient_check.ok", "initial_loss.ok", "overfit.reached"} <= codes(found, "info")


class WrongSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x  # should be 2x


class ManualBroken(Manual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[:3](x)
        return self.net[3:](WrongSquare.apply(h))


def test_a_bug_of_a_manual_model_is_caught(tmp_path):
    checks = side_checks(overfit=False)
    fit(ManualBroken(), tmp_path, checks)
    assert "gradient_check.mismatch" in codes(findings_of(checks))


class GAN(pl.LightningModule):
    """A generator and a discriminator, each stepped on its own loss (toggled)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))
        self.disc = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0].flatten(1)
        g_opt, d_opt = self.optimizers()
        fake = self.gen(torch.randn(len(real), 8))
        self.toggle_optimizer(g_opt)
        g_loss = F.binary_cross_entropy_with_logits(self.disc(fake), torch.ones(len(real), 1))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        self.toggle_optimizer(d_opt)
        d_loss = (F.binary_cross_entropy_with_logits(self.disc(real), torch.ones(len(real), 1))
                  + F.binary_cross_entropy_with_logits(self.disc(fake.detach()),
                                                       torch.zeros(len(real), 1))) / 2
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        self.untoggle_optimizer(d_opt)
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.gen.parameters(), lr=2e-4),
                torch.optim.Adam(self.disc.parameters(), lr=2e-4)], []


def test_a_gan_step_is_stepped_aside_from_with_the_reason(tmp_path):
    checks = side_checks()
    fit(GAN(), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set()
    assert {f.code for f in found} == {"initial_loss.skipped", "gradient_check.skipped",
                                       "overfit.skipped"}
    assert all("manual optimization with 2 optimizers" in f.message for f in found)
    assert all(f.severity is Severity.INFO for f in found)


def test_several_manual_backward_calls_have_no_one_loss():
    class Twice(Manual):
        def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
            x, y = batch
            for half in (slice(0, 4), slice(4, 8)):
                self.manual_backward(F.cross_entropy(self(x[half]), y[half]))

    copy = clone_module(Twice())
    with pytest.raises(NoLossError, match="`manual_backward` 2 times"):
        step_loss(copy, digits(8).tensors)


def test_the_copy_steps_neither_the_real_optimizers_nor_its_own_weights():
    model = Manual()
    copy = clone_module(model)
    before = [p.detach().clone() for p in copy.parameters()]
    loss = step_loss(copy, digits(16).tensors)  # zero_grad, manual_backward, clip, step
    # nothing backpropagated: manual_backward left a zero gradient, the clip was recorded
    assert loss.requires_grad and all(p.grad is not None and not p.grad.any()
                                      for p in copy.parameters())
    assert copy.trainer.clips == [(1.0, "norm")]
    assert all(torch.equal(a, b) for a, b in zip(before, copy.parameters(), strict=True))
    own = copy.trainer.optimizers[0]
    assert all(p_own is p for p_own, p in zip(own.param_groups[0]["params"], copy.parameters(),
                                              strict=True))
    assert not own.state  # never stepped


def test_configured_optimizers_reads_every_shape():
    model = Manual()
    for shape in ("opt", "list", "tuple", "dict"):
        class Shaped(Manual):
            def configure_optimizers(self, shape: str = shape) -> Any:
                opt = torch.optim.SGD(self.parameters(), lr=0.1)
                sched = torch.optim.lr_scheduler.StepLR(opt, 1)
                return {"opt": opt, "list": [opt], "tuple": ([opt], [sched]),
                        "dict": {"optimizer": opt, "lr_scheduler": {"scheduler": sched}}}[shape]

        optimizers, schedulers = configured_optimizers(Shaped())
        assert len(optimizers) == 1 and len(schedulers) == (shape in ("tuple", "dict")), shape
    assert len(configured_optimizers(model)[1]) == 1


def test_initial_loss_of_a_manual_model_without_a_trainer():
    found = check_initial_loss(Manual(), [digits(32).tensors])
    assert codes(found) == set() and "initial_loss.ok" in codes(found, "info")


def run_main(tmp_path: Any, checks: list[pl.Callback]) -> tuple[Any, ...]:
    pl.seed_everything(0, workers=True)
    model = Manual(dropout=0.5)
    dl = loader(digits(96), batch_size=16, shuffle=True, seed=3)
    t = trainer(tmp_path, checks, logger=False, deterministic=True, max_epochs=2,
                limit_train_batches=3)
    t.fit(model, dl)
    after = (torch.rand(3), np.random.rand(3), random.random(), dl.generator.get_state())
    return model, t.optimizers[0].state_dict(), after


def test_manual_optimization_main_run_stays_bit_identical(tmp_path):
    base, base_opt, base_rng = run_main(tmp_path / "a", [])
    checks = side_checks()
    model, opt, rng = run_main(tmp_path / "b", checks)
    assert all(not f.code.endswith(".skipped") for f in findings_of(checks))  # they ran
    for (name, a), b in zip(base.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for key, state in base_opt["state"].items():
        assert torch.equal(state["exp_avg"], opt["state"][key]["exp_avg"])
    assert torch.equal(base_rng[0], rng[0]) and np.array_equal(base_rng[1], rng[1])
    assert base_rng[2] == rng[2] and torch.equal(base_rng[3], rng[3])



def test_configure_optimizers_reading_the_trainer_works_on_the_copy(tmp_path):
    class OneCycle(Classifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-4)
            total = self.trainer.estimated_stepping_batches
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=total),
                "interval": "step"}}

    checks = side_checks()
    fit(OneCycle(mlp()), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert "optimizer weight decay 0.0001" in next(
        f.message for f in found if f.code == "initial_loss.regularization")


CLIPS = {
    "clip_gradients": lambda m, opt: m.clip_gradients(opt, gradient_clip_val=1e-3,
                                                      gradient_clip_algorithm="norm"),
    "clip_grad_norm_": lambda m, opt: torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3),
    "clip_grad_value_": lambda m, opt: torch.nn.utils.clip_grad_value_(m.parameters(), 1e-6),
    "module zero_grad": lambda m, opt: m.zero_grad(),
    "grads scaled in place": lambda m, opt: [p.grad.mul_(0.5) for p in m.parameters()
                                             if p.grad is not None],
}


@pytest.mark.parametrize("edit", list(CLIPS))
def test_a_step_that_edits_the_gradients_after_backward_has_them_checked_unedited(edit):
    """A correct manual step that clips (always, at this threshold) or otherwise edits ``.grad``
    after ``manual_backward``: the check compares the loss's own gradients, not the edited ones
    (the step runs again for every numeric evaluation, after the analytic backward)."""
    class Clipping(Manual):
        def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            CLIPS[edit](self, opt)
            opt.step()

    torch.manual_seed(0)
    x, y = digits(8, flatten=True).tensors
    found = check_gradients(Clipping(), (x, y), coords_per_tensor=3)
    assert [f.code for f in found] == ["gradient_check.ok"], [f.message for f in found]


class ValueClipping(Manual):
    """A manual step clipping by value after ``manual_backward`` (``clip_grad_value_`` refuses
    parameters without gradients: the copy's ``manual_backward`` leaves zero ones)."""

    def __init__(self, clip: float = 0.5, direct: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.clip, self.direct, self.lr = clip, direct, lr

    def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        if self.direct:
            torch.nn.utils.clip_grad_value_(self.parameters(), self.clip)
        else:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="value")
        opt.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("direct", [False, True])
def test_a_manual_step_clipping_by_value_is_checked(direct, tmp_path):
    torch.manual_seed(0)
    checks = side_checks()
    fit(ValueClipping(direct=direct, lr=0.5), tmp_path, checks)
    found = findings_of(checks)
    assert codes(found) == set(), [(f.code, f.message) for f in found]
    assert {"gradient_check.ok", "initial_loss.ok", "overfit.reached"} <= codes(found, "info")


def test_the_overfit_test_clips_as_the_manual_step_does():
    """The step's own ``clip_gradients`` is applied after the side experiment's backward: at a
    value clip of 1e-9 (every coordinate moves at most lr * 1e-9 per step) the copy cannot
    learn, as the main run could not."""
    from lightning_diag.checks.overfit import overfit_batches

    torch.manual_seed(0)
    batches = [digits(16).tensors]
    free = overfit_batches(ValueClipping(clip=1e3, lr=0.5), batches, max_steps=30,
                           lr_ladder=False)
    torch.manual_seed(0)
    clipped = overfit_batches(ValueClipping(clip=1e-9, lr=0.5), batches, max_steps=30,
                              lr_ladder=False)
    assert free.best_loss < 0.5 * free.initial_loss
    assert clipped.initial_loss == pytest.approx(free.initial_loss)
    assert clipped.best_loss == pytest.approx(clipped.initial_loss, rel=1e-4)


def test_side_training_applies_the_recorded_clips():
    from lightning_diag.isolation import OptimizationSettings, SideTraining

    w = torch.nn.Parameter(torch.ones(2))
    clips: list[tuple[float, str]] = []
    run = SideTraining(torch.optim.SGD([w], lr=1.0), OptimizationSettings(), w.device, clips)
    clips.append((0.25, "value"))  # recorded by the step, read at the optimizer step
    run.backward((torch.tensor([10.0, -0.1]) * w).sum(), last=True)
    assert w.tolist() == pytest.approx([0.75, 1.1])

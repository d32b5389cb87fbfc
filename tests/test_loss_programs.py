"""Correct programs of many loss families (tests/loss_programs.py): each one's know-nothing loss
checked by hand, each one learns, and InitialLossCheck and OverfitSmallBatch at their defaults
raise no WARN or FAIL on any of them."""

from __future__ import annotations

import pytest
import torch

from lightning_diag.callbacks import InitialLossCheck, OverfitSmallBatch
from lightning_diag.checks.initial_loss import check_initial_loss
from lightning_diag.checks.overfit import BEYOND_CONSTANT, overfit_batches
from lightning_diag.findings import Severity
from lightning_diag.isolation import first_batches
from tests.helpers import codes, trainer
from tests.loss_programs import PROGRAMS, program

NAMES = list(PROGRAMS)
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", NAMES)
def test_each_program_is_correct_and_learns(name):
    # plain torch, no library: 30 Adam steps on one batch lower the program's own loss
    prog = program(name)
    batch = next(iter(prog.train))
    opt = prog.module.configure_optimizers()
    torch.manual_seed(0)
    before = float(prog.module.loss(batch).detach())
    for _ in range(30):
        opt.zero_grad()
        prog.module.loss(batch).backward()
        opt.step()
    torch.manual_seed(0)
    assert float(prog.module.loss(batch).detach()) < before


@pytest.mark.parametrize("name", NAMES)
def test_initial_loss_is_judged_against_the_programs_own_loss(name):
    prog = program(name)
    batches = first_batches(prog.train, 3, CPU)
    found = check_initial_loss(prog.module, batches)
    assert codes(found) == set(), [f.format() for f in found]
    (ok,) = [f for f in found if f.code == "initial_loss.ok"]
    # the expectation is the program's loss at a know-nothing output, computed here by hand
    assert ok.details["know_nothing_loss"] == pytest.approx(
        prog.know_nothing(prog.module, batches), rel=1e-5), prog.closed_form
    assert ok.details["doubled_batch_ratio"] != pytest.approx(2.0, abs=0.2)  # a mean


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_overfit_at_its_defaults_raises_nothing(name):
    prog = program(name)
    result = overfit_batches(prog.module, first_batches(prog.train, 5, CPU))
    (f,) = result.findings()
    assert f.severity is Severity.INFO and f.code in ("overfit.reached", "overfit.floor"), \
        f.format()
    assert not result.ladder and not result.squashed
    if f.code == "overfit.floor":  # stopped at a floor it learned its way down to
        assert (result.beyond_constant() or 0) >= BEYOND_CONSTANT


def test_a_loss_module_label_smoothing_is_turned_off_on_the_copy_only():
    prog = program("smoothing_0.1_module")
    result = overfit_batches(prog.module, first_batches(prog.train, 5, CPU))
    assert result.loss_turned_off == ["label smoothing 0.1 (`criterion`)"]
    assert "label smoothing 0.1 (`criterion`)" in result.findings()[0].message
    assert prog.module.criterion.label_smoothing == 0.1
    # the functional argument cannot be turned off: the measured floor accounts for it
    prog = program("smoothing_0.2_functional")
    result = overfit_batches(prog.module, first_batches(prog.train, 5, CPU))
    assert result.loss_turned_off == [] and result.reached and result.best_accuracy == 1.0
    entropy = -(0.84 * torch.tensor(0.84).log() + 4 * 0.04 * torch.tensor(0.04).log())
    assert result.floor is not None
    # the entropy of the smoothed target, the least this loss can be (the memorising output's
    # margin on a grid: an upper bound, within 1 % here)
    assert float(entropy) - 1e-6 <= result.floor.value <= 1.01 * float(entropy)
    assert "the loss's own floor" in result.findings()[0].message


def test_two_class_layouts_are_told_apart_by_the_loss():
    # (N, T, V) scores with T = V fit a class dimension 1 and last: the memorising output
    # along the right one takes the loss to 0
    prog = program("random_tokens_lm")
    batches = first_batches(prog.train, 5, CPU)
    result = overfit_batches(prog.module, batches, max_steps=5)
    assert result.floor is not None and result.floor.value < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distillation", "smoothing_0.1_weighted_module", "mixup",
                                  "noisy_regressor", "multitask"])
def test_the_callbacks_at_their_defaults_in_a_fit(name, tmp_path):
    prog = program(name)
    callbacks = [InitialLossCheck(), OverfitSmallBatch()]
    trainer(tmp_path, callbacks, limit_train_batches=1).fit(prog.module, prog.train)
    found = [f for cb in callbacks for f in cb.findings]
    assert codes(found) == set(), [f.format() for f in found]
    assert {f.code for f in found} & {"overfit.reached", "overfit.floor"}

"""Task inference (lightning_diag.functional.task): every shape people use, checked against the
losses torch itself computes for a uniform prediction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_diag.functional.output_form import OutputForm, memorising_output, output_form
from lightning_diag.functional.task import (
    Task,
    accuracy,
    infer_task,
    regression_references,
    select_output,
)

g = torch.Generator().manual_seed(0)


def _ints(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=g)


@pytest.mark.parametrize(("output", "target", "loss", "dim", "flat"), [
    # (N, C) / (N,): an image classifier
    (torch.zeros(8, 10), _ints(10, 8), lambda o, t: F.cross_entropy(o, t), 1, False),
    # (N, C, H, W) / (N, H, W): per-pixel segmentation
    (torch.zeros(4, 3, 5, 5), _ints(3, 4, 5, 5), lambda o, t: F.cross_entropy(o, t), 1, False),
    # (N, T, V) / (N, T): a language model's scores before flattening
    (torch.zeros(2, 7, 16), _ints(16, 2, 7),
     lambda o, t: F.cross_entropy(o.reshape(-1, 16), t.reshape(-1)), -1, False),
    # (N*T, V) / (N, T): flattened log-probabilities, as the word-LM examples return
    (torch.zeros(14, 16).log_softmax(1), _ints(16, 2, 7),
     lambda o, t: F.nll_loss(o, t.reshape(-1)), 1, True),
])
def test_multiclass_expectation_is_the_loss_of_a_uniform_prediction(output, target, loss, dim,
                                                                     flat):
    task = infer_task(output, target)
    assert (task.kind, task.class_dim, task.flattened) == ("multiclass", dim, flat)
    assert task.num_classes == output.shape[dim]
    assert task.expected_initial_loss() == pytest.approx(float(loss(output, target)), abs=1e-6)


def test_scores_are_told_apart():
    logits = torch.randn(6, 4, generator=g) * 3
    target = _ints(4, 6)
    assert infer_task(logits, target).scores == "logits"
    assert infer_task(logits.log_softmax(1), target).scores == "log_probs"
    assert infer_task(logits.softmax(1), target).scores == "probs"
    # Probabilities over a spatial class dimension sum to 1 along dim 1, not along the last.
    seg = torch.randn(2, 3, 4, 4, generator=g).softmax(1)
    assert infer_task(seg, _ints(3, 2, 4, 4)).scores == "probs"


def test_ignore_index_and_out_of_range_targets():
    target = _ints(5, 8)
    target[0] = -100
    assert infer_task(torch.zeros(8, 5), target).kind == "multiclass"
    # Labels up to 9 cannot index 5 scores: not a 5-class problem.
    bad = infer_task(torch.zeros(8, 5), torch.arange(8) + 2)
    assert bad.kind == "unknown" and "do not index" in bad.reason


def test_multilabel_expectation_is_log2_the_bce_of_zero_logits():
    target = _ints(2, 8, 4).float()
    task = infer_task(torch.randn(8, 4, generator=g) * 0.1, target)  # small logits, as at init
    assert (task.kind, task.num_classes, task.scores) == ("multilabel", 4, "logits")
    bce = F.binary_cross_entropy_with_logits(torch.zeros(8, 4), target)
    assert task.expected_initial_loss() == pytest.approx(float(bce))
    assert task.expected_initial_loss() == pytest.approx(math.log(2))
    # Binary: one logit per sample, (N, 1) against (N,), integer or bool targets.
    assert infer_task(torch.zeros(8, 1), _ints(2, 8)).kind == "multilabel"
    assert infer_task(torch.zeros(8, 1).sigmoid(), _ints(2, 8).bool()).scores == "probs"


def test_regression_and_its_references_are_the_mse_of_zero_and_of_the_mean():
    y = torch.randn(50, generator=g) * 2 + 3
    task = infer_task(torch.zeros(50, 1), y)
    assert task.kind == "regression" and task.expected_initial_loss() is None
    zero_mse, mean_mse = regression_references(y)
    assert zero_mse == pytest.approx(float(F.mse_loss(torch.zeros(50), y)), rel=1e-6)
    assert mean_mse == pytest.approx(float(F.mse_loss(torch.full((50,), float(y.mean())), y)),
                                     rel=1e-5)


@pytest.mark.parametrize(("output", "target", "why"), [
    (torch.zeros(4, 3), None, "no target"),
    ((torch.zeros(4, 3),), torch.zeros(4), "tuple"),
    (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4), "not a float tensor"),
    (torch.zeros(4, 3), torch.zeros(5), "no shape relation"),
])
def test_unknown_says_why(output, target, why):
    task = infer_task(output, target)
    assert task.kind == "unknown" and why in task.reason


def test_accuracy_per_task():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    target = torch.tensor([0, 1, 1])
    assert accuracy(infer_task(logits, target), logits, target) == pytest.approx(2 / 3)
    seg = torch.zeros(1, 2, 2, 2)
    seg[0, 1, 0, 0] = 1.0  # one pixel predicts class 1, the rest class 0
    seg_t = torch.tensor([[[1, 0], [0, 1]]])
    assert accuracy(infer_task(seg, seg_t), seg, seg_t) == pytest.approx(3 / 4)
    lab = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    lab_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert accuracy(infer_task(lab, lab_t), lab, lab_t) == pytest.approx(3 / 4)
    binary = torch.tensor([[2.0], [-2.0]])
    assert accuracy(infer_task(binary, torch.tensor([1, 1])), binary,
                    torch.tensor([1, 1])) == pytest.approx(1 / 2)
    assert accuracy(Task("regression", "values"), torch.zeros(3), torch.zeros(3)) is None


@pytest.mark.parametrize("scores", ["logits", "log_probs", "probs"])
def test_probabilities_round_trip(scores):
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    raw = {"logits": probs.log() + 1.7, "log_probs": probs.log(), "probs": probs}[scores]
    task = infer_task(raw, torch.tensor([0, 1]))
    assert task.scores == scores
    assert torch.allclose(task.to_probabilities(raw), probs, atol=1e-6)
    back = task.from_probabilities(probs, like=raw)
    assert torch.allclose(task.to_probabilities(back), probs, atol=1e-6)


def test_select_output_finds_the_prediction():
    logits = torch.zeros(4, 3)
    assert select_output(logits) is logits
    assert select_output((logits, (torch.zeros(1), torch.zeros(1)))) is logits
    assert select_output({"loss": torch.tensor(1.0), "logits": logits}) is logits
    assert select_output([torch.zeros(2, dtype=torch.long)]) is None


# --- know-nothing and memorising outputs (the checks run the user's loss on them) ------------
def test_the_know_nothing_output_is_the_last_activation_at_zero():
    z = torch.randn(6, 4, generator=g, requires_grad=True)
    cases = [(z.softmax(1), "softmax", 0.25), (z.log_softmax(1), "log_softmax", math.log(0.25)),
             (z.sigmoid(), "sigmoid", 0.5), (z.exp()[:, 0], "exp", 1.0),
             (F.softplus(z).t(), "softplus", math.log(2)), (z.tanh(), "none", 0.0),
             (z, "none", 0.0)]
    for out, activation, value in cases:
        form = output_form(out)
        assert form.activation == activation
        nothing = form.know_nothing(out)
        assert nothing.shape == out.shape and torch.allclose(nothing, torch.full_like(out, value))
        # f(0) is what activate gives a zero pre-activation
        assert torch.allclose(form.activate(torch.zeros_like(out)), nothing)
    # probabilities over the last dimension of a (N, T, V) output: dim 2
    assert output_form(torch.randn(2, 3, 5).softmax(-1)) == OutputForm("softmax", 2)
    # without the autograd history a sigmoid cannot be told from values
    assert output_form(z.sigmoid().detach()).activation == "none"


@pytest.mark.parametrize(("output", "target", "loss"), [
    (torch.zeros(8, 10), _ints(10, 8), lambda o, t: F.cross_entropy(o, t)),
    (torch.zeros(4, 3, 5, 5), _ints(3, 4, 5, 5), lambda o, t: F.cross_entropy(o, t)),
    (torch.zeros(14, 16).log_softmax(1), _ints(16, 2, 7),
     lambda o, t: F.nll_loss(o, t.reshape(-1))),
    (torch.zeros(6, 4).softmax(1), _ints(4, 6), lambda o, t: F.nll_loss(o.log(), t)),
    (torch.randn(6, 3, generator=g), _ints(2, 6, 3).float(), F.binary_cross_entropy_with_logits),
])
def test_a_memorising_output_takes_a_cross_entropy_to_zero(output, target, loss):
    task = infer_task(output, target)
    at = [float(loss(memorising_output(task, output, target, m), target)) for m in (0, 4, 32)]
    assert at[0] == pytest.approx(task.expected_initial_loss(), rel=1e-5)  # margin 0: uniform
    assert at[0] > at[1] > at[2] and at[2] < 1e-6
    pred = memorising_output(task, output, target, 32.0)
    assert accuracy(task, pred, target) == 1.0


def test_a_memorising_regression_output_is_the_target():
    y = torch.randn(5, generator=g)
    task = infer_task(torch.zeros(5, 1), y)
    assert torch.equal(memorising_output(task, torch.zeros(5, 1), y, 1.0), y[:, None])
    assert memorising_output(Task("unknown"), torch.zeros(5), y, 1.0) is None

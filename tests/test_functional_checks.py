import math

import pytest
import torch
from torch import nn

from lightning_diag.functional.checks import (
    centered_difference,
    count_param_layers,
    directional_difference,
    evaluate_around,
    expected_initial_loss,
    gradient_tolerance,
    has_kinks,
    kink_gap,
    relative_error,
)


def test_relative_error_matches_the_recipe_formula_and_flags_both_zero():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0, 1e-20], dtype=torch.float64)
    n = torch.tensor([1.5, 2.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    err, both_zero = relative_error(a, n, eps=1e-12)
    direct = (a - n).abs() / torch.maximum(a.abs(), n.abs())
    assert torch.allclose(err[:4], direct[:4])
    assert err.tolist()[:4] == pytest.approx([1 / 3, 2.0, 1.0, 0.0])
    assert both_zero.tolist() == [False, False, False, False, True] and err[4] == 0


def test_relative_error_validates():
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="eps"):
        relative_error(torch.zeros(2), torch.zeros(2), eps=-1.0)


def test_centered_difference_and_directional_difference_against_autograd():
    assert centered_difference(3.0, 1.0, 0.5) == 2.0
    with pytest.raises(ValueError, match="`h`"):
        centered_difference(1.0, 0.0, 0.0)
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = w.clone()
    v = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    numeric = directional_difference(lambda: float(torch.tanh(w).pow(3).sum()), w, v, 1e-5)
    w_grad = w.clone().requires_grad_()
    torch.tanh(w_grad).pow(3).sum().backward()
    assert numeric == pytest.approx(float(w_grad.grad @ v), rel=1e-8)
    assert torch.equal(w, before)  # restored bit-exactly


def test_kink_gap_explains_a_crossed_kink_but_not_curvature():
    h = 1e-3
    w = torch.tensor([0.0004], dtype=torch.float64)  # |w| with its kink 0.4 h away
    f_plus, f_minus = evaluate_around(lambda: float(w.abs().sum()), w, torch.ones(1), h)
    error = abs(centered_difference(f_plus, f_minus, h) - 1.0)  # true slope at w is 1
    assert error > 0.1 and kink_gap(f_plus, 0.0004, f_minus, h) == pytest.approx(error)
    x = torch.tensor([0.3], dtype=torch.float64)  # smooth: gap = |f''| h / 2 = h, error O(h^2)
    f_plus, f_minus = evaluate_around(lambda: float(x.pow(2).sum()), x, torch.ones(1), h)
    assert kink_gap(f_plus, 0.09, f_minus, h) == pytest.approx(h, rel=1e-6)
    assert abs(centered_difference(f_plus, f_minus, h) - 0.6) < 1e-9
    with pytest.raises(ValueError, match="`h`"):
        kink_gap(1.0, 1.0, 1.0, -1.0)


def test_expected_initial_loss_is_log_c():
    assert expected_initial_loss(10) == pytest.approx(math.log(10))
    # what a uniform softmax actually gives
    uniform = nn.functional.cross_entropy(torch.zeros(4, 7), torch.tensor([0, 1, 2, 6]))
    assert expected_initial_loss(7) == pytest.approx(float(uniform))
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            expected_initial_loss(bad)  # type: ignore[arg-type]


def test_has_kinks_and_depth():
    assert has_kinks(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2)))
    assert has_kinks(nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU()))
    assert not has_kinks(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Softmax(dim=1)))
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ReLU(),
                        nn.Sequential(nn.Linear(2, 1)))
    assert count_param_layers(net) == 3
    assert count_param_layers(nn.ReLU()) == 0


@pytest.mark.parametrize(("kinks", "depth", "tol"), [
    (False, 2, 1e-6), (True, 2, 1e-4), (True, 9, 1e-4), (False, 10, 1e-2), (True, 25, 1e-2)])
def test_gradient_tolerance_follows_the_recipe(kinks, depth, tol):
    assert gradient_tolerance(kinks, depth) == tol


def test_gradient_tolerance_validates_depth():
    with pytest.raises(ValueError, match="depth"):
        gradient_tolerance(True, -1)


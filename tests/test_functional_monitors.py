import math

import pytest
import torch

from lightning_diag.functional.monitors import (
    STAT_NAMES,
    gradient_flow,
    histogram_edges,
    histogram_row,
    is_logging_step,
    layer_stats,
    update_ratios,
)


def test_histogram_row_matches_torch_histc_and_direct_sums():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    row = histogram_row(x, bins=16)
    lo, hi, num, total, sq = row[:5].tolist()
    assert lo == x.min().item() and hi == x.max().item() and num == 1000
    assert total == pytest.approx(x.sum().item(), rel=1e-5)
    assert sq == pytest.approx((x * x).sum().item(), rel=1e-5)
    ref = torch.histc(x, bins=16, min=lo, max=hi)
    assert row[5:].sum().item() == 1000
    assert (row[5:] - ref).abs().sum().item() <= 2  # at most a value on a bin edge moves
    assert histogram_edges(lo, hi, 16)[-1] == pytest.approx(hi)


def test_histogram_row_ignores_non_finite_and_survives_empty_constant_bf16():
    x = torch.tensor([1.0, float("nan"), float("inf"), 3.0])
    row = histogram_row(x, bins=4)
    assert row[:5].tolist() == [1.0, 3.0, 2.0, 4.0, 10.0]
    assert row[5:].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert histogram_row(torch.empty(0), bins=4)[2].item() == 0
    assert histogram_row(torch.full((3,), float("nan")), bins=4)[2].item() == 0
    const = histogram_row(torch.full((5,), 2.0), bins=4)
    assert const[5:].sum().item() == 5 and const[0].item() == const[1].item() == 2.0
    bf = histogram_row(torch.randn(64).bfloat16(), bins=8)
    assert bf.dtype == torch.float32 and bf[2].item() == 64


def test_layer_stats_match_direct_expressions():
    gen = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(16, 6, 4, 4, generator=gen))
    x[:, 2] = 0.0  # one dead channel
    x[:, 4] = 0.0  # and another
    mean, std, zero, dead, sat = layer_stats(x).tolist()
    assert mean == pytest.approx(x.mean().item(), rel=1e-5)
    assert std == pytest.approx(x.std().item(), rel=1e-4)
    assert zero == pytest.approx((x == 0).float().mean().item())
    per_channel_dead = [bool((x[:, c] == 0).all()) for c in range(6)]
    assert dead == pytest.approx(sum(per_channel_dead) / 6)
    assert math.isnan(sat)


def test_layer_stats_saturation_and_linear_units():
    x = torch.tanh(torch.tensor([[5.0, 0.1, -5.0, 0.5], [5.0, 0.0, -0.1, 3.0]]))
    stats = dict(zip(STAT_NAMES, layer_stats(x, bounds=(-1.0, 1.0)).tolist(), strict=True))
    direct = (x.abs() >= 1 - 0.02 * 2).float().mean().item()
    assert stats["saturated_fraction"] == pytest.approx(direct) == pytest.approx(4 / 8)
    assert stats["dead_fraction"] == 0.0  # unit 1 is zero once, not on the whole batch
    sig = torch.sigmoid(torch.tensor([[-10.0, 10.0, 0.0, 0.2]]))
    assert layer_stats(sig, bounds=(0.0, 1.0))[4].item() == pytest.approx(0.5)


def test_layer_stats_non_finite_empty_and_bf16_never_raise():
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    mean, _, zero, dead, _ = layer_stats(x).tolist()
    assert mean == 2.0 and zero == 0.0 and dead == 0.0
    assert math.isnan(layer_stats(torch.empty(0, 4))[0].item())
    assert torch.isfinite(layer_stats(torch.randn(8, 4).bfloat16())[:4]).all()
    assert layer_stats(torch.zeros(5))[3].item() == 1.0  # 1-D: the tensor is one unit


def test_update_ratios_match_direct_norms_and_zero_weight_cases():
    gen = torch.Generator().manual_seed(2)
    before = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen), torch.zeros(3),
              torch.zeros(2)]
    after = [b + 1e-3 * torch.randn(b.shape, generator=gen) for b in before[:2]]
    after += [torch.ones(3), torch.zeros(2)]
    ratios = update_ratios(before, after)
    for i in range(2):
        direct = ((after[i] - before[i]).norm() / before[i].norm()).item()
        assert ratios[i].item() == pytest.approx(direct, rel=1e-5)
    assert math.isinf(ratios[2].item()) and ratios[3].item() == 0.0
    nan = update_ratios([torch.ones(2)], [torch.tensor([1.0, float("nan")])])
    assert math.isnan(nan[0].item())
    assert update_ratios([], []).numel() == 0


def test_gradient_flow_classifies_first_vs_last():
    assert gradient_flow([1.0, 0.5, 0.8]) == (None, 1.25)
    assert gradient_flow([1e-5, 1e-2, 1.0])[0] == "vanishing"
    assert gradient_flow([1e4, 1.0, 1.0])[0] == "exploding"
    assert gradient_flow([float("nan"), 1.0, float("inf")])[0] == "exploding"
    assert gradient_flow([float("nan"), 1.0]) == (None, pytest.approx(math.nan, nan_ok=True))
    assert gradient_flow([0.0, 0.0])[0] is None


def test_is_logging_step_schedule():
    assert [s for s in range(25) if is_logging_step(s, 8)] == [0, 1, 2, 4, 8, 16, 24]
    assert all(is_logging_step(s, 1) for s in range(5))

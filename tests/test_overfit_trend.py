"""Slow or stuck: the overfit test's reading of a run that spent its budget short of the target
(lightning_diag/checks/overfit_trend.py, OverfitResult.judge_trend)."""

import math

import pytest
import torch

from lightning_diag.checks.overfit import OverfitResult, overfit_batches
from lightning_diag.checks.overfit_trend import (
    PROJECTION_BUDGETS,
    SLOW_ACCURACY,
    loss_trend,
)
from lightning_diag.isolation import first_batches
from tests.families import FAMILIES


def _curve(loss, steps=1000, every=5, acc=None):
    return [(s, loss(s), acc) for s in range(every, steps + 1, every)]


def test_an_exponential_fall_is_projected_to_its_target():
    # the distance to a floor of 0.2 halves every 200 steps: from 0.2 + 0.5 * 2**-5 at step
    # 1000 to the target 0.2 + 0.5 * 2**-6 takes one more halving
    trend = loss_trend(_curve(lambda s: 0.2 + 0.5 * 0.5 ** (s / 200)), floor=0.2,
                       target=0.2 + 0.5 * 2 ** -6)
    assert trend.halving_steps == pytest.approx(200, rel=1e-6)
    assert trend.extra_steps == pytest.approx(200, rel=1e-6)
    assert trend.window_steps == 250


def test_a_flattening_loss_is_credited_with_its_recent_pace_only():
    # 1/t: the fall slows down; the second half of the window is the shallower and decides
    curve = _curve(lambda s: 10 / s)
    trend = loss_trend(curve, floor=0.0, target=1e-3)
    whole = (math.log(10 / 1000) - math.log(10 / 750)) / 250
    assert trend.slope > whole  # shallower than the whole window's average
    half = [(s, math.log(10 / s)) for s, _, _ in curve if s >= 875]
    n = len(half)
    mx, my = sum(p[0] for p in half) / n, sum(p[1] for p in half) / n
    ls = sum((x - mx) * (y - my) for x, y in half) / sum((x - mx) ** 2 for x, _ in half)
    assert trend.slope == pytest.approx(ls, rel=1e-9)


def test_a_flat_or_rising_loss_never_gets_there_and_a_short_curve_is_not_judged():
    assert loss_trend(_curve(lambda s: 2.3), floor=0.0, target=0.1).extra_steps == math.inf
    assert loss_trend(_curve(lambda s: 1 + s / 1e4), floor=0.0, target=0.1).extra_steps \
        == math.inf
    assert loss_trend(_curve(lambda s: 1.0, steps=15), floor=0.0, target=0.1) is None
    assert loss_trend(_curve(lambda s: 1.0), floor=0.0, target=-math.inf) is None
    nan = _curve(lambda s: math.nan if s == 1000 else 1.0)
    assert loss_trend(nan, floor=0.0, target=0.1) is None


def _result(loss, acc):
    result = OverfitResult(False, 1000, 0.69, math.inf, acc, 0.05, 5, task="4 labels")
    result.curve = _curve(loss, acc=acc)
    result.best_loss = result.final_loss = result.curve[-1][1]
    result.judge_trend()
    return result


def test_the_rule_needs_both_the_projection_and_the_accuracy():
    # the target 0.0345; at step 1000 the loss is 0.0345 * 2**(300/300): one halving, 300 steps
    slow = _result(lambda s: 0.0345 * 2 ** ((1300 - s) / 300), acc=0.998)
    assert slow.slow and slow.trend.extra_steps == pytest.approx(300, rel=1e-6)
    (f,) = slow.findings()
    assert f.code == "overfit.slow" and f.severity == "info"
    for said in ("Overfit not reached within the 1000 steps, but getting there",
                 "halved every 300 steps", "about 300 more steps", "99.8% of the predictions",
                 f"(>= {SLOW_ACCURACY:.0%})", "target <= 0.0345"):
        assert said in f.message
    assert "higher learning rate" in f.advice and "`max_steps`" in f.advice
    assert f.details["trend"]["extra_steps"] == pytest.approx(300, rel=1e-6)
    # the loss already at its target, one label of 640 still wrong
    there = _result(lambda s: 0.03 * 2 ** ((1000 - s) / 300), acc=0.998)
    assert there.slow and there.trend.extra_steps == 0
    assert "is at its target (<= 0.0345) and still falls" in there.findings()[0].message
    # the same pace, 2 budgets away: stuck as far as the test can tell
    far = _result(lambda s: 0.0345 * 2 ** ((3000 - s) / 300 * PROJECTION_BUDGETS), acc=0.998)
    assert not far.slow and far.findings()[0].code == "overfit.not_reached"
    # on the way to the target, but too many predictions still wrong
    wrong = _result(lambda s: 0.0345 * 2 ** ((1300 - s) / 300), acc=0.9)
    assert not wrong.slow and wrong.findings()[0].severity == "fail"
    # where the accuracy is not the criterion, the projection alone decides
    wrong.accuracy_required = False
    wrong.judge_trend()
    assert wrong.slow and "(not required)" in wrong.findings()[0].message


def _multilabel(seed, lr=None):
    torch.manual_seed(seed)
    fam = FAMILIES["multilabel"]()
    if lr is not None:
        fam.module.lr = lr
    return fam.module, first_batches(fam.train, 5, torch.device("cpu"))


def test_a_healthy_slow_multilabel_run_is_info_and_runs_no_ladder():
    # seed 0: 99.8 % of the 640 labels, the loss 0.043 against 0.034 after 1000 steps, halving
    # its distance every ~340 steps: ~110 more steps (benchmarks/results/seed_stability.md)
    module, batches = _multilabel(0)
    result = overfit_batches(module, batches)
    (f,) = result.findings()
    assert not result.reached and result.slow and result.ladder == []
    assert f.code == "overfit.slow" and f.severity == "info" and "ladder" not in f.details
    assert 0 < result.trend.extra_steps < 0.5 * PROJECTION_BUDGETS * result.steps
    assert result.curve[-1][2] >= SLOW_ACCURACY


def test_a_ten_times_lower_rate_on_the_same_run_is_stuck():
    # at 3e-4 the same model covers 30 % of the way (in log) at 88-90 % of the labels: its
    # trend needs 3.3x the budget, the configured rate is too low
    module, batches = _multilabel(0, lr=3e-4)
    result = overfit_batches(module, batches, lr_ladder=False)
    (f,) = result.findings()
    assert not result.slow and f.code == "overfit.not_reached" and f.severity == "fail"
    assert result.trend.extra_steps > 3 * PROJECTION_BUDGETS * result.steps

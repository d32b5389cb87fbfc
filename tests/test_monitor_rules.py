"""The monitors' rules without a Trainer (checks/activations.py, update_ratio.py, advisor.py,
curves.py): hand-made statistics in, the expected verdicts out."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from torch import nn

from lightning_diag.checks.activations import (
    ActivationConfig,
    activation_bounds,
    activation_summary,
    activation_verdicts,
    chosen_layers,
    dead_layers,
    gradient_ratio,
    worst_readings,
)
from lightning_diag.checks.advisor import (
    AdvisorConfig,
    JumpWindow,
    advisor_summary,
    stall_verdict,
)
from lightning_diag.checks.curves import curves_summary
from lightning_diag.checks.update_ratio import (
    UpdateRatioConfig,
    new_streak,
    ratio_summary,
    ratio_verdicts,
    read_ratios,
)
from lightning_diag.findings import Severity
from lightning_diag.functional.curves import is_jump, jump_threshold

NAN = math.nan


def layer(dead: float = 0.0, sat: float = NAN, grad_rms: float = 1.0) -> dict[str, Any]:
    """One layer's statistics as the callback parses them (only what the rules read)."""
    return {"dead_fraction": dead, "saturated_fraction": sat, "grad_rms": grad_rms,
            "grad_norm": NAN if math.isnan(grad_rms) else grad_rms * 10}


TYPES = {"net.0": "Flatten", "net.1": "Conv2d", "net.2": "ReLU", "net.3": "MaxPool2d",
         "net.4": "Linear", "net.5": "Tanh"}


def test_a_dead_layer_and_the_parameter_free_layers_that_pass_its_zeros_on_are_one_fact():
    last = {"net.0": layer(dead=1.0, grad_rms=NAN),  # no gradient: blank pixels, not dead
            "net.1": layer(), "net.2": layer(dead=0.9), "net.3": layer(dead=0.9),
            "net.4": layer(dead=0.8)}
    assert dead_layers(last, {"net.1", "net.4"}, 0.5) == [("net.2", ["net.3"]), ("net.4", [])]
    found = activation_verdicts(last, {"net.1", "net.4"}, ActivationConfig(), TYPES)
    assert [(v.code, v.subject, v.value) for v in found] == [
        ("activations.dead_units", "net.2", 0.9), ("activations.dead_units", "net.4", 0.8)]
    assert found[0].message == ("90% of the units of net.2 (ReLU) are zero on every sample of "
                                "the batch (expected <= 50%); net.3 (MaxPool2d) after it only "
                                "passes those zeros on.")
    assert found[0].details == {"layer": "net.2", "passed_on_by": ["net.3"]}
    assert found[0].expected == (0.0, 0.5) and found[0].severity is Severity.WARN


def test_saturation_and_the_gradient_ratio_against_the_thresholds():
    last = {"net.4": layer(grad_rms=2e-4), "net.5": layer(sat=0.75, grad_rms=1.0)}
    found = activation_verdicts(last, {"net.4"}, ActivationConfig(), TYPES)
    assert [v.code for v in found] == ["activations.saturation", "gradients.vanishing"]
    assert found[0].value == 0.75 and "75% of the outputs of bounded layer net.5 (Tanh)" in \
        found[0].message
    assert found[1].value == pytest.approx(2e-4) and found[1].subject == ""
    assert gradient_ratio(last) == pytest.approx(2e-4)
    quiet = ActivationConfig(saturated_fraction=0.8, vanishing_ratio=1e-4)
    assert activation_verdicts(last, {"net.4"}, quiet, TYPES) == []
    exploding = {"net.4": layer(grad_rms=math.inf), "net.5": layer()}
    assert [v.code for v in activation_verdicts(exploding, set(), quiet, TYPES)] == [
        "gradients.exploding"]


def test_no_gradient_at_all_names_the_layers_and_what_blocks_it():
    last = {"net.1": layer(grad_rms=0.0), "net.2": layer(dead=1.0, grad_rms=0.0),
            "net.4": layer(grad_rms=0.5)}
    (dead, blocked) = activation_verdicts(last, {"net.1", "net.4"}, ActivationConfig(), TYPES)
    assert dead.code == "activations.dead_units" and blocked.code == "gradients.vanishing"
    assert blocked.value == 0.0 and blocked.details == {"blocked": ["net.1", "net.2"],
                                                         "blocker": "net.4"}
    assert blocked.message.startswith("No gradient reaches 2 layers, net.1 (Conv2d) to net.2 "
                                      "(ReLU): their gradient is exactly 0")
    assert "look for a `detach()`" in blocked.message and "differentiable" in blocked.advice


def test_worst_readings_and_the_summary():
    worst = worst_readings({}, {"net.2": layer(dead=0.3), "net.5": layer(sat=0.2)}, step=0)
    worst = worst_readings(worst, {"net.2": layer(dead=0.6), "net.5": layer(sat=0.1)}, step=10)
    assert worst == {"dead_fraction": (0.6, "net.2", 10), "saturated_fraction": (0.2, "net.5", 0)}
    summary = activation_summary(2, worst, 0.25, ActivationConfig(every_n_steps=10), TYPES)
    assert summary.severity is Severity.INFO and summary.value == 0.6
    assert summary.message == (
        "Activations over 2 logging step(s) (every 10 steps): worst dead fraction 60% at net.2 "
        "(ReLU), step 10 (expected <= 50%); largest saturated fraction 20% at net.5 (Tanh), "
        "step 0 (expected <= 50%); first/last-layer gradient RMS ratio 0.25 at the last logging "
        "step (expected within (0.001, 1000)).")
    assert activation_summary(0, {}, NAN, ActivationConfig(), TYPES).value is None


def test_layers_chosen_by_default_by_name_and_by_function():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), nn.Dropout(), nn.Linear(4, 2))
    assert [n for n, _ in chosen_layers(net, None)] == ["1", "2", "4"]  # no pass-through
    assert [n for n, _ in chosen_layers(net, ["0", "2"])] == ["0", "2"]
    assert [n for n, _ in chosen_layers(net, lambda n, m: isinstance(m, nn.Dropout))] == ["3"]
    with pytest.raises(ValueError, match=r"\['9'\]"):
        chosen_layers(net, ["9"])
    assert activation_bounds(net[2]) == (-1.0, 1.0) and activation_bounds(net[1]) is None


def reading(median: float, still: int = 0, grad_norm: float = 1.0) -> Any:
    return read_ratios(["w"], [2], [median], [grad_norm])._replace(still=still)


def test_ratio_streaks_need_patience_and_an_extreme_ratio_does_not():
    config = UpdateRatioConfig(patience=3)
    streak = new_streak()
    said = []
    for median in (1e-7, 1e-7, 1e-3, 1e-7, 1e-7, 1e-7, 1e-7):
        streak, found = ratio_verdicts(streak, reading(median), config)
        said.append([v.code for v in found])
    assert said == [[], [], [], [], [], ["update_ratio.too_low"], []]  # once, at the 3rd
    assert streak == {"too_low": 4, "too_high": 0, "zero_updates": 0}
    _, found = ratio_verdicts(new_streak(), reading(1.5), config)
    assert [v.code for v in found] == ["update_ratio.too_high"]
    assert "a single update as large as the weights" in found[0].message
    _, found = ratio_verdicts(new_streak(), reading(NAN), config)
    assert [v.code for v in found] == ["update_ratio.too_high"]
    assert math.isnan(found[0].details["ratios"]["w"])  # type: ignore[index]


def test_zero_updates_tell_a_dead_network_from_an_optimizer_that_did_not_step():
    config = UpdateRatioConfig(patience=1)
    dead = read_ratios(["a", "b"], [2, 2], [0.0, 0.0], [0.0, 0.0])
    assert (dead.median, dead.still, dead.grad_norm) == (0.0, 2, 0.0)
    _, (v,) = ratio_verdicts(new_streak(), dead, config)
    assert v.code == "update_ratio.zero_updates" and "gradients are zero" in v.message
    frozen = read_ratios(["a", "b"], [2, 2], [0.0, 0.0], [3.0, 4.0])
    _, (v,) = ratio_verdicts(new_streak(), frozen, config)
    assert "non-zero (norm 5)" in v.message and v.message.startswith("2 of 2 weight tensors")


def test_ratio_reading_leaves_biases_out_and_nan_wins():
    r = read_ratios(["w1", "b1", "w2"], [2, 1, 2], [1e-3, 5.0, 3e-3], [1.0, 1.0, 1.0])
    assert r.last == {"w1": 1e-3, "w2": 3e-3} and r.median == pytest.approx(2e-3)
    assert read_ratios(["b"], [1], [0.5], [1.0]).last == {"b": 0.5}  # no weight: every tensor
    assert math.isnan(read_ratios(["a", "b"], [2, 2], [NAN, 1e-3], [1.0, 1.0]).median)
    summary = ratio_summary([(0, 1e-3), (5, 4e-3), (10, NAN)], UpdateRatioConfig())
    assert summary.value == pytest.approx(2.5e-3) and "1 non-finite step(s) left out" in \
        summary.message
    assert ratio_summary([], UpdateRatioConfig()).message == (
        "Update ratios: no logging step ran in this fit.")


def test_advisor_step_rules():
    jumps = JumpWindow(window=50, min_history=10, min_samples=1)
    assert jumps.reference() is None  # nothing known yet
    assert jumps.add(2.3, samples=8) == (2.3, 8, 1)  # a batch of enough samples: judged alone
    for _ in range(3):
        jumps.push(2.3)
    assert jumps.reference() == 2.3  # fewer than min_history: the first group's mean
    for v in (1.0, 3.0, 2.0, 5.0, 4.0, 0.5, 6.0):
        jumps.push(v)
    assert jumps.reference() == 2.3  # the lower median of the 10 kept


def test_the_sorted_jump_window_judges_as_is_jump_on_the_losses_it_keeps():
    """The advisor reads the window's median instead of computing it each step: the same
    verdicts as ``is_jump`` on the same history, through windows that fill and slide."""
    gen = random.Random(0)
    jumps = JumpWindow(window=20, min_history=5, min_samples=1)
    kept: list[float] = []
    for _ in range(200):
        loss = gen.choice([gen.uniform(0.1, 2.0), gen.uniform(5.0, 30.0)])
        mean, _, _ = jumps.add(loss, samples=1) or (math.nan, 0, 0)
        history = kept[-20:] if len(kept) >= 5 else [kept[0] if kept else mean]
        min_jump = 0.5 * abs(jumps.start or 0.0)
        reference = jumps.reference()
        assert reference is not None
        assert (mean > jump_threshold(reference, 5.0, min_jump)) == is_jump(
            mean, history, 5.0, min_jump)
        jumps.push(mean)
        kept.append(mean)
    config = AdvisorConfig(stall_steps=20)
    falling = [2.3 - 0.1 * i for i in range(20)]
    assert stall_verdict(falling[:10], falling, 20, config) is None
    flat = stall_verdict([2.3] * 10, [2.31] * 20, 20, config)
    assert flat is not None and flat.code == "advisor.stalled"
    assert flat.value == pytest.approx(-0.01 / 2.3) and flat.expected == (0.01, 1.0)


def test_the_lazy_jump_window_gives_the_verdicts_of_the_sorted_one():
    """Issue 23 part 1: the advisor judges a group mean against the threshold of the window's
    lower bound first and reads the median only above it. On falling, noisy, spiking and
    negative losses, through windows that fill and slide, the bound never hides a jump, the
    verdicts are those of ``is_jump`` on the same history, and the window keeps the same means."""
    gen = random.Random(1)
    jumps = JumpWindow(window=20, min_history=5, min_samples=1)
    kept: list[float] = []
    median_reads = 0
    for i in range(600):
        base = 2.3 * 0.99 ** i - (1.0 if i > 400 else 0.0)  # falls, then below zero
        loss = base + gen.gauss(0, 0.05) + (gen.choice([0.0] * 30 + [8.0]) if i > 20 else 0.0)
        mean = jumps.add(loss, samples=1)[0]  # type: ignore[index]
        history = kept[-20:] if len(kept) >= 5 else [kept[0] if kept else mean]
        min_jump = 0.5 * abs(jumps.start or 0.0)
        truth = is_jump(mean, history, 5.0, min_jump)
        low = jumps.lower()
        assert low is not None
        gate = mean > jump_threshold(low, 5.0, min_jump)
        assert gate or not truth  # the bound never hides a jump
        if gate:
            median_reads += 1
            reference = jumps.reference()
            assert reference is not None and reference >= low
            assert (mean > jump_threshold(reference, 5.0, min_jump)) == truth
        jumps.push(mean)
        kept.append(mean)
    assert list(jumps.values) == kept[-20:]
    assert median_reads < 100  # the common step reads no median


def test_advisor_and_curves_summaries():
    config = AdvisorConfig(patience=3)
    v = advisor_summary("val_loss", [2.0, 1.5, 1.5, NAN], 0, 0, {"advisor.divergence"}, 0,
                        config)
    assert v.value == 2.0 and v.details == {"monitor": "val_loss", "best": 1.5, "plateaus": 0}
    assert v.message == ("Plateau counter on `val_loss`: 2 of 3 epoch(s) without a 1% "
                         "improvement; best 1.5 over 3 epoch(s); 0 plateau(s) reported; no "
                         "under/overfitting found.")
    assert advisor_summary("x", [], 0, 0, set(), 0, config).value is None
    curves = curves_summary({"loss/train": [(0, 2.0), (1, 1.0)], "loss/val": [(0, 2.1)]})
    assert curves.value == 2.1 and curves.details == {"last": {"loss/train": 1.0,
                                                                "loss/val": 2.1},
                                                       "value": "loss/val"}
    assert curves.message == "Learning curves after 2 epoch(s): train loss 1, val loss 2.1 " \
                             "(epoch 0)."

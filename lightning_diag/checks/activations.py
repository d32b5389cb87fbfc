"""The rules of :class:`~lightning_diag.callbacks.activation_histogram.ActivationHistogram`
(recipe 5.3): which layers it watches, and what their statistics say (dead units, saturation,
vanishing or exploding gradients), as pure functions of one logging step's statistics.

Each layer's statistics are :func:`~lightning_diag.functional.monitors.parse_summary_row`'s
dict (``dead_fraction``, ``saturated_fraction``, ``grad_norm``, ``grad_rms``, ...), keyed by the
layer's name in forward order.

Example:
    >>> nan = float("nan")
    >>> last = {"net.1": {"dead_fraction": 0.0, "saturated_fraction": nan, "grad_norm": 1.0,
    ...                   "grad_rms": 1e-6},
    ...         "net.2": {"dead_fraction": 0.9, "saturated_fraction": nan, "grad_norm": 1.0,
    ...                   "grad_rms": 1.0}}
    >>> types = {"net.1": "Linear", "net.2": "ReLU"}
    >>> [v.code for v in activation_verdicts(last, {"net.1"}, ActivationConfig(), types)]
    ['activations.dead_units', 'gradients.vanishing']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from lightning_diag.checks.verdict import Verdict
from lightning_diag.findings import Severity
from lightning_diag.functional.monitors import gradient_flow
from lightning_diag.tensorboard.figures import layer_label
from lightning_diag.validation import (
    argument,
    check_flag,
    check_int,
    check_number,
    check_sequence,
    check_str,
    require,
    validate_arguments,
)

__all__ = ["MAX_BINS", "MIN_SAMPLES", "PASS_THROUGH", "ActivationConfig", "LayerFilter",
           "activation_bounds", "activation_summary", "activation_verdicts", "chosen_layers",
           "dead_layers", "default_layer", "gradient_ratio", "measured", "worst_readings"]

LayerFilter = Callable[[str, nn.Module], bool]
#: Samples a logging step measures at least (consecutive small batches pooled) before a unit
#: is called dead or the gradient flow judged: see ``docs/callbacks/activation_histogram.md``
#: for the measurements behind it.
MIN_SAMPLES = 32
#: Histogram bins at most: TensorBoard's histogram cards rebin every histogram to 30 bins, the
#: summary figure's distribution panel is ~650 pixels wide, and each bin adds 16 bytes per
#: histogram (2 per layer) to every logging step's event.
MAX_BINS = 256
# Leaf layers whose output is their input reshaped, unchanged, or randomly masked: their
# statistics repeat the layer before them, so by default they cost a logging step for nothing.
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Identity,
                                             nn.modules.dropout._DropoutNd)
_BOUNDED: dict[type[nn.Module], Callable[[Any], tuple[float, float]]] = {
    nn.Tanh: lambda m: (-1.0, 1.0),
    nn.Softsign: lambda m: (-1.0, 1.0),
    nn.Sigmoid: lambda m: (0.0, 1.0),
    nn.Hardsigmoid: lambda m: (0.0, 1.0),
    nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val)),
}
_SATURATION_ADVICE = ("Bad weight initialization (weights too large): use Xavier/Kaiming init, "
                      "normalize the inputs, or add BatchNorm before the nonlinearity.")
_DEAD_ADVICE = ("Dead ReLUs: lower the learning rate, check the initialization and biases (a "
                "strongly negative bias kills units), or try LeakyReLU.")
_FLOW_ADVICE = ("Check the weight initialization and the nonlinearities (saturated tanh/sigmoid "
                "vanish); add normalization or residual connections; for exploding gradients "
                "lower the learning rate or clip gradients.")
_BLOCKED_ADVICE = ("A dead layer blocks every gradient below it: lower the learning rate (a too "
                   "large step is the usual way ReLUs die), check the initialization and biases, "
                   "or use LeakyReLU; restart from a checkpoint from before it died.")
_DETACHED_ADVICE = ("Make the path from the loss to these layers differentiable: remove the "
                    "`detach()` or `.data` use, or the cast.")


def _check_layers(name: str, value: Any) -> None:
    if callable(value):
        return
    require(value is None or (isinstance(value, Sequence) and not isinstance(value, str)),
            name, value, "None, a sequence of module names or a callable (name, module) -> bool",
            TypeError)
    check_sequence(name, value, check_str, optional=True)


_FRACTION = partial(check_number, low=0, high=1, low_open=True)


@dataclass(frozen=True)
class ActivationConfig:
    """The validated arguments of ``ActivationHistogram`` (see it for their meaning), each
    declared once; ``state_key`` is built from those with ``key`` (what is measured)."""

    every_n_steps: int = argument(200, check_int)
    # `argument` is a dataclass field (it returns one), not a default shared between instances
    layers: Sequence[str] | LayerFilter | None = argument(None, _check_layers)  # noqa: RUF009
    bins: int = argument(64, partial(check_int, high=MAX_BINS))
    dead_fraction: float = argument(0.5, _FRACTION, convert=float)
    saturated_fraction: float = argument(0.5, _FRACTION, convert=float)
    vanishing_ratio: float = argument(
        1e-3, partial(check_number, low=0, high=1, low_open=True, high_open=True), convert=float)
    exploding_ratio: float = argument(1e3, partial(check_number, low=1, low_open=True),
                                      convert=float)
    figure_every_n_logs: int = argument(0, partial(check_int, low=0), key=False)
    log_charts: bool = argument(True, check_flag, key=False)
    early_steps: bool = argument(False, check_flag, key=False)
    # left out of the state key: the saved logging-step count stays valid whatever it is
    min_samples: int = argument(MIN_SAMPLES, check_int, key=False)

    def __post_init__(self) -> None:
        validate_arguments(self)


def activation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation (tanh, sigmoid, hardtanh, ...), else None.

    Example:
        >>> activation_bounds(nn.Hardtanh(-2.0, 2.0)), activation_bounds(nn.ReLU6())
        ((-2.0, 2.0), None)
    """
    for kind, get in _BOUNDED.items():
        if isinstance(module, kind) and not isinstance(module, nn.ReLU6):
            return get(module)
    return None


def default_layer(name: str, module: nn.Module) -> bool:
    """Whether a layer is watched by default: a leaf module that is not a loss, a metric or a
    pass-through layer (:data:`PASS_THROUGH`)."""
    # Metrics and losses are leaf modules too, but their outputs are not activations.
    return (bool(name) and not any(True for _ in module.children())
            and not isinstance(module, (nn.modules.loss._Loss, *PASS_THROUGH))
            and not type(module).__module__.startswith("torchmetrics"))


def chosen_layers(model: nn.Module, layers: Sequence[str] | LayerFilter | None
                  ) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that ``layers`` picks, in definition order.

    Raises:
        ValueError: ``layers`` names a module that does not exist.
    """
    pick: LayerFilter = (layers if callable(layers) else default_layer if layers is None
                         else (lambda n, m: n in layers))  # type: ignore[operator]
    chosen = [(n, m) for n, m in model.named_modules() if pick(n, m)]
    if isinstance(layers, Sequence) and len(chosen) < len(layers):
        missing = sorted(set(layers) - {n for n, _ in chosen})
        raise ValueError(f"`layers` names modules that do not exist: {missing}.")
    return chosen


Stats = Mapping[str, Mapping[str, Any]]


def _label(layer_types: Mapping[str, str], name: str) -> str:
    return layer_label(name, layer_types.get(name, "?"))


def dead_layers(last: Stats, parametric: set[str], threshold: float
                ) -> list[tuple[str, list[str]]]:
    """Each layer with more than ``threshold`` of its units dead, and the parameter-free layers
    right after it that only pass its zeros on (a max-pool of dead ReLUs): one fact each.

    Only layers that gradients reach count: a Flatten of the input would flag blank pixels.
    """
    dead: list[tuple[str, list[str]]] = []
    previous = False
    for name, s in last.items():
        is_dead = s["dead_fraction"] > threshold and not math.isnan(s["grad_norm"])
        if is_dead and previous and name not in parametric:
            dead[-1][1].append(name)
        elif is_dead:
            dead.append((name, []))
        previous = is_dead
    return dead


def _layer_verdict(code: str, layer: str, value: float, message: str, advice: str,
                   expected: tuple[float, float], **details: Any) -> Verdict:
    return Verdict(code, message, float(value), expected, {"layer": layer, **details}, advice,
                   subject=layer)


def activation_verdicts(last: Stats, parametric: set[str], config: ActivationConfig,
                        layer_types: Mapping[str, str], samples: tuple[int, int] | None = None
                        ) -> list[Verdict]:
    """The WARN verdicts of one logging step: ``activations.dead_units`` per dead layer,
    ``activations.saturation`` per saturated bounded layer, then ``gradients.vanishing`` or
    ``gradients.exploding`` for the first/last-layer gradient RMS ratio.

    Args:
        last: Each layer's statistics, in forward order.
        parametric: The layers with weights of their own.
        config: The thresholds.
        layer_types: Each layer's module type, to name it (``net.3 (Conv2d)``).
        samples: The samples and batches measured (None: one batch, not counted), said in
            the messages and kept in the details. Fewer than ``config.min_samples`` (a window
            cut short by the end of training): dead units and the gradient flow are not
            judged.
    """
    enough = samples is None or samples[0] >= config.min_samples
    out = [_dead_verdict(last, name, after, config.dead_fraction, layer_types, samples)
           for name, after in dead_layers(last, parametric, config.dead_fraction) if enough]
    for name, s in last.items():
        sat = s["saturated_fraction"]
        if sat > config.saturated_fraction:
            out.append(_layer_verdict(
                "activations.saturation", name, sat,
                f"{sat:.0%} of the outputs of bounded layer {_label(layer_types, name)} are "
                f"saturated (expected <= {config.saturated_fraction:.0%}); their gradients are "
                "near zero.", _SATURATION_ADVICE, (0.0, config.saturated_fraction)))
    kind, ratio = gradient_flow([s["grad_rms"] for s in last.values()],
                                config.vanishing_ratio, config.exploding_ratio)
    if kind is not None and enough:
        out.append(_gradient_verdict(last, kind, ratio, config, layer_types, samples))
    return out


def measured(samples: tuple[int, int] | None) -> str:
    """The samples a logging step measured, in words (``the batch`` when not counted).

    Example:
        >>> measured(None), measured((64, 1)), measured((32, 8))
        ('the batch', 'the batch of 64 samples', 'the 32 samples of 8 batches measured together')
    """
    if samples is None:
        return "the batch"
    n, batches = samples
    return (f"the batch of {n} samples" if batches <= 1 else
            f"the {n} samples of {batches} batches measured together")


def _counted(samples: tuple[int, int] | None) -> dict[str, int]:
    return {} if samples is None else {"samples": samples[0], "batches": samples[1]}


def _dead_verdict(last: Stats, name: str, after: list[str], threshold: float,
                  layer_types: Mapping[str, str], samples: tuple[int, int] | None) -> Verdict:
    fraction = last[name]["dead_fraction"]
    passed = (f"; {', '.join(_label(layer_types, n) for n in after)} after it only "
              f"pass{'es' if len(after) == 1 else ''} those zeros on" if after else "")
    return _layer_verdict(
        "activations.dead_units", name, fraction,
        f"{fraction:.0%} of the units of {_label(layer_types, name)} are zero on every sample "
        f"of {measured(samples)} (expected <= {threshold:.0%}){passed}.", _DEAD_ADVICE,
        (0.0, threshold), passed_on_by=after, **_counted(samples))


def _gradient_verdict(last: Stats, kind: str, ratio: float, config: ActivationConfig,
                      layer_types: Mapping[str, str], samples: tuple[int, int] | None
                      ) -> Verdict:
    expected = (config.vanishing_ratio, config.exploding_ratio)
    reached = [n for n, s in last.items() if not math.isnan(s["grad_rms"])]
    blocked = []
    for name in reached:
        if last[name]["grad_rms"] != 0.0:
            break
        blocked.append(name)
    if kind == "vanishing" and blocked:
        return _blocked_verdict(last, blocked, reached[len(blocked)], expected, layer_types,
                                samples)
    first, end = _label(layer_types, reached[0]), _label(layer_types, reached[-1])
    return Verdict(
        f"gradients.{kind}",
        f"Gradient {kind}: per-element gradient RMS at the first layer {first} is {ratio:.3g}x "
        f"that at the last layer {end} over {measured(samples)} (expected within "
        f"{expected}).", float(ratio), expected, _counted(samples), _FLOW_ADVICE)


def _blocked_verdict(last: Stats, blocked: list[str], blocker: str,
                     expected: tuple[float, float], layer_types: Mapping[str, str],
                     samples: tuple[int, int] | None) -> Verdict:
    """``gradients.vanishing`` when the first layers get no gradient at all (exactly 0)."""
    label = partial(_label, layer_types)
    layers = (label(blocked[0]) if len(blocked) == 1 else
              f"{len(blocked)} layers, {label(blocked[0])} to {label(blocked[-1])}")
    dead = last[blocker]["dead_fraction"]
    why = (f"every one of its units is dead (zero on every sample of {measured(samples)}), "
           "so it passes no gradient back" if dead == 1.0 else
           f"it passes no gradient back although {1 - dead:.0%} of its units are alive: "
           "look for a `detach()`, an integer cast or a non-differentiable operation there")
    return Verdict(
        "gradients.vanishing",
        f"No gradient reaches {layers}: their gradient is exactly 0, so they cannot learn. "
        f"{label(blocker)} blocks it: {why}.", 0.0, expected,
        {"blocked": blocked, "blocker": blocker, **_counted(samples)},
        _BLOCKED_ADVICE if dead == 1.0 else _DETACHED_ADVICE)


Worst = dict[str, tuple[float, str, int]]


def worst_readings(worst: Worst, last: Stats, step: int) -> Worst:
    """``worst`` (stat -> (value, layer, step)) updated with the dead and saturated fractions
    of a logging step: the largest reading of each (dead fractions of layers that gradients
    reach only, as :func:`dead_layers`).

    Example:
        >>> worst_readings({}, {"a": {"dead_fraction": 0.3, "saturated_fraction": 0.9,
        ...                           "grad_norm": 1.0}}, step=7)
        {'dead_fraction': (0.3, 'a', 7), 'saturated_fraction': (0.9, 'a', 7)}
    """
    out = dict(worst)
    for stat in ("dead_fraction", "saturated_fraction"):
        for name, s in last.items():
            reached = stat == "saturated_fraction" or not math.isnan(s["grad_norm"])
            if reached and not math.isnan(s[stat]) and s[stat] > out.get(stat, (-1.0, "", 0))[0]:
                out[stat] = (s[stat], name, step)
    return out


def gradient_ratio(last: Stats) -> float:
    """The first/last-layer gradient RMS ratio of a logging step (NaN when not measurable)."""
    return gradient_flow([s["grad_rms"] for s in last.values()], 0.0, math.inf)[1]


def activation_summary(logs: int, worst: Worst, ratio: float, config: ActivationConfig,
                       layer_types: Mapping[str, str]) -> Verdict:
    """The INFO verdict ``activations.summary`` after ``logs`` logging steps: the worst dead
    fraction and its layer, the largest saturated fraction, the last gradient ratio."""
    code = "activations.summary"
    if not logs:
        return Verdict(code, "Activations: no logging step ran in this fit (no optimizer step), "
                       "nothing was measured.", None, None, severity=Severity.INFO)
    label = partial(_label, layer_types)
    dead, dead_at, dead_step = worst.get("dead_fraction", (0.0, "", 0))
    parts = [f"Activations over {logs} logging step(s) (every {config.every_n_steps} "
             f"steps): worst dead fraction {dead:.0%}"
             + (f" at {label(dead_at)}, step {dead_step}" if dead_at else "")
             + f" (expected <= {config.dead_fraction:.0%})"]
    if "saturated_fraction" in worst:
        sat, sat_at, sat_step = worst["saturated_fraction"]
        parts.append(f"largest saturated fraction {sat:.0%} at {label(sat_at)}, step "
                     f"{sat_step} (expected <= {config.saturated_fraction:.0%})")
    else:
        parts.append("no bounded layer (tanh, sigmoid, hardtanh) to saturate")
    if not math.isnan(ratio):
        parts.append(f"first/last-layer gradient RMS ratio {ratio:.3g} at the last logging step "
                     f"(expected within ({config.vanishing_ratio:g}, "
                     f"{config.exploding_ratio:g}))")
    return Verdict(code, "; ".join(parts) + ".", dead, (0.0, config.dead_fraction),
                   {"worst": {k: list(v) for k, v in worst.items()}, "gradient_ratio": ratio,
                    "logging_steps": logs}, severity=Severity.INFO)

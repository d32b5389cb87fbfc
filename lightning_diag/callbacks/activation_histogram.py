"""Per-layer activation and gradient histograms and statistics (step 5.3 of the recipe).

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.activation_histogram import ActivationHistogram
    >>> trainer = pl.Trainer(callbacks=[ActivationHistogram(every_n_steps=50)], logger=False)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_diag.base import DiagnosticCallback
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.monitors import (
    HIST_HEADER,
    STAT_NAMES,
    gradient_flow,
    layer_summary,
)
from lightning_diag.tensorboard.figures import layer_summary_figure
from lightning_diag.tensorboard.tags import (
    ACTIVATIONS_SUMMARY,
    activation_histogram,
    activation_stat,
)
from lightning_diag.tensorboard.writer import log_figure, log_step_summary
from lightning_diag.validation import (
    check_int,
    check_number,
    check_sequence,
    check_str,
    require,
)

__all__ = ["PASS_THROUGH", "ActivationHistogram"]

_BOUNDED: dict[type[nn.Module], Callable[[Any], tuple[float, float]]] = {
    nn.Tanh: lambda m: (-1.0, 1.0),
    nn.Softsign: lambda m: (-1.0, 1.0),
    nn.Sigmoid: lambda m: (0.0, 1.0),
    nn.Hardsigmoid: lambda m: (0.0, 1.0),
    nn.Hardtanh: lambda m: (float(m.min_val), float(m.max_val)),
}
LayerFilter = Callable[[str, nn.Module], bool]
# Leaf layers whose output is their input reshaped, unchanged, or randomly masked: their
# statistics repeat the layer before them, so by default they cost a logging step for nothing.
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Identity,
                                             nn.modules.dropout._DropoutNd)


def _bounds(module: nn.Module) -> tuple[float, float] | None:
    for kind, get in _BOUNDED.items():
        if isinstance(module, kind) and not isinstance(module, nn.ReLU6):
            return get(module)
    return None


def _default_layer(name: str, module: nn.Module) -> bool:
    # Metrics and losses are leaf modules too, but their outputs are not activations.
    return (bool(name) and not any(True for _ in module.children())
            and not isinstance(module, (nn.modules.loss._Loss, *PASS_THROUGH))
            and not type(module).__module__.startswith("torchmetrics"))


def _loss_scale(trainer: pl.Trainer) -> torch.Tensor | float:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    scale = getattr(scaler, "_scale", None)  # a device tensor: reading it does not sync
    return scale if isinstance(scale, torch.Tensor) else float(scaler.get_scale())


def _validate(every_n_steps: Any, layers: Any, bins: Any, dead_fraction: Any,
              saturated_fraction: Any, vanishing_ratio: Any, exploding_ratio: Any,
              figure_every_n_logs: Any) -> None:
    check_int("every_n_steps", every_n_steps)
    if not callable(layers):
        require(layers is None or (isinstance(layers, Sequence) and not isinstance(layers, str)),
                "layers", layers, "None, a sequence of module names or a callable "
                "(name, module) -> bool", TypeError)
        check_sequence("layers", layers, check_str, optional=True)
    check_int("bins", bins)
    check_number("dead_fraction", dead_fraction, low=0, high=1, low_open=True)
    check_number("saturated_fraction", saturated_fraction, low=0, high=1, low_open=True)
    check_number("vanishing_ratio", vanishing_ratio, low=0, high=1, low_open=True, high_open=True)
    check_number("exploding_ratio", exploding_ratio, low=1, low_open=True)
    check_int("figure_every_n_logs", figure_every_n_logs, low=0)


def _parse(row: list[float], has_grad: bool, numel: int) -> dict[str, Any]:
    """One layer's host row: its activation summary, then its gradient's (layer_summary)."""
    k, width = len(STAT_NAMES), len(row) // 2
    out: dict[str, Any] = dict(zip(STAT_NAMES, row[:k], strict=True))
    out["act_hist"], grad, out["grad_hist"] = row[k:width], row[width:], row[width + k:]
    num, squares = grad[k + 2], grad[k + 4]
    # A non-finite gradient value (left out of the sums) makes the norm infinite.
    norm = math.sqrt(squares) if num == numel and math.isfinite(squares) else math.inf
    out["grad_norm"] = norm if has_grad else math.nan
    out["grad_rms"] = out["grad_norm"] / math.sqrt(max(numel, 1))
    return out


class ActivationHistogram(DiagnosticCallback):
    """Histograms and statistics of each layer's activations and of the gradients into them.

    On optimizer step 0 and every ``every_n_steps``-th step (training only), forward hooks on
    the chosen layers compute, on the tensors' device and in one fused pass per tensor
    (:func:`~lightning_diag.functional.monitors.layer_summary`): mean, std, zero fraction, dead
    fraction (units zero on the whole batch), saturated fraction (bounded activations: tanh,
    sigmoid, hardtanh, ...), a 64-bin histogram, and for the gradient flowing back into the
    output its norm and histogram, unscaled under mixed precision. Everything is copied to the
    host once per logging step and written to TensorBoard as one event. The hooks exist only
    during that step's batch. The per-layer summary figure is drawn once, at the end of
    training (a figure costs about one logging step).

    Findings: ``activations.dead_units`` (most units of a layer dead), ``activations.saturation``
    (most values of a bounded layer saturated), ``gradients.vanishing`` / ``gradients.exploding``
    (per-element gradient RMS of the first layer vs the last below ``vanishing_ratio`` / above
    ``exploding_ratio``, or non-finite). Each is reported once per layer per fit.

    Args:
        every_n_steps: Log on step 0 (initialization problems show there) and every this many
            optimizer steps.
        layers: None (leaf modules, except pass-through ones whose output repeats their input:
            ``PASS_THROUGH`` = Flatten, Unflatten, Identity and dropout layers), a list of
            module names, or ``fn(name, module) -> bool`` (which may pick those too).
        bins: Histogram bins.
        dead_fraction: Fraction of dead units above which a layer is flagged.
        saturated_fraction: Fraction of saturated values above which a layer is flagged.
        vanishing_ratio / exploding_ratio: Thresholds of ``first-layer / last-layer`` gradient
            RMS.
        figure_every_n_logs: Also draw the per-layer summary figure on every this many logging
            steps; 0 (default): only at the end of training (a figure costs ~1 logging step).
        strict: Raise on FAIL findings (these findings are WARN).

    Example:
        >>> cb = ActivationHistogram(every_n_steps=100, layers=["net.1", "net.3"])
    """

    slug = "activations"

    def __init__(self, every_n_steps: int = 200, layers: Sequence[str] | LayerFilter | None = None,
                 bins: int = 64, dead_fraction: float = 0.5, saturated_fraction: float = 0.5,
                 vanishing_ratio: float = 1e-3, exploding_ratio: float = 1e3,
                 figure_every_n_logs: int = 0, strict: bool = False) -> None:
        super().__init__(strict=strict)
        _validate(every_n_steps, layers, bins, dead_fraction, saturated_fraction,
                  vanishing_ratio, exploding_ratio, figure_every_n_logs)
        self.every_n_steps, self.bins, self.layers = every_n_steps, bins, layers
        self.dead_fraction = float(dead_fraction)
        self.saturated_fraction = float(saturated_fraction)
        self.vanishing_ratio, self.exploding_ratio = float(vanishing_ratio), float(exploding_ratio)
        self.figure_every_n_logs = figure_every_n_logs
        self.reported: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}
        self._logs = 0
        self._logged_step = -1
        self._act: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}
        self._numel: dict[str, int] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, layers=self.layers, bins=self.bins,
            dead_fraction=self.dead_fraction, saturated_fraction=self.saturated_fraction,
            vanishing_ratio=self.vanishing_ratio, exploding_ratio=self.exploding_ratio)

    def _chosen(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        names = self.layers
        pick: LayerFilter = (names if callable(names) else _default_layer if names is None
                             else (lambda n, m: n in names))  # type: ignore[operator]
        chosen = [(n, m) for n, m in pl_module.named_modules() if pick(n, m)]
        if isinstance(names, Sequence) and len(chosen) < len(names):
            missing = sorted(set(names) - {n for n, _ in chosen})
            raise ValueError(f"`layers` names modules that do not exist: {missing}.")
        return chosen

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._logged_step:
            return
        self._logged_step = step
        scale_grads = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        for name, module in self._chosen(pl_module):
            self.hooks.forward(module, self._forward_hook(trainer, name, _bounds(module),
                                                          scale_grads))

    def _forward_hook(self, trainer: pl.Trainer, name: str, bounds: tuple[float, float] | None,
                      accumulation: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or name in self._act or not trainer.training:
                return
            self._act[name] = layer_summary(out, bounds, self.bins)
            if out.requires_grad and torch.is_grad_enabled():
                self.hooks.tensor(out, grad_hook)

        def grad_hook(grad: torch.Tensor) -> None:
            if name in self._grad:
                return
            factor = accumulation / _loss_scale(trainer)
            true = grad if isinstance(factor, float) and factor == 1.0 else grad.float() * factor
            self._numel[name] = grad.numel()
            self._grad[name] = layer_summary(true, None, self.bins)
        return hook

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if len(self.hooks) or self._act:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        self.hooks.remove_all()
        acts, grads, numel = self._act, self._grad, self._numel
        self._act, self._grad, self._numel = {}, {}, {}
        if not acts:
            return
        width = len(STAT_NAMES) + len(HIST_HEADER) + self.bins
        device = next(iter(acts.values())).device
        empty = torch.full((width,), math.nan, device=device)
        rows = torch.stack([torch.cat([a.to(device), grads.get(n, empty).to(device)])
                            for n, a in acts.items()]).cpu()  # the one host sync
        self.last = {name: _parse(row.tolist(), name in grads, numel.get(name, 0))
                     for name, row in zip(acts, rows, strict=True)}
        self._logs += 1
        self._log(trainer)
        self.publish(trainer, self._check(trainer))

    def _log(self, trainer: pl.Trainer) -> None:
        step = self._logged_step
        scalars: dict[str, float] = {}
        for name, s in self.last.items():
            for stat in (*STAT_NAMES, "grad_norm"):
                if not (stat in ("saturated_fraction", "grad_norm") and math.isnan(s[stat])):
                    scalars[activation_stat(stat, name)] = s[stat]
        histograms = {activation_histogram(kind.split("_")[0], name): s[kind]
                      for name, s in self.last.items() for kind in ("act_hist", "grad_hist")}
        log_step_summary(trainer, scalars, histograms, step)
        if not self.require_tensorboard(trainer, "activation histograms and figure"):
            return
        n = self.figure_every_n_logs
        if n and self._logs % n == 0:
            self._figure(trainer)

    def _figure(self, trainer: pl.Trainer) -> None:
        log_figure(trainer, ACTIVATIONS_SUMMARY,
                   layer_summary_figure(self.last, self.bins), self._logged_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.figure_every_n_logs
        drawn = n and self._logs % n == 0
        if self.last and not drawn and self.require_tensorboard(trainer, "summary figure"):
            self._figure(trainer)

    def _check(self, trainer: pl.Trainer) -> list[Finding]:
        out = []
        for name, s in self.last.items():
            # Only layers that gradients reach: a Flatten of the input would flag blank pixels.
            if s["dead_fraction"] > self.dead_fraction and not math.isnan(s["grad_norm"]):
                out.append(self._once(trainer, "activations.dead_units", name, s["dead_fraction"],
                    f"{s['dead_fraction']:.0%} of the units of layer `{name}` are zero on every "
                    f"sample of the batch (expected <= {self.dead_fraction:.0%}).",
                    "Dead ReLUs: lower the learning rate, check the initialization and biases "
                    "(a strongly negative bias kills units), or try LeakyReLU."))
            if s["saturated_fraction"] > self.saturated_fraction:
                out.append(self._once(trainer, "activations.saturation", name,
                    s["saturated_fraction"], f"{s['saturated_fraction']:.0%} of the outputs of "
                    f"bounded layer `{name}` are saturated (expected <= "
                    f"{self.saturated_fraction:.0%}); their gradients are near zero.",
                    "Bad weight initialization (weights too large): use Xavier/Kaiming init, "
                    "normalize the inputs, or add BatchNorm before the nonlinearity."))
        names = list(self.last)
        kind, ratio = gradient_flow([self.last[n]["grad_rms"] for n in names],
                                    self.vanishing_ratio, self.exploding_ratio)
        if kind is not None:
            expected = (self.vanishing_ratio, self.exploding_ratio)
            out.append(self._once(trainer, f"gradients.{kind}", "", ratio,
                f"Gradient {kind}: per-element gradient RMS at the first layer is {ratio:.3g}x "
                f"that at the last layer (expected within {expected}).",
                "Check the weight initialization and the nonlinearities (saturated tanh/sigmoid "
                "vanish); add normalization or residual connections; for exploding gradients "
                "lower the learning rate or clip gradients.", expected=expected))
        return [f for f in out if f is not None]

    def _once(self, trainer: pl.Trainer, code: str, layer: str, value: float, message: str,
              advice: str, expected: Any = None) -> Finding | None:
        key = f"{code}:{layer}"
        if key in self.reported:
            return None
        self.reported.add(key)
        return self.finding(trainer, code, Severity.WARN, message, advice=advice,
                            step=self._logged_step,
                            value=float(value), expected=expected,
                            details={"layer": layer} if layer else {})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.reported, self.last, self._logs, self._logged_step = set(), {}, 0, -1

    @override
    def _release(self) -> None:
        super()._release()
        self._act, self._grad, self._numel = {}, {}, {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reported": sorted(self.reported), "logs": self._logs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported = set(state_dict.get("reported", []))
        self._logs = int(state_dict.get("logs", 0))

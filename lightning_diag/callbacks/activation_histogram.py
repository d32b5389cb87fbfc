"""Per-layer activation and gradient histograms and statistics (step 5.3 of the recipe).

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.activation_histogram import ActivationHistogram
    >>> trainer = pl.Trainer(callbacks=[ActivationHistogram(every_n_steps=50)], logger=False)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

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
from lightning_diag.tensorboard.figures import layer_label, layer_summary_figure
from lightning_diag.tensorboard.tags import (
    ACTIVATIONS_SUMMARY,
    activation_histogram,
    activation_stat,
    typed_layer,
)
from lightning_diag.tensorboard.writer import (
    EventWorker,
    log_figure,
    log_scalars_elsewhere,
    log_step_summary,
    tensorboard_writer,
    write_step_summary,
)
from lightning_diag.validation import (
    check_flag,
    check_int,
    check_number,
    check_sequence,
    check_str,
    require,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class _Event(NamedTuple):
    """A logging step: its global step and epoch, its number among the fit's logging steps
    (from 1), and each hooked layer's name in the tags (its module type added)."""

    step: int
    epoch: int
    number: int
    typed: dict[str, str]

__all__ = ["COPY_BUDGET", "PASS_THROUGH", "ActivationHistogram"]

#: Values copied per logging step for the worker to count on CPU (64 MiB of float32); layers
#: past it are counted on the training thread, as on an accelerator. At most two steps' copies
#: wait for the worker.
COPY_BUDGET = 2**24

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
              figure_every_n_logs: Any, log_charts: Any) -> None:
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
    check_flag("log_charts", log_charts)


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
    host once per logging step and written to TensorBoard as one event, each layer named with
    its module type (``net.3_Conv2d`` in the tags, ``net.3 (Conv2d)`` in the figure: see
    :func:`~lightning_diag.tensorboard.figures.layer_label`). The hooks exist only during that
    step's batch. The per-layer summary figure is drawn once, at the end of
    training (a figure costs about one logging step).

    Findings: ``activations.dead_units`` (most units of a layer dead; a parameter-free layer
    right after a dead one, e.g. a max-pool, only passes the same zeros on and is named in that
    finding, not reported again), ``activations.saturation`` (most values of a bounded layer
    saturated), ``gradients.vanishing`` / ``gradients.exploding`` (per-element gradient RMS of
    the first layer vs the last below ``vanishing_ratio`` / above ``exploding_ratio``, or
    non-finite; when no gradient at all reaches the first layers, the layer that blocks it is
    named). Each is one finding per layer per fit, updated at every logging step where it holds
    (the worst reading and every step seen). At the end of training, one INFO verdict
    ``activations.summary``: the worst dead fraction and its layer, the largest saturated
    fraction, the last gradient ratio.

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
        log_charts: Write the histograms, statistics and figure to TensorBoard. False: only
            what the findings need is computed (dead and saturated fractions, gradient norms;
            :attr:`last` holds NaN for the rest) and the findings still reach the findings
            table, at a fraction of the cost; the search's trials run so.
        strict: Raise on FAIL findings (these findings are WARN).

    Example:
        >>> cb = ActivationHistogram(every_n_steps=100, layers=["net.1", "net.3"])
    """

    slug = "activations"

    def __init__(self, every_n_steps: int = 200, layers: Sequence[str] | LayerFilter | None = None,
                 bins: int = 64, dead_fraction: float = 0.5, saturated_fraction: float = 0.5,
                 vanishing_ratio: float = 1e-3, exploding_ratio: float = 1e3,
                 figure_every_n_logs: int = 0, log_charts: bool = True,
                 strict: bool = False) -> None:
        super().__init__(strict=strict)
        _validate(every_n_steps, layers, bins, dead_fraction, saturated_fraction,
                  vanishing_ratio, exploding_ratio, figure_every_n_logs, log_charts)
        self.every_n_steps, self.bins, self.layers = every_n_steps, bins, layers
        self.dead_fraction = float(dead_fraction)
        self.saturated_fraction = float(saturated_fraction)
        self.vanishing_ratio, self.exploding_ratio = float(vanishing_ratio), float(exploding_ratio)
        self.figure_every_n_logs, self.log_charts = figure_every_n_logs, log_charts
        self.last: dict[str, dict[str, Any]] = {}
        #: The module type of each hooked layer (``"net.3"`` -> ``"Conv2d"``), to name it.
        self.layer_types: dict[str, str] = {}
        self._parametric: set[str] = set()  # layers with weights of their own
        self._worst: dict[str, tuple[float, str, int]] = {}  # stat -> (value, layer, step)
        self._ratio = math.nan  # first/last-layer gradient RMS at the last logging step
        self._logs = 0
        self._logged_step = -1
        self._act: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}
        self._numel: dict[str, int] = {}
        self._charts = False  # histograms wanted at this logging step (a TensorBoard writer)
        #: CPU copies (and bounds) of ("act" | "grad", layer) for the worker, and their size
        self._copies: dict[tuple[str, str], tuple[torch.Tensor, Any]] = {}
        self._copied = 0
        self._order: list[str] = []  # the layers hooked at this logging step, in forward order
        self._seen: set[str] = set()
        self._event_step = self._event_epoch = -1  # the logging step `last` measured
        self._worker = EventWorker(depth=2)

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
        self._charts = self.log_charts and tensorboard_writer(trainer) is not None
        scale_grads = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        for name, module in self._chosen(pl_module):
            self.layer_types[name] = type(module).__name__
            if next(module.parameters(recurse=False), None) is not None:
                self._parametric.add(name)
            self.hooks.forward(module, self._forward_hook(trainer, name, _bounds(module),
                                                          scale_grads))

    def _forward_hook(self, trainer: pl.Trainer, name: str, bounds: tuple[float, float] | None,
                      accumulation: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or name in self._seen or not trainer.training:
                return
            self._seen.add(name)
            self._order.append(name)
            self._capture("act", name, out, bounds)
            if out.requires_grad and torch.is_grad_enabled():
                self.hooks.tensor(out, grad_hook)

        def grad_hook(grad: torch.Tensor) -> None:
            if name in self._numel:
                return
            factor = accumulation / _loss_scale(trainer)
            true = grad if isinstance(factor, float) and factor == 1.0 else grad.float() * factor
            self._numel[name] = grad.numel()
            self._capture("grad", name, true, None)
        return hook

    def _capture(self, kind: str, name: str, x: torch.Tensor,
                 bounds: tuple[float, float] | None) -> None:
        """Summarize ``x`` now, in one fused pass on its device; or, on CPU with TensorBoard
        charts, copy it for the worker, which computes the same row off the training thread (a
        copy costs the training thread ~0.03 ms, the row ~0.5 ms on the digits CNN). At most
        :data:`COPY_BUDGET` values are copied per logging step; the rest is summarized here."""
        if self._charts and x.device.type == "cpu" and self._copied + x.numel() <= COPY_BUDGET:
            self._copies[(kind, name)] = (x.detach().clone(), bounds)
            self._copied += x.numel()
            return
        rows = self._act if kind == "act" else self._grad
        rows[name] = layer_summary(x, bounds, self.bins, lean=not self.log_charts,
                                   histogram=self._charts)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._collect(trainer)
        if len(self.hooks) or self._order:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        self.hooks.remove_all()
        order, acts, grads = self._order, self._act, self._grad
        numel, copies = self._numel, self._copies
        self._order, self._seen, self._act, self._grad = [], set(), {}, {}
        self._numel, self._copies, self._copied = {}, {}, 0
        if not order:
            return
        self._logs += 1
        event = _Event(self._logged_step, trainer.current_epoch, self._logs,
                       {n: typed_layer(n, self.layer_types[n]) for n in order})
        if copies:  # there is a TensorBoard writer (`_charts`): the worker finishes the step
            self._worker.submit(functools.partial(
                self._summarize, event, tensorboard_writer(trainer), order, acts, grads, numel,
                copies))
        else:
            self._apply(trainer, event, self._rows(order, acts, grads, numel, {}), None)

    def _rows(self, order: list[str], acts: dict[str, torch.Tensor],
              grads: dict[str, torch.Tensor], numel: dict[str, int],
              copies: dict[tuple[str, str], tuple[torch.Tensor, Any]]
              ) -> dict[str, dict[str, Any]]:
        """Each layer's parsed statistics and histograms, from one host copy of all rows."""
        for (kind, name), (x, bounds) in copies.items():
            (acts if kind == "act" else grads)[name] = layer_summary(x, bounds, self.bins)
        width = len(STAT_NAMES) + len(HIST_HEADER) + self.bins
        device = acts[order[0]].device
        empty = torch.full((width,), math.nan, device=device)
        rows = torch.stack([torch.cat([acts[n].to(device), grads.get(n, empty).to(device)])
                            for n in order]).cpu()  # the one host sync
        return {name: _parse(row.tolist(), name in grads, numel.get(name, 0))
                for name, row in zip(order, rows, strict=True)}

    def _summarize(self, event: _Event, writer: SummaryWriter | None, order: list[str],
                   acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                   numel: dict[str, int],
                   copies: dict[tuple[str, str], tuple[torch.Tensor, Any]]
                   ) -> tuple[_Event, dict[str, dict[str, Any]], dict[str, float]]:
        """On the worker: the step's rows from the copies, and its TensorBoard event."""
        last = self._rows(order, acts, grads, numel, copies)
        scalars, histograms = self._chart_values(last, event.typed)
        if writer is not None:
            write_step_summary(writer, scalars, histograms, event.step)
        return event, last, scalars

    def _collect(self, trainer: pl.Trainer, wait: bool = False) -> None:
        """Apply the logging steps the worker finished, in order (every one with ``wait``)."""
        for event, last, scalars in self._worker.drain() if wait else self._worker.ready():
            self._apply(trainer, event, last, scalars)

    def _apply(self, trainer: pl.Trainer, event: _Event, last: dict[str, dict[str, Any]],
               scalars: dict[str, float] | None) -> None:
        """A measured logging step: its charts (unless the worker wrote them) and findings."""
        self.last, self._event_step, self._event_epoch = last, event.step, event.epoch
        if self.log_charts:
            self._log(trainer, event, scalars)
        self.publish(trainer, self._check(trainer))

    def _chart_values(self, last: dict[str, dict[str, Any]], typed: dict[str, str]
                      ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """The scalars and histogram rows of a logging step, under their tags."""
        scalars: dict[str, float] = {}
        for name, s in last.items():
            for stat in (*STAT_NAMES, "grad_norm"):
                if not (stat in ("saturated_fraction", "grad_norm") and math.isnan(s[stat])):
                    scalars[activation_stat(stat, typed[name])] = s[stat]
        histograms = {activation_histogram(kind, typed[name]): s[f"{kind}_hist"]
                      for name, s in last.items() for kind in ("act", "grad")}
        return scalars, histograms

    def _log(self, trainer: pl.Trainer, event: _Event, scalars: dict[str, float] | None) -> None:
        if scalars is None:
            scalars, histograms = self._chart_values(self.last, event.typed)
            log_step_summary(trainer, scalars, histograms, event.step)
        else:  # the worker wrote the TensorBoard event; other loggers get the scalars here
            writer = tensorboard_writer(trainer)
            if writer is not None:
                log_scalars_elsewhere(trainer, writer, scalars, event.step)
        if not self.require_tensorboard(trainer, "activation histograms and figure"):
            return
        n = self.figure_every_n_logs
        if n and event.number % n == 0:
            self._figure(trainer)

    def _figure(self, trainer: pl.Trainer) -> None:
        labelled = {layer_label(n, self.layer_types[n]): s for n, s in self.last.items()}
        log_figure(trainer, ACTIVATIONS_SUMMARY, layer_summary_figure(labelled, self.bins),
                   self._event_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect(trainer, wait=True)  # every logging step applied and written
        self.publish(trainer, [self._summary(trainer)])
        n = self.figure_every_n_logs
        drawn = n and self._logs % n == 0
        if (self.log_charts and self.last and not drawn
                and self.require_tensorboard(trainer, "summary figure")):
            self._figure(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._collect(trainer, wait=True)  # the steps measured before the error still count
        super().on_exception(trainer, pl_module, exception)

    def _label(self, name: str) -> str:
        return layer_label(name, self.layer_types.get(name, "?"))

    def _check(self, trainer: pl.Trainer) -> list[Finding]:
        self._track()
        dead: list[tuple[str, list[str]]] = []  # a dead layer and the layers passing it on
        out = []
        previous_dead = False
        for name, s in self.last.items():
            # Only layers that gradients reach: a Flatten of the input would flag blank pixels.
            is_dead = s["dead_fraction"] > self.dead_fraction and not math.isnan(s["grad_norm"])
            if is_dead and previous_dead and name not in self._parametric:
                dead[-1][1].append(name)  # e.g. a max-pool of dead ReLUs: the same zeros
            elif is_dead:
                dead.append((name, []))
            previous_dead = is_dead
            if s["saturated_fraction"] > self.saturated_fraction:
                out.append(self._warn(trainer, "activations.saturation", name,
                    s["saturated_fraction"], f"{s['saturated_fraction']:.0%} of the outputs of "
                    f"bounded layer {self._label(name)} are saturated (expected <= "
                    f"{self.saturated_fraction:.0%}); their gradients are near zero.",
                    "Bad weight initialization (weights too large): use Xavier/Kaiming init, "
                    "normalize the inputs, or add BatchNorm before the nonlinearity.",
                    (0.0, self.saturated_fraction)))
        out = [self._dead(trainer, name, after) for name, after in dead] + out
        kind, ratio = gradient_flow([s["grad_rms"] for s in self.last.values()],
                                    self.vanishing_ratio, self.exploding_ratio)
        if kind is not None:
            out.append(self._gradient_finding(trainer, kind, ratio))
        return out

    def _track(self) -> None:
        """Keep the worst dead and saturated fractions seen and the last gradient ratio."""
        for stat in ("dead_fraction", "saturated_fraction"):
            for name, s in self.last.items():
                reached = stat == "saturated_fraction" or not math.isnan(s["grad_norm"])
                if reached and not math.isnan(s[stat]) and s[stat] > self._worst.get(
                        stat, (-1.0, "", 0))[0]:
                    self._worst[stat] = (s[stat], name, self._event_step)
        self._ratio = gradient_flow([s["grad_rms"] for s in self.last.values()], 0.0,
                                    math.inf)[1]

    def _dead(self, trainer: pl.Trainer, name: str, after: list[str]) -> Finding:
        fraction = self.last[name]["dead_fraction"]
        passed = (f"; {', '.join(map(self._label, after))} after it only "
                  f"pass{'es' if len(after) == 1 else ''} those zeros on" if after else "")
        return self._warn(trainer, "activations.dead_units", name, fraction,
            f"{fraction:.0%} of the units of {self._label(name)} are zero on every sample of "
            f"the batch (expected <= {self.dead_fraction:.0%}){passed}.",
            "Dead ReLUs: lower the learning rate, check the initialization and biases (a "
            "strongly negative bias kills units), or try LeakyReLU.",
            (0.0, self.dead_fraction), passed_on_by=after)

    def _gradient_finding(self, trainer: pl.Trainer, kind: str, ratio: float) -> Finding:
        expected = (self.vanishing_ratio, self.exploding_ratio)
        reached = [n for n, s in self.last.items() if not math.isnan(s["grad_rms"])]
        blocked = []
        for name in reached:
            if self.last[name]["grad_rms"] != 0.0:
                break
            blocked.append(name)
        if kind == "vanishing" and blocked:
            return self._blocked(trainer, blocked, reached[len(blocked)], expected)
        first, last = self._label(reached[0]), self._label(reached[-1])
        return self._warn(trainer, f"gradients.{kind}", "", ratio,
            f"Gradient {kind}: per-element gradient RMS at the first layer {first} is "
            f"{ratio:.3g}x that at the last layer {last} (expected within {expected}).",
            "Check the weight initialization and the nonlinearities (saturated tanh/sigmoid "
            "vanish); add normalization or residual connections; for exploding gradients "
            "lower the learning rate or clip gradients.", expected)

    def _blocked(self, trainer: pl.Trainer, blocked: list[str], blocker: str,
                 expected: tuple[float, float]) -> Finding:
        """``gradients.vanishing`` when the first layers get no gradient at all (exactly 0)."""
        layers = (self._label(blocked[0]) if len(blocked) == 1 else
                  f"{len(blocked)} layers, {self._label(blocked[0])} to {self._label(blocked[-1])}")
        dead = self.last[blocker]["dead_fraction"]
        why = ("every one of its units is dead (zero on every sample of the batch), so it "
               "passes no gradient back" if dead == 1.0 else
               f"it passes no gradient back although {1 - dead:.0%} of its units are alive: "
               "look for a `detach()`, an integer cast or a non-differentiable operation there")
        advice = ("A dead layer blocks every gradient below it: lower the learning rate (a too "
                  "large step is the usual way ReLUs die), check the initialization and biases, "
                  "or use LeakyReLU; restart from a checkpoint from before it died."
                  if dead == 1.0 else "Make the path from the loss to these layers "
                  "differentiable: remove the `detach()` or `.data` use, or the cast.")
        return self._warn(trainer, "gradients.vanishing", "", 0.0,
            f"No gradient reaches {layers}: their gradient is exactly 0, so they cannot learn. "
            f"{self._label(blocker)} blocks it: {why}.", advice, expected,
            blocked=blocked, blocker=blocker)

    def _warn(self, trainer: pl.Trainer, code: str, layer: str, value: float, message: str,
              advice: str, expected: tuple[float, float], **details: Any) -> Finding:
        return self.finding(trainer, code, Severity.WARN, message, advice=advice,
                            step=self._event_step, epoch=self._event_epoch,
                            value=float(value), expected=expected,
                            subject=layer,
                            details={"layer": layer, **details} if layer else details)

    def _summary(self, trainer: pl.Trainer) -> Finding:
        """The INFO verdict ``activations.summary`` at the end of training."""
        if not self._logs:
            return self.finding(trainer, f"{self.slug}.summary", Severity.INFO,
                                "Activations: no logging step ran in this fit (no optimizer "
                                "step), nothing was measured.")
        dead, dead_at, dead_step = self._worst.get("dead_fraction", (0.0, "", 0))
        parts = [f"Activations over {self._logs} logging step(s) (every {self.every_n_steps} "
                 f"steps): worst dead fraction {dead:.0%}"
                 + (f" at {self._label(dead_at)}, step {dead_step}" if dead_at else "")
                 + f" (expected <= {self.dead_fraction:.0%})"]
        if "saturated_fraction" in self._worst:
            sat, sat_at, sat_step = self._worst["saturated_fraction"]
            parts.append(f"largest saturated fraction {sat:.0%} at {self._label(sat_at)}, step "
                         f"{sat_step} (expected <= {self.saturated_fraction:.0%})")
        else:
            parts.append("no bounded layer (tanh, sigmoid, hardtanh) to saturate")
        if not math.isnan(self._ratio):
            parts.append(f"first/last-layer gradient RMS ratio {self._ratio:.3g} at the last "
                         f"logging step (expected within ({self.vanishing_ratio:g}, "
                         f"{self.exploding_ratio:g}))")
        return self.finding(trainer, f"{self.slug}.summary", Severity.INFO,
                            "; ".join(parts) + ".", value=dead, expected=(0.0, self.dead_fraction),
                            details={"worst": {k: list(v) for k, v in self._worst.items()},
                                     "gradient_ratio": self._ratio, "logging_steps": self._logs})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.last, self._logs, self._logged_step, self._event_step = {}, 0, -1, -1
            self.layer_types, self._parametric = {}, set()
            self._worst, self._ratio = {}, math.nan

    @override
    def _release(self) -> None:
        super()._release()
        self._act, self._grad, self._numel, self._order, self._seen = {}, {}, {}, [], set()
        self._copies, self._copied = {}, 0
        self._worker.close()  # what was queued is still written; a job's error is reported

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"logs": self._logs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logs = int(state_dict.get("logs", 0))

"""Per-layer activation and gradient histograms and statistics (step 5.3 of the recipe).

The rules (which layers, dead units, saturation, vanishing and exploding gradients, the summary)
are in :mod:`lightning_diag.checks.activations`; this callback measures on the logging steps and
writes to TensorBoard.

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

from lightning_diag.callbacks._monitor import MonitorCallback
from lightning_diag.checks.activations import (
    MAX_BINS,
    MIN_SAMPLES,
    PASS_THROUGH,
    ActivationConfig,
    LayerFilter,
    activation_bounds,
    activation_summary,
    activation_verdicts,
    chosen_layers,
    gradient_ratio,
    worst_readings,
)
from lightning_diag.functional.monitors import (
    HIST_HEADER,
    STAT_NAMES,
    layer_summary,
    parse_summary_row,
    pool_batches,
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
from lightning_diag.validation import from_arguments

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["COPY_BUDGET", "MAX_BINS", "PASS_THROUGH", "ActivationHistogram"]

#: Values copied per logging step for the worker to count on CPU (64 MiB of float32); layers
#: past it are counted on the training thread, as on an accelerator. At most two steps' copies
#: wait for the worker.
COPY_BUDGET = 2**24

#: CPU copies (and bounds) of ("act" | "grad", layer) for the worker.
_Copies = dict[tuple[str, str], tuple[torch.Tensor, Any]]


class _Event(NamedTuple):
    """A logging step: its global step and epoch, its number among the fit's logging steps
    (from 1), each hooked layer's name in the tags (its module type added), and the samples
    and batches it measured."""

    step: int
    epoch: int
    number: int
    typed: dict[str, str]
    samples: tuple[int, int]


def _loss_scale(trainer: pl.Trainer) -> torch.Tensor | float:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    scale = getattr(scaler, "_scale", None)  # a device tensor: reading it does not sync
    return scale if isinstance(scale, torch.Tensor) else float(scaler.get_scale())


class ActivationHistogram(MonitorCallback):
    """Histograms and statistics of each layer's activations and of the gradients into them.

    On the logging steps of the monitors' one schedule (``docs/callbacks/schedule.md``):
    optimizer step 0 and every ``every_n_steps``-th step (training only), forward hooks on
    the chosen layers compute, on the tensors' device and in one fused pass per tensor
    (:func:`~lightning_diag.functional.monitors.layer_summary`): mean, std, zero fraction, dead
    fraction (units zero on every sample measured), saturated fraction (bounded activations: tanh,
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
        bins: Histogram bins, at most ``MAX_BINS`` (256: TensorBoard's histogram cards show 30).
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
        early_steps: Also log steps 1, 2, 4, ... below ``every_n_steps`` (default False: a
            logging step here costs ~10x one of ``UpdateRatioMonitor``).
        min_samples: Keyword-only. A logging step measures at least this many samples (default
            32): on smaller batches it keeps its hooks over the next batches and pools them
            (``docs/callbacks/schedule.md``), so that one sample does not make a unit dead.

    Example:
        >>> cb = ActivationHistogram(every_n_steps=100, layers=["net.1", "net.3"])
    """

    slug = "activations"
    config_type = ActivationConfig
    config: ActivationConfig

    def __init__(self, every_n_steps: int = 200, layers: Sequence[str] | LayerFilter | None = None,
                 bins: int = 64, dead_fraction: float = 0.5, saturated_fraction: float = 0.5,
                 vanishing_ratio: float = 1e-3, exploding_ratio: float = 1e3,
                 figure_every_n_logs: int = 0, log_charts: bool = True,
                 strict: bool = False, *, early_steps: bool = False,
                 min_samples: int = MIN_SAMPLES) -> None:
        super().__init__(from_arguments(ActivationConfig, locals()), strict=strict)
        self.last: dict[str, dict[str, Any]] = {}
        #: The module type of each hooked layer (``"net.3"`` -> ``"Conv2d"``), to name it.
        self.layer_types: dict[str, str] = {}
        self._parametric: set[str] = set()  # layers with weights of their own
        self._worst: dict[str, tuple[float, str, int]] = {}  # stat -> (value, layer, step)
        self._ratio = math.nan  # first/last-layer gradient RMS at the last logging step
        self._logs = 0
        self._act: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}
        self._numel: dict[str, int] = {}
        self._charts = False  # histograms wanted at this logging step (a TensorBoard writer)
        self._copies: _Copies = {}
        self._copied = 0  # values in `_copies`
        self._order: list[str] = []  # the layers hooked at this logging step, in forward order
        self._seen: set[str] = set()  # the layers measured in this batch
        #: A window's captures, (kind, layer) -> (copies of each batch, bounds): a logging step
        #: on fewer than ``min_samples`` samples goes on over the next batches.
        self._parts: dict[tuple[str, str], tuple[list[torch.Tensor], Any]] = {}
        self._windowed = False
        self._event_step = self._event_epoch = -1  # the logging step `last` measured
        self._worker = EventWorker(depth=2)
        self._queued = 0  # logging steps handed to the worker, not yet applied

    def _chosen(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        return chosen_layers(pl_module, self.config.layers)

    @override
    def _arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forward hooks on the chosen layers, for this training batch only (and the next ones
        while fewer than ``min_samples`` samples were seen: a window)."""
        self._charts = self.config.log_charts and tensorboard_writer(trainer) is not None
        self._windowed = self.seen_samples < self.config.min_samples
        scale_grads = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        for name, module in self._chosen(pl_module):
            self.layer_types[name] = type(module).__name__
            if next(module.parameters(recurse=False), None) is not None:
                self._parametric.add(name)
            self.hooks.forward(module, self._forward_hook(
                trainer, name, activation_bounds(module), scale_grads))

    def _forward_hook(self, trainer: pl.Trainer, name: str, bounds: tuple[float, float] | None,
                      accumulation: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or name in self._seen or not trainer.training:
                return
            self._seen.add(name)
            if name not in self._order:
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
        :data:`COPY_BUDGET` values are copied per logging step; the rest is summarized here.
        In a window, every batch's ``x`` is copied, to be pooled when the window closes."""
        if self._windowed:
            self._parts.setdefault((kind, name), ([], bounds))[0].append(x.detach().clone())
            return
        self._keep(kind, name, x, bounds, copy=True)

    def _keep(self, kind: str, name: str, x: torch.Tensor, bounds: tuple[float, float] | None,
              copy: bool = False) -> None:
        """``x`` to the worker's copies (copied first with ``copy``) or summarized now."""
        if self._charts and x.device.type == "cpu" and self._copied + x.numel() <= COPY_BUDGET:
            self._copies[(kind, name)] = (x.detach().clone() if copy else x, bounds)
            self._copied += x.numel()
            return
        rows = self._act if kind == "act" else self._grad
        rows[name] = layer_summary(x, bounds, self.config.bins, lean=not self.config.log_charts,
                                   histogram=self._charts)

    @override
    def _poll(self, trainer: pl.Trainer) -> None:
        self._collect(trainer)

    @override
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """The hooked batch is over: hooks off, and the step's rows to the worker (on CPU with
        TensorBoard) or stacked, copied to the host and judged here. In a window that has not
        seen ``min_samples`` samples yet the hooks stay for the next batch; once it has, each
        layer's batches are pooled (:func:`~lightning_diag.functional.monitors.pool_batches`)
        and measured as one batch of them."""
        if self._windowed and self.seen_samples < self.config.min_samples:
            self._seen, self._numel = set(), {}  # the next batch is measured as well
            return False
        self._complete(trainer)
        return True

    def _complete(self, trainer: pl.Trainer) -> None:
        """Measure the logging step (its window's batches pooled) and hand it on."""
        if self._windowed:
            self._windowed = False
            for (kind, name), (parts, bounds) in self._parts.items():
                pooled = pool_batches(parts)
                if kind == "grad":
                    self._numel[name] = pooled.numel()
                self._keep(kind, name, pooled, bounds)
            self._parts = {}
        self.hooks.remove_all()
        order, acts, grads = self._order, self._act, self._grad
        numel, copies = self._numel, self._copies
        self._abandon()
        if not order:
            return
        self._logs += 1
        event = _Event(self.logging_step, trainer.current_epoch, self._logs,
                       {n: typed_layer(n, self.layer_types[n]) for n in order},
                       (self.seen_samples, self.seen_batches))
        if copies:  # there is a TensorBoard writer (`_charts`): the worker finishes the step
            self._queued += 1
            self._worker.submit(functools.partial(
                self._summarize, event, tensorboard_writer(trainer), order, acts, grads, numel,
                copies))
        else:
            self._apply(trainer, event, self._rows(order, acts, grads, numel, {}), None)

    def _rows(self, order: list[str], acts: dict[str, torch.Tensor],
              grads: dict[str, torch.Tensor], numel: dict[str, int], copies: _Copies
              ) -> dict[str, dict[str, Any]]:
        """Each layer's parsed statistics and histograms, from one host copy of all rows."""
        bins = self.config.bins
        for (kind, name), (x, bounds) in copies.items():
            (acts if kind == "act" else grads)[name] = layer_summary(x, bounds, bins)
        width = len(STAT_NAMES) + len(HIST_HEADER) + bins
        device = acts[order[0]].device
        empty = torch.full((width,), math.nan, device=device)
        rows = torch.stack([torch.cat([acts[n].to(device), grads.get(n, empty).to(device)])
                            for n in order]).cpu()  # the one host sync
        return {name: parse_summary_row(row.tolist(), name in grads, numel.get(name, 0))
                for name, row in zip(order, rows, strict=True)}

    def _summarize(self, event: _Event, writer: SummaryWriter | None, order: list[str],
                   acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                   numel: dict[str, int], copies: _Copies
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
            self._queued -= 1
            self._apply(trainer, event, last, scalars)

    @override
    def _waiting(self) -> bool:
        return self._queued > 0

    @override
    def _keeps_measuring(self) -> bool:
        return self._windowed  # the next optimizer steps' batches join the window

    def _apply(self, trainer: pl.Trainer, event: _Event, last: dict[str, dict[str, Any]],
               scalars: dict[str, float] | None) -> None:
        """A measured logging step: its charts (unless the worker wrote them) and findings."""
        self.last, self._event_step, self._event_epoch = last, event.step, event.epoch
        if self.config.log_charts:
            self._log(trainer, event, scalars)
        if event.samples[0] >= self.config.min_samples:  # else a window cut short by the end
            self._worst = worst_readings(self._worst, last, event.step)
            self._ratio = gradient_ratio(last)
        self.publish_verdicts(
            trainer, activation_verdicts(last, self._parametric, self.config, self.layer_types,
                                         event.samples),
            step=event.step, epoch=event.epoch)

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
        n = self.config.figure_every_n_logs
        if n and event.number % n == 0:
            self._figure(trainer)

    def _figure(self, trainer: pl.Trainer) -> None:
        labelled = {layer_label(n, self.layer_types[n]): s for n, s in self.last.items()}
        log_figure(trainer, ACTIVATIONS_SUMMARY,
                   layer_summary_figure(labelled, self.config.bins), self._event_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._armed and self._windowed:  # training ended inside a window: what it has
            self._complete(trainer)
        self._collect(trainer, wait=True)  # every logging step applied and written
        self.publish_verdicts(trainer, [activation_summary(
            self._logs, self._worst, self._ratio, self.config, self.layer_types)])
        n = self.config.figure_every_n_logs
        drawn = n and self._logs % n == 0
        if (self.config.log_charts and self.last and not drawn
                and self.require_tensorboard(trainer, "summary figure")):
            self._figure(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._collect(trainer, wait=True)  # the steps measured before the error still count
        super().on_exception(trainer, pl_module, exception)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.last, self._logs, self._event_step = {}, 0, -1
            self.layer_types, self._parametric = {}, set()
            self._worst, self._ratio = {}, math.nan

    @override
    def _abandon(self) -> None:
        super()._abandon()
        self._act, self._grad, self._numel, self._order, self._seen = {}, {}, {}, [], set()
        self._copies, self._copied, self._parts, self._windowed = {}, 0, {}, False

    @override
    def _release(self) -> None:
        super()._release()
        try:
            self._worker.close()  # what was queued is still written; a job's error is reported
        finally:
            self._queued = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"logs": self._logs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logs = int(state_dict.get("logs", 0))

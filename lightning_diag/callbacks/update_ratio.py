"""The ratio of each weight update to the weight, ``||dw|| / ||w||`` (step 5.5 of the recipe).

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
    >>> trainer = pl.Trainer(callbacks=[UpdateRatioMonitor(every_n_steps=50)], logger=False)
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag.callbacks._monitor import MonitorCallback
from lightning_diag.checks.update_ratio import (
    GUIDE,
    MIN_SAMPLES,
    RatioReading,
    UpdateRatioConfig,
    new_streak,
    ratio_summary,
    ratio_verdicts,
    read_ratios,
)
from lightning_diag.functional.monitors import update_ratios
from lightning_diag.tensorboard.tags import (
    GUIDE_RUN,
    UPDATE_RATIO_MEDIAN,
    typed_layer,
    update_ratio_layer,
    update_ratio_layout,
)
from lightning_diag.tensorboard.writer import (
    SiblingRuns,
    log_scalars,
    merge_custom_scalars,
    tensorboard_writer,
)
from lightning_diag.validation import from_arguments

__all__ = ["UpdateRatioMonitor"]

#: One optimizer's part of a logging step: parameter names, the parameters, their copies
#: before the step, and their gradient norms.
_Pending = tuple[list[str], list[torch.Tensor], list[torch.Tensor], torch.Tensor]


class UpdateRatioMonitor(MonitorCallback):
    """Per-layer ``||w_after - w_before|| / ||w_before||``, once every ``every_n_steps`` steps.

    On a logging step the weights of each optimizer that steps are copied (one foreach copy) in
    ``on_before_optimizer_step`` and compared after the step in ``on_train_batch_end``, so a
    step counts once however many micro-batches gradient accumulation has; nothing is kept
    between logging steps. TensorBoard gets the log10 of the ratio, the recipe's own plot (a
    healthy value is about -3; ``-inf``: the weight did not move): each weight tensor (2 or more
    dimensions) under ``5.5_update_ratio/per_layer_log10/<name>`` (its layer's type in the
    name: ``net.1_Linear.weight``) and their median under
    ``5.5_update_ratio/median_log10``, each with a line at -3 drawn by the same tag in the
    sibling run ``healthy_1e-3``; a custom-scalars chart holds every tensor.

    Findings (WARN): ``update_ratio.too_low`` (median below ``low`` for ``patience`` logging
    steps), ``update_ratio.too_high`` (above ``high`` for ``patience`` steps, or once at
    ``extreme`` or non-finite), ``update_ratio.zero_updates`` (no weight moved for ``patience``
    steps: zero gradients, i.e. a dead network, or a zero learning rate; not a small one).

    Logging steps follow the monitors' one schedule (``docs/callbacks/schedule.md``): steps 0,
    ``every_n_steps``, 2 x ``every_n_steps``, ..., and here by default also 1, 2, 4, ... below
    it (``early_steps=True``: a divergence shows in the first steps).

    Args:
        every_n_steps: Measure on step 0 and every this many optimizer steps.
        low: Median ratio below which updates are too small (default 1e-5, 100x below 1e-3;
            SGD at lr 1e-6 gives ~4e-8 on the digits MLP).
        high: Median ratio above which updates are too large (default 0.2; healthy Adam 1e-3
            gives 2e-3 to 2e-2 and SGD 0.1 with momentum up to 6e-2 on the digits MLP).
        extreme: A single median reading at or above this is flagged at once (an update as
            large as the weight).
        patience: Consecutive logging steps outside the band before a finding.
        log_charts: Write the ratios to TensorBoard. False: the findings only (they still reach
            the findings table); the search's trials run so.
        strict: Raise on FAIL findings (these findings are WARN).
        early_steps: Also measure steps 1, 2, 4, ... below ``every_n_steps``.
        min_samples: Keyword-only. Weights that did not move at all on a logging step of fewer
            samples (default 32) are measured again over the next steps, against the same
            copies, until that many samples were seen: ``zero_updates`` needs them still over
            all of them (one sample beyond a hinge's margin moves nothing).

    Example:
        >>> cb = UpdateRatioMonitor(every_n_steps=10, patience=2)
    """

    slug = "update_ratio"
    config_type = UpdateRatioConfig
    config: UpdateRatioConfig

    def __init__(self, every_n_steps: int = 100, low: float = 1e-5, high: float = 0.2,
                 extreme: float = 1.0, patience: int = 3, log_charts: bool = True,
                 strict: bool = False, *, early_steps: bool = True,
                 min_samples: int = MIN_SAMPLES) -> None:
        super().__init__(from_arguments(UpdateRatioConfig, locals()), strict=strict)
        self.streak = new_streak()
        self.medians: list[tuple[int, float]] = []  # (step, median ratio) of this fit
        self.last: dict[str, float] = {}
        #: Each parameter as its tags name it, with its layer's type (``net.1_Linear.weight``).
        self.tag_names: dict[str, str] = {}
        self._pending: list[_Pending] = []
        self._optimizers: list[int] = []  # id() of the optimizer of each pending entry
        self._first: RatioReading | None = None  # the logging step's ratios, in a window
        self._window_grads: dict[int, torch.Tensor] = {}  # summed squared gradient norms
        self._runs = SiblingRuns()

    @override
    def _optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                        optimizer: torch.optim.Optimizer) -> None:
        """Copy the weights of ``optimizer`` (one foreach op) and note their gradient norms;
        on the later steps of a window, only add up the gradient norms."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params:
            return
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        gnorm = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        if self._first is not None:  # a window: the weights were copied at its first step
            grads_so_far = self._window_grads.get(id(optimizer), 0)
            self._window_grads[id(optimizer)] = grads_so_far + gnorm ** 2
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        snapshot = list(torch._foreach_mul([p.detach() for p in params], 1.0))
        labels = [names.get(id(p), f"optimizer_param_{i}") for i, p in enumerate(params)]
        for name in names.values():
            if name not in self.tag_names:
                layer, _, leaf = name.rpartition(".")
                self.tag_names[name] = typed_layer(
                    layer, type(pl_module.get_submodule(layer)).__name__, leaf)
        self._pending.append((labels, params, snapshot, gnorm))
        self._optimizers.append(id(optimizer))

    @override
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """After the step: the ratios of every optimizer that stepped (none yet: an accumulating
        micro-batch, the step is still pending). A weight that did not move at all on fewer
        than ``min_samples`` samples is measured again over the next steps (a window) before
        the step is judged."""
        if not self._pending:
            return False
        if self._first is None:  # the logging step itself
            reading = self._read(self._pending, squared=False)
            if reading.median == 0.0 and self.seen_samples < self.config.min_samples:
                self._first = reading  # too few samples to call a weight still: a window
                return False
            self._judge(trainer, reading, None)
        elif self.seen_samples < self.config.min_samples:
            return False
        else:  # the window is complete: which weights moved at all since its first step
            window = [(labels, params, snap, gnorm ** 2 + self._window_grads.get(opt, 0))
                      for (labels, params, snap, gnorm), opt
                      in zip(self._pending, self._optimizers, strict=True)]
            self._judge(trainer, self._first, self._read(window, squared=True))
        self._abandon()
        return True

    def _read(self, pending: list[_Pending], squared: bool) -> RatioReading:
        """The ratios of ``pending`` (the weights now against their copies), one host sync;
        its gradient norms are ``squared`` sums over a window's steps, or norms."""
        device = pending[0][2][0].device
        parts = [update_ratios(snap, params).to(device) for _, params, snap, _ in pending]
        parts += [g.to(device) for *_, g in pending]
        values = torch.cat(parts).cpu().tolist()  # the one host sync
        labels = [n for names, *_ in pending for n in names]
        dims = [p.dim() for _, params, *_ in pending for p in params]
        norms = [math.sqrt(v) if squared else v for v in values[len(labels):]]
        return read_ratios(labels, dims, values[:len(labels)], norms)

    def _judge(self, trainer: pl.Trainer, reading: RatioReading,
               window: RatioReading | None, judged: bool = True) -> None:
        """Log and judge a logging step: its ratios, and over a window (None: none was
        needed) which weights moved at all; not ``judged``: logged only."""
        self.last = reading.last
        if self.config.log_charts:
            self._log(trainer, reading.median)
        self.medians.append((self.logging_step, reading.median))
        if not judged:
            return
        samples = (self.seen_samples, self.seen_batches)
        self.streak, verdicts = ratio_verdicts(self.streak, reading, self.config, window,
                                               samples)
        self.publish(trainer, [self.verdict_finding(trainer, v, step=self.logging_step)
                               for v in verdicts])

    def _log(self, trainer: pl.Trainer, median: float) -> None:
        step = self.logging_step
        scalars = {update_ratio_layer(self.tag_names.get(n, n)): _log10(v)
                   for n, v in self.last.items()}
        scalars[UPDATE_RATIO_MEDIAN] = _log10(median)
        log_scalars(trainer, scalars, step)
        self._runs.log(trainer, {GUIDE_RUN: dict.fromkeys(scalars, math.log10(GUIDE))}, step)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            merge_custom_scalars(writer, *update_ratio_layout())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.streak, self.last, self.medians = new_streak(), {}, []
            self.tag_names = {}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._first is not None:  # training ended inside a window: too few samples to judge
            self._judge(trainer, self._first, None, judged=False)
            self._abandon()
        self.publish_verdicts(trainer, [ratio_summary(self.medians, self.config)])

    @override
    def _keeps_measuring(self) -> bool:
        return self._first is not None  # a window: the next steps' batches count

    @override
    def _abandon(self) -> None:
        super()._abandon()
        self._pending, self._optimizers = [], []  # the weight copies of a pending step
        self._first, self._window_grads = None, {}

    @override
    def _release(self) -> None:
        super()._release()
        self._runs.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"streak": dict(self.streak)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.streak.update({k: int(v) for k, v in state_dict.get("streak", {}).items()
                            if k in self.streak})


def _log10(ratio: float) -> float:
    """log10 of an update ratio: ``-inf`` for a weight that did not move, NaN kept.

    Example:
        >>> _log10(1e-3), _log10(0.0)
        (-3.0, -inf)
    """
    return math.log10(ratio) if ratio > 0 else -math.inf if ratio == 0 else math.nan

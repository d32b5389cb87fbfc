"""The ratio of each weight update to the weight, ``||dw|| / ||w||`` (step 5.5 of the recipe).

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
    >>> trainer = pl.Trainer(callbacks=[UpdateRatioMonitor(every_n_steps=50)], logger=False)
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag.base import DiagnosticCallback
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.monitors import is_logging_step, update_ratios
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
from lightning_diag.validation import check_flag, check_int, check_number, require

__all__ = ["UpdateRatioMonitor"]

GUIDE = 1e-3
_CODES = ("too_low", "too_high", "zero_updates")


class UpdateRatioMonitor(DiagnosticCallback):
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

    Args:
        every_n_steps: Measure every this many optimizer steps, plus steps 0, 1, 2, 4, ... below
            it (early divergence shows there).
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

    Example:
        >>> cb = UpdateRatioMonitor(every_n_steps=10, patience=2)
    """

    slug = "update_ratio"

    def __init__(self, every_n_steps: int = 100, low: float = 1e-5, high: float = 0.2,
                 extreme: float = 1.0, patience: int = 3, log_charts: bool = True,
                 strict: bool = False) -> None:
        super().__init__(strict=strict)
        check_int("every_n_steps", every_n_steps)
        for name, value in (("low", low), ("high", high), ("extreme", extreme)):
            check_number(name, value, low=0, low_open=True)
        require(high > low, "high", high, f"a number > `low` ({low!r})")
        require(extreme >= high, "extreme", extreme, f"a number >= `high` ({high!r})")
        check_int("patience", patience)
        check_flag("log_charts", log_charts)
        self.every_n_steps, self.patience, self.log_charts = every_n_steps, patience, log_charts
        self.low, self.high, self.extreme = float(low), float(high), float(extreme)
        self.streak = dict.fromkeys(_CODES, 0)
        self.medians: list[tuple[int, float]] = []  # (step, median ratio) of this fit
        self.last: dict[str, float] = {}
        #: Each parameter as its tags name it, with its layer's type (``net.1_Linear.weight``).
        self.tag_names: dict[str, str] = {}
        self._armed = False
        self._step = 0
        self._pending: list[tuple[list[str], list[torch.Tensor], list[torch.Tensor],
                                  torch.Tensor]] = []
        self._runs = SiblingRuns()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, low=self.low,
                                        high=self.high, extreme=self.extreme,
                                        patience=self.patience)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._armed = is_logging_step(trainer.global_step, self.every_n_steps)
        if self._armed and not self._pending:
            self._step = trainer.global_step

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._armed:
            self._snapshot(pl_module, optimizer)

    def _snapshot(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not params:
            return
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        gnorm = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        snapshot = list(torch._foreach_mul([p.detach() for p in params], 1.0))
        labels = [names.get(id(p), f"optimizer_param_{i}") for i, p in enumerate(params)]
        for name in names.values():
            if name not in self.tag_names:
                layer, _, leaf = name.rpartition(".")
                self.tag_names[name] = typed_layer(
                    layer, type(pl_module.get_submodule(layer)).__name__, leaf)
        self._pending.append((labels, params, snapshot, gnorm))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending:
            self._measure(trainer)

    def _measure(self, trainer: pl.Trainer) -> None:
        pending, self._pending, self._armed = self._pending, [], False
        device = pending[0][2][0].device
        parts = [update_ratios(snap, params).to(device) for _, params, snap, _ in pending]
        parts += [g.to(device) for *_, g in pending]
        values = torch.cat(parts).cpu().tolist()  # the one host sync
        labels = [n for names, *_ in pending for n in names]
        shapes = [p.dim() for _, params, *_ in pending for p in params]
        weights = [i for i, d in enumerate(shapes) if d >= 2] or list(range(len(labels)))
        still = [i for i in weights if values[i] == 0.0]
        grad_norm = math.sqrt(sum(values[len(labels) + i] ** 2 for i in still))
        self.last = {labels[i]: values[i] for i in weights}
        finite = [v for v in self.last.values() if math.isfinite(v)]
        median = statistics.median(finite) if finite else math.nan
        if any(math.isnan(v) for v in self.last.values()):
            median = math.nan
        if self.log_charts:
            self._log(trainer, median)
        self.medians.append((self._step, median))
        self.publish(trainer, self._check(trainer, median, len(still), grad_norm))

    def _log(self, trainer: pl.Trainer, median: float) -> None:
        step = self._step
        scalars = {update_ratio_layer(self.tag_names.get(n, n)): _log10(v)
                   for n, v in self.last.items()}
        scalars[UPDATE_RATIO_MEDIAN] = _log10(median)
        log_scalars(trainer, scalars, step)
        self._runs.log(trainer, {GUIDE_RUN: dict.fromkeys(scalars, math.log10(GUIDE))}, step)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            merge_custom_scalars(writer, *update_ratio_layout())

    def _check(self, trainer: pl.Trainer, median: float, still: int,
               grad_norm: float) -> list[Finding]:
        zero = median == 0.0  # most weight tensors did not move at all
        state = {"zero_updates": zero, "too_low": not zero and median < self.low,
                 "too_high": math.isnan(median) or median > self.high}
        for code in _CODES:
            self.streak[code] = self.streak[code] + 1 if state[code] else 0
        extreme = math.isnan(median) or median >= self.extreme
        out = []
        if self.streak["zero_updates"] == self.patience:
            cause = ("their gradients are zero: the network is dead (e.g. its ReLUs died after a "
                     "divergence) or the loss does not depend on those weights" if grad_norm == 0
                     else f"their gradients are non-zero (norm {grad_norm:.3g}) but the "
                     "optimizer did not move them: learning rate 0 or skipped steps")
            out.append(self._finding(trainer, "zero_updates", 0.0,
                f"{still} of {len(self.last)} weight tensors did not change at all in "
                f"{self.patience} logged optimizer steps: {cause}. This is not a learning "
                "rate that is merely too low.",
                "If the loss diverged earlier, restart with a lower learning rate; check that "
                "the loss is connected to the parameters and the learning-rate schedule."))
        if self.streak["too_low"] == self.patience:
            out.append(self._finding(trainer, "too_low", median,
                f"Median update ratio ||dw||/||w|| is {median:.3g} for {self.patience} logged "
                f"steps, below {self.low:g} (healthy: around {GUIDE:g}).",
                "The learning rate is probably too low: raise it (try 10x)."))
        if (extreme and self.streak["too_high"] == 1) or self.streak["too_high"] == self.patience:
            what = ("a single update as large as the weights" if extreme
                    else f"for {self.patience} logged steps")
            out.append(self._finding(trainer, "too_high", median,
                f"Median update ratio ||dw||/||w|| is {median:.3g} ({what}), above "
                f"{self.high:g} (healthy: around {GUIDE:g}).",
                "The learning rate is probably too high: lower it (try 10x), or clip gradients."))
        return out

    def _finding(self, trainer: pl.Trainer, code: str, value: float, message: str,
                 advice: str) -> Finding:
        return self.finding(trainer, f"{self.slug}.{code}", Severity.WARN, message, advice=advice,
                            value=value, step=self._step, expected=(self.low, self.high),
                            details={"ratios": dict(self.last)})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.streak, self.last, self.medians = dict.fromkeys(_CODES, 0), {}, []
            self.tag_names = {}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish(trainer, [self._summary(trainer)])

    def _summary(self, trainer: pl.Trainer) -> Finding:
        """The INFO verdict ``update_ratio.summary``: the median ratio over the run vs 1e-3."""
        finite = [(m, s) for s, m in self.medians if math.isfinite(m)]
        code = f"{self.slug}.summary"
        if not finite:
            what = (f"all {len(self.medians)} measured steps gave a non-finite ratio"
                    if self.medians else "no logging step ran in this fit")
            return self.finding(trainer, code, Severity.INFO, f"Update ratios: {what}.")
        run = statistics.median(m for m, _ in finite)
        (low, low_at), (high, high_at) = min(finite), max(finite)
        skipped = len(self.medians) - len(finite)
        return self.finding(
            trainer, code, Severity.INFO,
            f"Median update ratio ||dw||/||w|| over {len(finite)} logged step(s): {run:.3g}, "
            f"{run / GUIDE:.3g}x the recipe's guide of about {GUIDE:g} (flagged outside "
            f"[{self.low:g}, {self.high:g}]); per step from {low:.3g} (step {low_at}) to "
            f"{high:.3g} (step {high_at})"
            + (f"; {skipped} non-finite step(s) left out" if skipped else "") + ".",
            value=run, expected=(self.low, self.high),
            details={"medians": [[s, m] for s, m in self.medians], "guide": GUIDE})

    @override
    def _release(self) -> None:
        super()._release()
        self._pending, self._armed = [], False  # the weight snapshots of a pending step
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

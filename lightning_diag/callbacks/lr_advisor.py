"""Recipe step 6.4: read the curves, say what to change (LR decay, capacity, regularization).

The rules (arguments, epoch verdicts, step-loss rules, summary) are in
:mod:`lightning_diag.checks.advisor`; this callback records the curves and step losses.

Example:
    >>> from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
    >>> advisor = LRPlateauAdvisor(patience=3, act=False)
    >>> advisor.slug
    'advisor'
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag.base import findings as trainer_findings
from lightning_diag.batch import _batch_size, loss_from_output
from lightning_diag.callbacks._metric_keys import DESCRIPTIONS, ROLES, MetricKeys
from lightning_diag.callbacks._monitor import ConfiguredCallback
from lightning_diag.checks.advisor import (
    MIN_SAMPLES,
    AdvisorConfig,
    Curves,
    JumpWindow,
    Verdict,
    advice_for,
    advisor_summary,
    fit_gap_verdict,
    loss_floor,
    plateau_verdict,
    scale_lr,
    stall_verdict,
)
from lightning_diag.checks.divergence import data_link, describe_divergence
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.curves import jump_threshold
from lightning_diag.validation import from_arguments

__all__ = ["LRPlateauAdvisor"]


class LRPlateauAdvisor(ConfiguredCallback):
    """Reads epoch curves and step losses; reports plateaus, under/overfitting and divergences.

    Epoch checks run at ``on_train_epoch_end`` (epoch-end validation has already run then) on
    ``trainer.callback_metrics``. The train/val loss and accuracy are found among the logged
    names by the usual conventions (``val_loss``, ``val/loss``, ``valid_loss_epoch``,
    ``val/acc``, ...) unless given; one INFO finding ``advisor.keys`` says which names are read
    and which were not found. Divergence is checked on every training step's returned loss.

    Args:
        monitor: Loss curve watched for plateaus; default the validation loss when logged, else
            the training loss.
        train_loss_key, val_loss_key, train_acc_key, val_acc_key: Logged metric names
            (accuracies as fractions in [0, 1]); None (the default) finds each by convention.
            A given name is also read as ``<name>_epoch``.
        patience: Epochs without a relative improvement of ``min_rel_delta`` that make a plateau.
        min_rel_delta: Relative decrease of the best loss that counts as an improvement.
        high_fraction: A plateau matters while the best loss is still >= this fraction of the
            starting loss (the first step loss, else the first epoch value).
        act: Also scale every param group's learning rate by ``factor`` on a plateau.
        factor: LR multiplier used when ``act=True``. min_lr: floor for the scaled LR.
        min_epochs: Epochs before under/overfitting is judged.
        low_acc: Training accuracy below this is "low" (task-dependent; 0.9 suits digits).
        close_gap: Train-val gap at or below which the two are "too close": in accuracy
            points, or between the losses as a fraction of the start loss.
        overfit_gap: Train-val accuracy gap above which the run overfits on its own.
        rel_gap: With the validation curve stalled for ``patience`` epochs while the training
            loss falls, the run overfits when the gap is above ``close_gap`` and at least this
            share of the validation error (or, without accuracies, of the validation loss).
        halving_epochs: Underfitting needs the training loss to fall too slowly to halve in
            this many epochs (default 20: the recipe's longest refine run, step 6.3).
        jump_factor, min_jump_fraction: A step loss diverges when non-finite or above
            ``max(jump_factor * median, median + min_jump_fraction * start_loss)`` of the last
            ``window`` finite step losses (at most ``MAX_WINDOW``, 1000: the median is taken on
            every step); before ``min_history`` are known, the median is replaced by the start
            loss (the first finite step loss).
        save_batch: Save the offending batch with ``torch.save`` to the run's log directory.
        min_samples: Keyword-only. A jump is judged over at least this many samples (default
            32): consecutive step losses of smaller batches are pooled (their mean, weighted by
            samples) into groups, and ``jump_factor``, ``min_jump_fraction``, ``window`` and
            ``min_history`` then count groups; a batch of ``min_samples`` or more is a group on
            its own, as before. A non-finite loss is reported at once.
        stall_steps: Off by default (None). At this many finite step losses, a loss whose
            median over the last ``min_history`` steps has not fallen by ``min_rel_delta`` (of
            its size) below the median of the first ``min_history`` is reported (checked once
            per fit) as ``advisor.stalled``: nothing is being learnt (a learning rate far too
            low, a loss cut off from the weights, or a network that died). The
            diagnosis-guided search turns it on; a warm-up that holds the learning rate near 0
            that long would trip it.
        strict: Raise on FAIL findings (a non-finite loss).
    """

    slug = "advisor"
    config_type = AdvisorConfig
    config: AdvisorConfig

    def __init__(self, monitor: str | None = None, train_loss_key: str | None = None,
                 val_loss_key: str | None = None, train_acc_key: str | None = None,
                 val_acc_key: str | None = None, patience: int = 3, min_rel_delta: float = 0.01,
                 high_fraction: float = 0.2, act: bool = False, factor: float = 0.1,
                 min_lr: float = 0.0, min_epochs: int = 5, low_acc: float = 0.9,
                 close_gap: float = 0.02, overfit_gap: float = 0.1, rel_gap: float = 0.5,
                 halving_epochs: float = 20.0, jump_factor: float = 5.0,
                 min_jump_fraction: float = 0.5, window: int = 50, min_history: int = 10,
                 save_batch: bool = True, stall_steps: int | None = None,
                 strict: bool = False, *, min_samples: int = MIN_SAMPLES) -> None:
        super().__init__(from_arguments(AdvisorConfig, locals()), strict=strict)
        self._reset()

    @property
    def given(self) -> dict[str, str | None]:
        """The metric names given, by role (``train_loss``, ...; None: found by convention)."""
        return self.config.given

    @property
    def step_losses(self) -> deque[float]:
        """The group means a step loss is judged against (each step's loss when batches hold
        ``min_samples`` or more; see :class:`~lightning_diag.checks.advisor.JumpWindow`)."""
        return self.jumps.values

    def _reset(self) -> None:
        self.keys = MetricKeys(self.given)
        self._keys_said = False
        self.history: dict[str, list[float]] = {}
        c = self.config
        self.jumps = JumpWindow(c.window, c.min_history, c.min_samples)
        self.first_losses: list[float] = []  # the first `min_history` finite step losses
        self._recent: deque[float] = deque(maxlen=c.min_history)  # the last ones
        self._group: list[tuple[Any, int]] = []  # (batch, batch_idx) of the group being filled
        self.finite_steps = 0
        self.start_loss: float | None = None
        self.plateau_from = 0
        self.reported: set[str] = set()
        self._diverged = False  # "advisor.divergence" in `reported`: read on every step
        self.lr_changes: list[dict[str, Any]] = []
        self._batch_step = 0  # the step of the batch being judged
        self._next_step = 0  # the step of the next batch

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()  # a checkpoint restored after setup brings the history back

    # ---- per step: divergence -------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._next_step = trainer.global_step  # after a checkpoint was restored

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # A batch's step is the global step at its start, which is the one at the previous
        # batch's end: one hook a batch, not two (each costs ~5 us in Lightning's dispatch).
        self._batch_step, self._next_step = self._next_step, trainer.global_step
        try:
            loss = loss_from_output(outputs)
        except ValueError:  # manual optimization or a step that skipped the batch
            return
        # `item()`: a float without `detach()` (float() of a tensor that requires grad warns)
        self._check_step(trainer, float(loss.item()), batch, batch_idx)

    def _check_step(self, trainer: pl.Trainer, loss: float, batch: Any, batch_idx: int) -> None:
        """Judge one step loss (run on every step: the common path is a few comparisons and
        appends; the window's median is read only for a group mean above the threshold of its
        lower bound, :meth:`~lightning_diag.checks.advisor.JumpWindow.lower`, and the
        divergence's finding is built only when one is seen)."""
        c, jumps = self.config, self.jumps
        reported = self._diverged
        if not math.isfinite(loss):  # judged at once: one batch is enough to be non-finite
            if not reported:
                self._report(trainer, loss, jumps.reference(), [(batch, batch_idx)],
                             (_samples(batch, 0), 1))
            return
        if self.start_loss is None:
            self.start_loss = loss
        if not reported:
            self._group.append((batch, batch_idx))
        done = jumps.add(loss, _samples(batch, c.min_samples))
        if done is not None:
            mean = done[0]
            low = None if reported else jumps.lower()
            if low is not None and mean > jump_threshold(low, c.jump_factor, self._min_jump()):
                reference = jumps.reference()  # the exact threshold: the median's
                if reference is not None and mean > jump_threshold(
                        reference, c.jump_factor, self._min_jump()):
                    self._report(trainer, mean, reference, self._group, done[1:])
            jumps.push(mean)
            self._group.clear()  # a report keeps none of it
        finite = self.finite_steps = self.finite_steps + 1
        self._recent.append(loss)
        if len(self.first_losses) < c.min_history:
            self.first_losses.append(loss)
        if finite == c.stall_steps:
            self._check_stall(trainer)

    def _report(self, trainer: pl.Trainer, loss: float, reference: float | None,
                group: list[tuple[Any, int]], pooled: tuple[int, int]) -> None:
        self.reported.add("advisor.divergence")
        self._diverged = True
        self.publish(trainer, [self._divergence(trainer, loss, reference, group, pooled)])

    def _check_stall(self, trainer: pl.Trainer) -> None:
        """``advisor.stalled`` (:func:`~lightning_diag.checks.advisor.stall_verdict`), checked
        once, at the ``stall_steps``-th finite step loss."""
        verdict = stall_verdict(self.first_losses, self._recent, self.finite_steps,
                                self.config)
        if verdict is not None:
            self.reported.add(verdict.code)
            self.publish_verdicts(trainer, [verdict], step=self._batch_step)

    def _divergence(self, trainer: pl.Trainer, loss: float, reference: float | None,
                    group: list[tuple[Any, int]], pooled: tuple[int, int]) -> Finding:
        """The ``advisor.divergence`` finding of a non-finite step loss or of a group mean
        (``pooled``: its samples and batches; the group's batches in ``group``) that jumped
        above ``reference``."""
        median = math.nan if reference is None else reference
        message, indices, details = describe_divergence(
            trainer, loss, median, group, self._batch_step, self.config.save_batch, pooled)
        # The data inspection ran at fit start: its flagged samples are known by now.
        link, advice, linked = data_link(indices, trainer_findings(trainer))
        return self.finding(
            trainer, "advisor.divergence", Severity.WARN if math.isfinite(loss) else Severity.FAIL,
            f"{message} {link}", advice=advice, value=loss,
            expected=(0.0, jump_threshold(median, self.config.jump_factor, self._min_jump()))
            if reference is not None else None,
            step=self._batch_step, indices=indices, details={**details, **linked})

    def _min_jump(self) -> float:
        """The smallest jump that counts: ``min_jump_fraction`` of the first group's mean (the
        first step loss when batches hold ``min_samples``)."""
        return self.config.min_jump_fraction * abs(self.jumps.start or 0.0)

    # ---- per epoch: plateau, underfit, overfit --------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        new = self.record(trainer.callback_metrics)
        if new or not self._keys_said:  # on every rank: the same names everywhere
            self._keys_said = True
            self.publish(trainer, [self._keys_finding(trainer, list(new))])
        self.publish(trainer, self.assess(trainer))

    def record(self, metrics: Mapping[str, Any]) -> dict[str, str]:
        """Append this epoch's value of every metric read (and of ``monitor``, ``<monitor>_epoch``
        first) to history, under its logged name; return the roles whose name was found now."""
        new = self.keys.resolve(metrics)
        keys = sorted(set(self.keys.used.values()))
        monitor = self.config.monitor
        if monitor and monitor not in keys:
            keys.append(monitor)
        for key in keys:
            value = metrics.get(f"{key}_epoch", metrics.get(key))  # the epoch value first
            if value is not None:
                self.history.setdefault(key, []).append(float(value))
        return new

    def _keys_finding(self, trainer: pl.Trainer, roles: list[str]) -> Finding:
        missing = self.keys.missing_roles(ROLES)
        read = f"reads {self.keys.describe(roles)}" if roles else "found none of its metrics yet"
        given = self.given
        lacking = "; not logged under any common name: " + ", ".join(
            f"`{given[r]}` (given)" if given[r] else f"the {DESCRIPTIONS[r]}"
            for r in missing) if missing else ""
        return self.finding(
            trainer, "advisor.keys", Severity.INFO, f"The advisor {read}{lacking}.",
            advice="Plateaus need a loss, under/overfitting both accuracies; pass the names "
                   "you log (e.g. `val_acc_key='val/top1'`) if they are not found.",
            details={"keys": dict(self.keys.used), "missing": [given[r] or r for r in missing]},
            subject=",".join(roles))  # names found at another epoch are another fact

    def assess(self, trainer: pl.Trainer | None) -> list[Finding]:
        """The findings the current history supports (each verdict once, plateaus repeatable)."""
        out = [f for f in (self._plateau(trainer), self._fit_gap(trainer)) if f is not None]
        self.reported.update(f.code for f in out if f.code != "advisor.plateau")
        return out

    def _monitor_key(self) -> str:
        if self.config.monitor:
            return self.config.monitor
        val = self.keys.used.get("val_loss", "")
        return val if self.history.get(val) else self.keys.used.get("train_loss", "")

    def _plateau(self, trainer: pl.Trainer | None) -> Finding | None:
        c, key = self.config, self._monitor_key()
        curve = self.history.get(key, [])
        verdict = plateau_verdict(key, curve, self.plateau_from, self.start_loss, c.patience,
                                  c.min_rel_delta, c.high_fraction, self._floor(trainer))
        if verdict is None:
            return None
        self.plateau_from = len(curve) - 1
        if c.act and trainer is not None:
            changes, text = scale_lr(trainer.optimizers, c.factor, c.min_lr,
                                     trainer.current_epoch)
            self.lr_changes.extend(changes)
            verdict = verdict._replace(message=f"{verdict.message} {text}")
        return self._verdict_finding(trainer, verdict)

    def _fit_gap(self, trainer: pl.Trainer | None) -> Finding | None:
        curves = Curves(*(self.history.get(self.keys.used.get(role, ""), [])
                          for role in ("train_loss", "val_loss", "train_acc", "val_acc")))
        epochs = min(max(len(curves.train_loss), len(curves.train_acc)),
                     max(len(curves.val_loss), len(curves.val_acc)))
        if epochs < self.config.min_epochs:
            return None
        verdict = fit_gap_verdict(curves, self.config.gap_rule(self.start_loss,
                                                               self._floor(trainer)),
                                  self.reported)
        return None if verdict is None else self._verdict_finding(trainer, verdict)

    @staticmethod
    def _floor(trainer: pl.Trainer | None) -> float | None:
        """The loss's floor the overfit test measured in this run, if it ran (it runs at fit
        start: known by the first epoch's end)."""
        return None if trainer is None else loss_floor(trainer_findings(trainer))

    def _verdict_finding(self, trainer: pl.Trainer | None, verdict: Verdict) -> Finding:
        diverged = next((f for f in self.findings if f.code == "advisor.divergence"), None)
        advice = advice_for(verdict.code, None if diverged is None else diverged.step)
        return self.verdict_finding(trainer, verdict._replace(advice=advice))

    # ---- at the end: the verdict ----------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        key = self._monitor_key()
        plateaus = next((len(f.steps()) for f in self.findings if f.code == "advisor.plateau"), 0)
        self.publish_verdicts(trainer, [advisor_summary(
            key, self.history.get(key, []), self.plateau_from, plateaus, self.reported,
            len(self.lr_changes), self.config)])

    @override
    def state_dict(self) -> dict[str, Any]:
        # the group being filled is not saved: a resumed fit starts a new one
        return {"history": {k: list(v) for k, v in self.history.items()},
                "step_losses": list(self.step_losses), "start_loss": self.start_loss,
                "plateau_from": self.plateau_from, "reported": sorted(self.reported),
                "lr_changes": list(self.lr_changes), "first_losses": list(self.first_losses),
                "finite_steps": self.finite_steps, "recent": list(self._recent),
                "jump_start": self.jumps.start}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reset()
        self.history = {k: list(v) for k, v in state_dict.get("history", {}).items()}
        self.start_loss = state_dict.get("start_loss")
        losses = [float(v) for v in state_dict.get("step_losses", [])]
        self.jumps.load(losses, state_dict.get("jump_start", self.start_loss))
        # an older checkpoint kept no `recent`: its step losses were those
        self._recent.extend(state_dict.get("recent", losses[-self.config.min_history:]))
        self.plateau_from = int(state_dict.get("plateau_from", 0))
        self.reported = set(state_dict.get("reported", []))
        self._diverged = "advisor.divergence" in self.reported
        self.lr_changes = list(state_dict.get("lr_changes", []))
        self.first_losses = [float(v) for v in state_dict.get("first_losses", [])]
        self.finite_steps = int(state_dict.get("finite_steps", 0))


def _samples(batch: Any, unknown: int) -> int:
    """The samples of a training batch (its first dimension), ``unknown`` when none is found
    (judged as a batch of enough samples, as it always was)."""
    # read on every step: the usual ``(inputs, targets)`` batch without the general search
    first = batch[0] if type(batch) in (tuple, list) and batch else None
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return int(first.shape[0])
    size = _batch_size(batch)
    return unknown if size is None else size

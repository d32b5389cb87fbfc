"""Recipe step 6.4: read the curves, say what to change (LR decay, capacity, regularization).

Example:
    >>> from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
    >>> advisor = LRPlateauAdvisor(patience=3, act=False)
    >>> advisor.slug
    'advisor'
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag.base import DiagnosticCallback
from lightning_diag.base import findings as trainer_findings
from lightning_diag.batch import loss_from_output
from lightning_diag.callbacks._metric_keys import DESCRIPTIONS, ROLES, MetricKeys
from lightning_diag.checks.advisor import (
    Curves,
    GapRule,
    Verdict,
    fit_gap_verdict,
    plateau_verdict,
    scale_lr,
)
from lightning_diag.checks.divergence import data_link, describe_divergence
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.curves import is_jump, jump_threshold, plateau_length
from lightning_diag.validation import check_flag, check_int, check_number, check_str, require

__all__ = ["LRPlateauAdvisor"]

ADVICE = {
    "plateau": "Decay the learning rate (the loss plateaus while still high).",
    "underfit": "Underfitting: use a bigger model, train longer, perhaps raise the learning rate.",
    "overfit": "Overfitting: add weight decay or other regularization, or get more data.",
}
STALLED_ADVICE = ("Nothing is being learnt: raise the learning rate (try 10x; see the update "
                  "ratio, recipe 5.5), check that the loss depends on the weights (no `detach`, "
                  "an optimizer holding the model's parameters), and that the network did not "
                  "die (dead ReLUs after a divergence).")
#: The underfitting advice once the loss has diverged: a higher learning rate would contradict it.
UNDERFIT_AFTER_DIVERGENCE = ("Underfitting: use a bigger model or train longer; do not raise the "
                             "learning rate: the loss already diverged at step {step} with it.")


def _validate(**args: Any) -> None:
    """Check the arguments of LRPlateauAdvisor, given by name (see lightning_diag.validation)."""
    check_str("monitor", args["monitor"], optional=True)
    for name in ("train_loss_key", "val_loss_key", "train_acc_key", "val_acc_key"):
        check_str(name, args[name], optional=True)
    for name in ("patience", "min_epochs", "window", "min_history"):
        check_int(name, args[name])
    require(args["min_history"] <= args["window"], "min_history", args["min_history"],
            f"an int <= `window` ({args['window']}), the number of losses the median keeps")
    for name in ("min_rel_delta", "high_fraction", "low_acc", "close_gap", "overfit_gap",
                 "rel_gap"):
        check_number(name, args[name], low=0, high=1)
    check_number("halving_epochs", args["halving_epochs"], low=0, low_open=True)
    # a factor of 0 would stop training, one of 1 or more would not decay
    check_number("factor", args["factor"], low=0, high=1, low_open=True, high_open=True)
    check_number("min_lr", args["min_lr"], low=0)
    check_number("jump_factor", args["jump_factor"], low=1, low_open=True)
    check_number("min_jump_fraction", args["min_jump_fraction"], low=0)
    check_int("stall_steps", args["stall_steps"], optional=True)
    if args["stall_steps"] is not None:
        require(args["stall_steps"] >= 2 * args["min_history"], "stall_steps",
                args["stall_steps"], f"None or an int >= 2 * `min_history` "
                f"({2 * args['min_history']}): the first and the last `min_history` step losses "
                "are compared")
    check_flag("act", args["act"])
    check_flag("save_batch", args["save_batch"])


class LRPlateauAdvisor(DiagnosticCallback):
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
            ``window`` finite step losses; before ``min_history`` are known, the median is
            replaced by the start loss (the first finite step loss).
        save_batch: Save the offending batch with ``torch.save`` to the run's log directory.
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

    def __init__(self, monitor: str | None = None, train_loss_key: str | None = None,
                 val_loss_key: str | None = None, train_acc_key: str | None = None,
                 val_acc_key: str | None = None, patience: int = 3, min_rel_delta: float = 0.01,
                 high_fraction: float = 0.2, act: bool = False, factor: float = 0.1,
                 min_lr: float = 0.0, min_epochs: int = 5, low_acc: float = 0.9,
                 close_gap: float = 0.02, overfit_gap: float = 0.1, rel_gap: float = 0.5,
                 halving_epochs: float = 20.0, jump_factor: float = 5.0,
                 min_jump_fraction: float = 0.5, window: int = 50, min_history: int = 10,
                 save_batch: bool = True, stall_steps: int | None = None,
                 strict: bool = False) -> None:
        super().__init__(strict=strict)
        _validate(monitor=monitor, train_loss_key=train_loss_key, val_loss_key=val_loss_key,
                  train_acc_key=train_acc_key, val_acc_key=val_acc_key, patience=patience,
                  min_rel_delta=min_rel_delta, high_fraction=high_fraction, act=act,
                  factor=factor, min_lr=min_lr, min_epochs=min_epochs, low_acc=low_acc,
                  close_gap=close_gap, overfit_gap=overfit_gap, rel_gap=rel_gap,
                  halving_epochs=halving_epochs, jump_factor=jump_factor,
                  min_jump_fraction=min_jump_fraction, window=window, min_history=min_history,
                  save_batch=save_batch, stall_steps=stall_steps)
        self.monitor, self.act, self.save_batch = monitor, act, save_batch
        self.given = {"train_loss": train_loss_key, "val_loss": val_loss_key,
                      "train_acc": train_acc_key, "val_acc": val_acc_key}
        self.patience, self.min_rel_delta = patience, min_rel_delta
        self.high_fraction = high_fraction
        self.factor, self.min_lr, self.min_epochs = factor, min_lr, min_epochs
        self.low_acc, self.close_gap, self.overfit_gap = low_acc, close_gap, overfit_gap
        self.rel_gap, self.halving_epochs = rel_gap, halving_epochs
        self.jump_factor, self.min_jump_fraction = jump_factor, min_jump_fraction
        self.window, self.min_history = window, min_history
        self.stall_steps = stall_steps
        self._reset()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor, **self.given, patience=self.patience,
            min_rel_delta=self.min_rel_delta, high_fraction=self.high_fraction, act=self.act,
            factor=self.factor, min_lr=self.min_lr, min_epochs=self.min_epochs,
            low_acc=self.low_acc, close_gap=self.close_gap, overfit_gap=self.overfit_gap,
            rel_gap=self.rel_gap, halving_epochs=self.halving_epochs,
            jump_factor=self.jump_factor, min_jump_fraction=self.min_jump_fraction,
            window=self.window, min_history=self.min_history, stall_steps=self.stall_steps)

    def _reset(self) -> None:
        self.keys = MetricKeys(self.given)
        self._keys_said = False
        self.history: dict[str, list[float]] = {}
        self.step_losses: deque[float] = deque(maxlen=self.window)
        self.first_losses: list[float] = []  # the first `min_history` finite step losses
        self.finite_steps = 0
        self.start_loss: float | None = None
        self.plateau_from = 0
        self.reported: set[str] = set()
        self.lr_changes: list[dict[str, Any]] = []
        self._batch_step = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()  # a checkpoint restored after setup brings the history back

    # ---- per step: divergence -------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._batch_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        try:
            loss = float(loss_from_output(outputs).detach())
        except ValueError:  # manual optimization or a step that skipped the batch
            return
        self._check_step(trainer, loss, batch, batch_idx)

    def _check_step(self, trainer: pl.Trainer, loss: float, batch: Any, batch_idx: int) -> None:
        if self.start_loss is None and math.isfinite(loss):
            self.start_loss = loss
        history = list(self.step_losses)
        if len(history) < self.min_history:  # too few for a median: compare with the start
            history = [self.start_loss] if self.start_loss is not None else []
        if "advisor.divergence" not in self.reported and is_jump(
                loss, history, self.jump_factor, self._min_jump()):
            self.reported.add("advisor.divergence")
            self.publish(trainer, [self._divergence(trainer, loss, history, batch, batch_idx)])
        if math.isfinite(loss):
            self.step_losses.append(loss)
            self.finite_steps += 1
            if len(self.first_losses) < self.min_history:
                self.first_losses.append(loss)
            if self.finite_steps == self.stall_steps:
                self._check_stall(trainer)

    def _check_stall(self, trainer: pl.Trainer) -> None:
        """``advisor.stalled`` when, at the ``stall_steps``-th finite loss, the last
        ``min_history`` have not moved ``min_rel_delta`` below the first ``min_history``."""
        first = statistics.median(self.first_losses)
        last = statistics.median(list(self.step_losses)[-self.min_history:])
        drop = (first - last) / abs(first) if first else (math.inf if last < 0 else 0.0)
        if drop >= self.min_rel_delta:
            return
        self.reported.add("advisor.stalled")
        self.publish(trainer, [self.finding(
            trainer, "advisor.stalled", Severity.WARN,
            f"The step loss does not move: the median of the last {self.min_history} step "
            f"losses is {last:.4g} after {self.finite_steps} steps, {drop:+.2%} below the "
            f"median {first:.4g} of the first {self.min_history} (expected a drop of at least "
            f"{self.min_rel_delta:.0%}).",
            advice=STALLED_ADVICE, value=float(drop), expected=(self.min_rel_delta, 1.0),
            step=self._batch_step)])

    def _divergence(self, trainer: pl.Trainer, loss: float, history: list[float], batch: Any,
                    batch_idx: int) -> Finding:
        median = float(torch.tensor(history).median()) if history else float("nan")
        message, indices, details = describe_divergence(
            trainer, loss, median, batch, batch_idx, self._batch_step, self.save_batch)
        # The data inspection ran at fit start: its flagged samples are known by now.
        link, advice, linked = data_link(indices, trainer_findings(trainer))
        return self.finding(
            trainer, "advisor.divergence", Severity.WARN if math.isfinite(loss) else Severity.FAIL,
            f"{message} {link}", advice=advice, value=loss,
            expected=(0.0, jump_threshold(median, self.jump_factor, self._min_jump()))
            if history else None,
            step=self._batch_step, indices=indices, details={**details, **linked})

    def _min_jump(self) -> float:
        return self.min_jump_fraction * abs(self.start_loss or 0.0)

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
        if self.monitor and self.monitor not in keys:
            keys.append(self.monitor)
        for key in keys:
            value = metrics.get(f"{key}_epoch", metrics.get(key))  # the epoch value first
            if value is not None:
                self.history.setdefault(key, []).append(float(value))
        return new

    def _keys_finding(self, trainer: pl.Trainer, roles: list[str]) -> Finding:
        missing = self.keys.missing_roles(ROLES)
        read = f"reads {self.keys.describe(roles)}" if roles else "found none of its metrics yet"
        lacking = "; not logged under any common name: " + ", ".join(
            f"`{self.given[r]}` (given)" if self.given[r] else f"the {DESCRIPTIONS[r]}"
            for r in missing) if missing else ""
        return self.finding(
            trainer, "advisor.keys", Severity.INFO, f"The advisor {read}{lacking}.",
            advice="Plateaus need a loss, under/overfitting both accuracies; pass the names "
                   "you log (e.g. `val_acc_key='val/top1'`) if they are not found.",
            details={"keys": dict(self.keys.used), "missing": [self.given[r] or r
                                                               for r in missing]},
            subject=",".join(roles))  # names found at another epoch are another fact

    def assess(self, trainer: pl.Trainer | None) -> list[Finding]:
        """The findings the current history supports (each verdict once, plateaus repeatable)."""
        out = [f for f in (self._plateau(trainer), self._fit_gap(trainer)) if f is not None]
        self.reported.update(f.code for f in out if f.code != "advisor.plateau")
        return out

    def _monitor_key(self) -> str:
        if self.monitor:
            return self.monitor
        val = self.keys.used.get("val_loss", "")
        return val if self.history.get(val) else self.keys.used.get("train_loss", "")

    def _plateau(self, trainer: pl.Trainer | None) -> Finding | None:
        key = self._monitor_key()
        curve = self.history.get(key, [])
        verdict = plateau_verdict(key, curve, self.plateau_from, self.start_loss, self.patience,
                                  self.min_rel_delta, self.high_fraction)
        if verdict is None:
            return None
        self.plateau_from = len(curve) - 1
        if self.act and trainer is not None:
            changes, text = scale_lr(trainer.optimizers, self.factor, self.min_lr,
                                     trainer.current_epoch)
            self.lr_changes.extend(changes)
            verdict = verdict._replace(message=f"{verdict.message} {text}")
        return self._verdict_finding(trainer, verdict)

    def _fit_gap(self, trainer: pl.Trainer | None) -> Finding | None:
        curves = Curves(*(self.history.get(self.keys.used.get(role, ""), [])
                          for role in ("train_loss", "val_loss", "train_acc", "val_acc")))
        epochs = min(max(len(curves.train_loss), len(curves.train_acc)),
                     max(len(curves.val_loss), len(curves.val_acc)))
        if epochs < self.min_epochs:
            return None
        rule = GapRule(self.patience, self.min_rel_delta, self.overfit_gap, self.close_gap,
                       self.rel_gap, self.low_acc, self.high_fraction, self.halving_epochs,
                       self.start_loss)
        verdict = fit_gap_verdict(curves, rule, self.reported)
        return None if verdict is None else self._verdict_finding(trainer, verdict)

    def _advice(self, code: str) -> str:
        diverged = next((f for f in self.findings if f.code == "advisor.divergence"), None)
        if code == "advisor.underfit" and diverged is not None:
            return UNDERFIT_AFTER_DIVERGENCE.format(step=diverged.step)
        return ADVICE[code.removeprefix("advisor.")]

    def _verdict_finding(self, trainer: pl.Trainer | None, verdict: Verdict) -> Finding:
        return self.finding(trainer, verdict.code, Severity.WARN, verdict.message,
                            advice=self._advice(verdict.code),
                            value=verdict.value, expected=verdict.expected,
                            details=verdict.details or {})

    # ---- at the end: the verdict ----------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.publish(trainer, [self._summary(trainer)])

    def _summary(self, trainer: pl.Trainer) -> Finding:
        """The INFO verdict ``advisor.summary``: its plateau counter and what it reported."""
        key = self._monitor_key()
        curve = [v for v in self.history.get(key, []) if math.isfinite(v)]
        code = f"{self.slug}.summary"
        if not curve:
            return self.finding(trainer, code, Severity.INFO,
                                "The advisor read no finite loss curve (see `advisor.keys`): "
                                "no plateau or under/overfitting could be judged.")
        waited = plateau_length(self.history[key][self.plateau_from:], self.min_rel_delta)
        plateaus = next((len(f.steps()) for f in self.findings if f.code == "advisor.plateau"), 0)
        said = sorted(self.reported - {"advisor.divergence"})
        return self.finding(
            trainer, code, Severity.INFO,
            f"Plateau counter on `{key}`: {waited} of {self.patience} epoch(s) without a "
            f"{self.min_rel_delta:.0%} improvement; best {min(curve):.4g} over {len(curve)} "
            f"epoch(s); {plateaus} plateau(s) reported"
            + (f", learning rate scaled {len(self.lr_changes)} time(s)" if self.act else "")
            + f"; {', '.join(f'`{c}`' for c in said) if said else 'no under/overfitting'} "
            f"found.",
            value=float(waited), expected=(0.0, float(self.patience)),
            details={"monitor": key, "best": min(curve), "plateaus": plateaus})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()},
                "step_losses": list(self.step_losses), "start_loss": self.start_loss,
                "plateau_from": self.plateau_from, "reported": sorted(self.reported),
                "lr_changes": list(self.lr_changes), "first_losses": list(self.first_losses),
                "finite_steps": self.finite_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reset()
        self.history = {k: list(v) for k, v in state_dict.get("history", {}).items()}
        self.step_losses.extend(state_dict.get("step_losses", []))
        self.start_loss = state_dict.get("start_loss")
        self.plateau_from = int(state_dict.get("plateau_from", 0))
        self.reported = set(state_dict.get("reported", []))
        self.lr_changes = list(state_dict.get("lr_changes", []))
        self.first_losses = [float(v) for v in state_dict.get("first_losses", [])]
        self.finite_steps = int(state_dict.get("finite_steps", 0))

"""CheckpointEnsemble: keep k checkpoints of one run and measure their ensemble (recipe step 7.3).

At the end of each ``every_n_epochs``-th training epoch (after validation) the weights are saved
(``Trainer.save_checkpoint(weights_only=True)``); the last ``k``, or the best ``k`` by ``monitor``,
are kept. At fit end every kept checkpoint and their ensemble run the module's own
``validation_step`` on the validation data (:func:`~lightning_diag.inference.ensemble.
evaluate_members`), for any task: every metric it logs goes to TensorBoard under
``7.3_ensemble/<metric>``, each member at its epoch in the sibling run ``members`` and the ensemble
at the same epochs in ``combined`` (one chart, two colours), and an info finding ``ensemble.gain``
compares the ensemble with each member.

Example:
    >>> from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
    >>> cb = CheckpointEnsemble(k=3, monitor="val_loss", mode="min")
    >>> trainer = pl.Trainer(callbacks=[cb], max_epochs=10)  # doctest: +SKIP
    >>> trainer.fit(model, datamodule)  # doctest: +SKIP
    >>> ensemble = EnsembleModel.from_checkpoints(type(model), cb.paths)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_diag.base import ConfigurationError, DiagnosticCallback
from lightning_diag.batch import BatchFn, UserCodeError, default_batch_to_target
from lightning_diag.callbacks._metric_keys import find_metric
from lightning_diag.findings import Severity
from lightning_diag.functional.ensemble import COMBINE
from lightning_diag.inference.checkpoints import check_state_dict, load_checkpoint, state_dict_of
from lightning_diag.inference.ensemble import EnsembleError, evaluate_members
from lightning_diag.isolation import clone_module, preserved_rng
from lightning_diag.tensorboard.tags import COMBINED_RUN, MEMBERS_RUN, ensemble_comparison
from lightning_diag.tensorboard.writer import SiblingRuns, log_dir
from lightning_diag.validation import (
    check_callable,
    check_choice,
    check_int,
    check_str,
    require,
)

__all__ = ["CheckpointEnsemble"]


def _headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The metric the gain is measured on, and +1 when higher is better (an accuracy), -1 when
    lower is (a loss); None when the step logs neither."""
    names = list(metrics)
    acc, loss = find_metric(names, "val_acc"), find_metric(names, "val_loss")
    if acc is not None:
        return acc, 1.0
    return None if loss is None else (loss, -1.0)


class CheckpointEnsemble(DiagnosticCallback):
    """Keep the last (or best) ``k`` checkpoints and report their ensemble at fit end.

    Args:
        k: How many checkpoints to keep (>= 2 for an ensemble).
        monitor: Metric in ``trainer.callback_metrics`` to rank by; None keeps the last ``k``.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        every_n_epochs: Save at the end of every n-th epoch.
        combine: How the ensemble combines members (see :class:`~lightning_diag.EnsembleModel`).
        dirpath: Where checkpoints go; default ``<log dir>/ensemble`` (or the root dir).
        batch_to_target: Reads a validation batch's target, from which (with the prediction)
            the task and so the combination are inferred.
        strict: Raise on a FAIL finding (this callback emits none).
    """

    slug = "ensemble"

    def __init__(self, k: int = 3, monitor: str | None = None, mode: str = "min",
                 every_n_epochs: int = 1, combine: str = "mean_prob",
                 dirpath: str | Path | None = None,
                 batch_to_target: BatchFn = default_batch_to_target, strict: bool = False
                 ) -> None:
        super().__init__(strict=strict)
        check_int("k", k)
        check_str("monitor", monitor, optional=True)
        check_choice("mode", mode, ("min", "max"))
        check_int("every_n_epochs", every_n_epochs)
        check_choice("combine", combine, COMBINE)
        require(dirpath is None or isinstance(dirpath, (str, os.PathLike)), "dirpath", dirpath,
                "a directory path (str or os.PathLike) or None", TypeError)
        require(dirpath != "", "dirpath", dirpath, "a directory path (str or os.PathLike) or None")
        check_callable("batch_to_target", batch_to_target)
        self.k, self.monitor, self.mode, self.every_n_epochs = k, monitor, mode, every_n_epochs
        self.combine, self.batch_to_target = combine, batch_to_target
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.kept: list[dict[str, Any]] = []  # {"path", "score", "epoch", "step"}
        self.results: dict[str, Any] = {}
        self._runs = SiblingRuns()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(k=self.k, monitor=self.monitor, mode=self.mode,
                                        every_n_epochs=self.every_n_epochs)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._refuse_shared_directory(trainer)

    def _directory(self, trainer: pl.Trainer) -> Path:
        root = log_dir(trainer) or Path(trainer.default_root_dir)
        return self.dirpath or root / "ensemble"

    def _refuse_shared_directory(self, trainer: pl.Trainer) -> None:
        # two instances in one directory would write the same file names and delete each other's
        mine = self._directory(trainer).resolve()
        if any(isinstance(cb, CheckpointEnsemble) and cb is not self
               and cb._directory(trainer).resolve() == mine
               for cb in trainer.callbacks):  # type: ignore[attr-defined]
            raise ConfigurationError(
                f"Two CheckpointEnsemble callbacks would keep their checkpoints in {mine} and "
                "delete each other's: give each its own `dirpath=`.")

    @property
    def paths(self) -> list[str]:
        """The kept checkpoints, oldest first."""
        return [m["path"] for m in sorted(self.kept, key=lambda m: m["step"])]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not trainer.sanity_checking:
            self._save(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = len(self.findings)
        if trainer.is_global_zero:
            self._evaluate(trainer, pl_module)
        if trainer.world_size > 1:  # evaluated once, on rank 0; every rank gets its findings
            new = trainer.strategy.broadcast(self.findings[before:], src=0)
            if not trainer.is_global_zero:
                self.findings.extend(new)

    def _save(self, trainer: pl.Trainer) -> None:
        score = None
        if self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                self._say(trainer, "ensemble.no_monitor", f"`{self.monitor}` was not logged by "
                          f"epoch {trainer.current_epoch}; this checkpoint is ranked last.")
            score = float(value) if value is not None else None
        name = f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        path = self._directory(trainer) / name
        trainer.save_checkpoint(path, weights_only=True)
        self.kept.append({"path": str(path), "score": score, "epoch": trainer.current_epoch,
                          "step": trainer.global_step})
        if len(self.kept) > self.k:
            drop = self._worst()
            self.kept.remove(drop)
            if trainer.is_global_zero:
                Path(drop["path"]).unlink(missing_ok=True)

    def _worst(self) -> dict[str, Any]:
        if self.monitor is None:
            return min(self.kept, key=lambda m: m["step"])
        sign = 1.0 if self.mode == "min" else -1.0
        return max(self.kept, key=lambda m: (m["score"] is None,
                                             sign * (m["score"] or 0.0), -m["step"]))

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = trainer.val_dataloaders
        limit = int(min(trainer.num_val_batches[0], 1e12)) if trainer.num_val_batches else 0
        if len(self.kept) < 2 or loaders is None or limit == 0:
            self._say(trainer, "ensemble.skipped", f"{len(self.kept)} checkpoint(s) kept and "
                      f"{'a' if loaders is not None else 'no'} validation loader: an ensemble "
                      "needs >= 2 checkpoints and validation data.")
            return
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        with preserved_rng():
            members = []
            for path in self.paths:
                state = state_dict_of(load_checkpoint(path), path)
                member = clone_module(pl_module)
                check_state_dict(member, state, path)
                member.load_state_dict(state)
                members.append(member.eval())
            batches = (b for _, b in zip(range(limit), loader, strict=False))
            try:
                self.results = evaluate_members(members, batches, self.combine,
                                                pl_module.device,
                                                batch_to_target=self.batch_to_target)
            except EnsembleError as err:
                self._say(trainer, "ensemble.skipped", f"No ensemble: {err}")
                return
            except UserCodeError as err:  # reported here, so that rank 0 reaches the broadcast
                self.publish(trainer, [self.user_error(trainer, err, "on_fit_end")])
                return
        self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        ens, rows = self.results["ensemble"], self.results["members"]
        self._log_comparison(trainer, ens, rows)
        gain, said = None, "no validation accuracy or loss among them to rank the members by"
        headline = _headline(ens)
        if headline is not None:
            name, sign = headline
            best = max(rows, key=lambda r: sign * r.get(name, -sign * math.inf))[name]
            gain = sign * (ens[name] - best)
            said = (f"gain on `{name}` over the best member {gain:+.4g} "
                    f"({'higher' if sign > 0 else 'lower'} is better)")
        table = "; ".join(
            f"`{name}` ensemble {value:.4g}, members "
            + ", ".join(f"{r[name]:.4g}" if name in r else "-" for r in rows)
            for name, value in ens.items())
        self.publish(trainer, [self.finding(
            trainer, "ensemble.gain", Severity.INFO,
            f"Ensemble of {len(rows)} checkpoints ({self.results['combined']}) on the metrics "
            f"`validation_step` logs: {table or 'none logged'}; {said}.",
            advice="Ensembles usually gain a few percent (recipe step 7); load them with "
                   "EnsembleModel.from_checkpoints(ModelClass, callback.paths).",
            value=gain, details=self.results)])

    def _log_comparison(self, trainer: pl.Trainer, ens: dict[str, float],
                        rows: list[dict[str, float]]) -> None:
        """Each member's metrics at its checkpoint's epoch (run ``members``), the ensemble's at
        the same epochs (run ``combined``): a flat line to compare the members' curve with."""
        epochs = [int(m["epoch"]) for m in sorted(self.kept, key=lambda m: m["step"])]
        for epoch, row in zip(epochs, rows, strict=True):
            self._runs.log(trainer, {
                MEMBERS_RUN: {ensemble_comparison(name): v for name, v in row.items()},
                COMBINED_RUN: {ensemble_comparison(name): v for name, v in ens.items()}}, epoch)

    @override
    def _release(self) -> None:
        super()._release()
        self._runs.close()

    def _say(self, trainer: pl.Trainer, code: str, message: str) -> None:
        if not any(f.code == code for f in self.findings):
            self.publish(trainer, [self.finding(trainer, code, Severity.INFO, message)])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"kept": [dict(m) for m in self.kept]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.kept = [dict(m) for m in state_dict.get("kept", [])]

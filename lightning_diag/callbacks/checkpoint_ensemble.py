"""CheckpointEnsemble: keep k checkpoints of one run and measure their ensemble (recipe step 7.3).

At the end of each ``every_n_epochs``-th training epoch (after validation) the weights are saved
(``Trainer.save_checkpoint(weights_only=True)``); the last ``k``, or the best ``k`` by ``monitor``,
are kept. At fit end every kept checkpoint and their ensemble run the module's own
``validation_step`` on the validation data (:func:`~lightning_diag.inference.ensemble.
evaluate_members`), for any task: every metric it logs goes to TensorBoard as bars with their
values, each member by its epoch next to the ensemble (the image ``7.3_ensemble/members_vs_
ensemble``: a few numbers measured once, which a line chart would smooth into one), and an info
finding ``ensemble.gain`` compares the ensemble with each member.

It deletes only checkpoints it wrote itself in this process, in its own directory. The kept list
of a checkpoint it resumes from is trusted only for plain files directly in that directory (no
symbolic link, no ``..``, no other directory); any other entry is left alone (never deleted,
never loaded) and named in the info finding ``ensemble.ignored_paths``.

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
from lightning_diag.tensorboard.figures import ensemble_figure
from lightning_diag.tensorboard.tags import ENSEMBLE_FIGURE
from lightning_diag.tensorboard.writer import log_dir, log_figure
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
        k: How many checkpoints to keep (>= 2: an ensemble has two members or more).
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
        require(not isinstance(k, int) or isinstance(k, bool) or k >= 2, "k", k,
                "an int >= 2 (an ensemble has two members or more)")
        check_int("k", k, low=2)
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
        self._written: set[str] = set()  # the files this callback wrote in this fit
        self._refused: list[tuple[str, str]] = []  # restored entries not followed, and why

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
            # one fit's list: a checkpoint restored after setup sets it back (load_state_dict)
            self.kept, self.results, self._written, self._refused = [], {}, set(), []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trust_restored(trainer)

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

    def _trust_restored(self, trainer: pl.Trainer) -> None:
        """Keep of a restored list only plain files directly in this callback's directory; say
        which entries are left alone (checked once the directory is known: at fit start)."""
        directory = self._directory(trainer)
        refused = list(self._refused)
        for entry in [m for m in self.kept if m["path"] not in self._written]:
            why = _untrusted(entry["path"], directory)
            if why:
                self.kept.remove(entry)
                refused.append((entry["path"], why))
        self._refused = []
        if not refused:
            return
        shown = "; ".join(f"`{path}` ({why})" for path, why in refused[:5])
        more = f"; and {len(refused) - 5} more" if len(refused) > 5 else ""
        self.publish(trainer, [self.finding(
            trainer, "ensemble.ignored_paths", Severity.INFO,
            f"The checkpoint this fit resumed from lists {len(refused)} kept checkpoint(s) that "
            f"are not plain files in this callback's directory {directory}: {shown}{more}. They "
            "are left alone: never deleted, never loaded into the ensemble.",
            advice="A fit resumed into another log directory starts a new list: pass the same "
                   "`dirpath=` to both fits to continue the old one. A path you do not know "
                   "means the checkpoint was edited: do not trust it.",
            value=float(len(refused)), details={"ignored": [p for p, _ in refused]})])

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
        path = str(self._directory(trainer) / name)
        entry = {"path": path, "score": score, "epoch": trainer.current_epoch,
                 "step": trainer.global_step}
        if self._dropped_at_once(entry):
            return  # ranked below the k kept: its file would be deleted as soon as written
        trainer.save_checkpoint(path, weights_only=True)
        self._written.add(path)
        self.kept = [m for m in self.kept if m["path"] != path]  # a restored entry overwritten
        self.kept.append(entry)
        if len(self.kept) > self.k:
            drop = self._worst()
            self.kept.remove(drop)
            if trainer.is_global_zero:
                self._delete(drop["path"], self._directory(trainer))

    def _dropped_at_once(self, entry: dict[str, Any]) -> bool:
        """Whether ``entry``, ranked by ``monitor``, would leave the kept list as soon as it
        joined it (the list holds ``k`` better ones, none at its path): then it is not saved.
        The last ``k`` (``monitor=None``) keep every new checkpoint."""
        if self.monitor is None or len(self.kept) < self.k or any(
                m["path"] == entry["path"] for m in self.kept):
            return False
        return self._worst([*self.kept, entry]) is entry

    def _delete(self, path: str, directory: Path) -> None:
        """Delete ``path`` only if this callback wrote it in this fit and it is still a plain
        file in ``directory``; a restored entry's file (another process wrote it) stays."""
        if path in self._written and not _untrusted(path, directory):
            self._written.discard(path)
            Path(path).unlink(missing_ok=True)

    def _worst(self, kept: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The entry of ``kept`` (default: the kept list) dropped first."""
        kept = self.kept if kept is None else kept
        if self.monitor is None:
            return min(kept, key=lambda m: m["step"])
        sign = 1.0 if self.mode == "min" else -1.0
        return max(kept, key=lambda m: (m["score"] is None,
                                        sign * (m["score"] or 0.0), -m["step"]))

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = trainer.val_dataloaders
        limit = int(min(trainer.num_val_batches[0], 1e12)) if trainer.num_val_batches else 0
        missing = ([f"only {len(self.kept)} checkpoint(s) kept (one every "
                    f"{self.every_n_epochs} epoch(s)), and an ensemble needs 2 or more"]
                   if len(self.kept) < 2 else [])
        if loaders is None or limit == 0:
            missing.append("no validation dataloader (none given, or `limit_val_batches=0`)"
                           if loaders is None else "the validation dataloader is empty")
        if missing or loaders is None:
            self._say(trainer, "ensemble.skipped", f"No ensemble: {'; '.join(missing)}.")
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
        """Each member's metrics by its checkpoint's epoch and the ensemble's, as bars."""
        if not ens or not self.require_tensorboard(trainer, "the ensemble's chart"):
            return
        epochs = [int(m["epoch"]) for m in sorted(self.kept, key=lambda m: m["step"])]
        log_figure(trainer, ENSEMBLE_FIGURE, ensemble_figure(list(zip(epochs, rows, strict=True)),
                                                             ens), trainer.global_step)

    def _say(self, trainer: pl.Trainer, code: str, message: str) -> None:
        if not any(f.code == code for f in self.findings):
            self.publish(trainer, [self.finding(trainer, code, Severity.INFO, message)])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"kept": [dict(m) for m in self.kept]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # entries of the wrong shape are set aside here; paths are checked at fit start
        entries = state_dict.get("kept", [])
        entries = entries if isinstance(entries, list) else [entries]
        self.kept = [dict(m) for m in entries if _well_formed(m)]
        self._refused = [(repr(m)[:200], "not a kept-checkpoint entry") for m in entries
                         if not _well_formed(m)]


def _well_formed(entry: Any) -> bool:
    """A kept entry as :meth:`CheckpointEnsemble._save` writes it."""
    return (isinstance(entry, dict) and isinstance(entry.get("path"), str)
            and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
                    for k in ("epoch", "step"))
            and (entry.get("score") is None or isinstance(entry.get("score"), float)))


def _untrusted(path: str, directory: Path) -> str:
    """Why ``path`` is not followed (empty when it is a plain file directly in ``directory``):
    a symbolic link, or a file elsewhere once symbolic links and ``..`` are resolved.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "a.ckpt").write_bytes(b"")
        0
        >>> _untrusted(str(d / "a.ckpt"), d), _untrusted(str(d / ".." / "a.ckpt"), d)[:7]
        ('', 'outside')
    """
    candidate = Path(path)
    if candidate.is_symlink():
        return "a symbolic link"
    if candidate.resolve().parent != directory.resolve():
        return f"outside {directory}"
    if not candidate.is_file():
        return "not a file"
    return ""

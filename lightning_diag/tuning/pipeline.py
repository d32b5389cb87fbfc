"""Step 6 end to end: sweep -> random search -> refine, with one summary.

Example:
    >>> from functools import partial
    >>> from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
    >>> from lightning_diag.tuning import tune
    >>> summary = tune(partial(DigitsClassifier, arch="mlp"), DigitsDataModule(),
    ...                run_dir="runs/tune", n_trials=6)  # doctest: +SKIP
    >>> print(summary.text())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_diag.tensorboard.tags import TUNING_SUMMARY, refine_curve, refine_layout
from lightning_diag.tensorboard.writer import merge_custom_scalars
from lightning_diag.tuning.records import RefinedConfig, RefineResult, SearchResult
from lightning_diag.tuning.refine import check_refine_arguments, refine
from lightning_diag.tuning.search import check_search_arguments, random_search
from lightning_diag.tuning.study import open_storage, require_optuna, run_dir_lock
from lightning_diag.tuning.sweep import (
    ModelFactory,
    SweepResult,
    check_sweep_arguments,
    lr_sweep,
)
from lightning_diag.tuning.trial import fit_data
from lightning_diag.validation import check_flag, check_int

__all__ = ["TuneSummary", "check_tune_arguments", "tune"]


@dataclass
class TuneSummary:
    """The three stages' results and the final recommendation."""

    sweep: SweepResult
    search: SearchResult
    refine: RefineResult

    @property
    def best(self) -> RefinedConfig | None:
        """The top refined configuration (lr, weight_decay, value, advisor codes); None when
        no trial of the search completed, so nothing was refined."""
        return self.refine.rows[0] if self.refine.rows else None

    def text(self) -> str:
        """The whole summary as markdown (printed by the CLI, logged to TensorBoard)."""
        b = self.best
        if b is None:
            best = ("**Best**: none. Every trial of the search was pruned (see \"ended by\"), so "
                    "nothing was refined: move the search's learning rates (a sweep over other "
                    "rates, `--lrs`) or allow more epochs before pruning.")
        else:
            best = (f"**Best**: lr={b.lr:.3e}, weight_decay={b.weight_decay:g}, "
                    f"{self.refine.monitor}={b.value:.4f}. Advisor: "
                    + ("; ".join(b.reading) or "healthy, no decay needed yet."))
        return "\n\n".join([
            "## 1. Learning-rate sweep", self.sweep.table(), self.sweep.rule,
            f"## 2. Random search around {self.sweep.best_lr:.0e} "
            f"(study `{self.search.study_name}`)",
            self.search.table(), "## 3. Refined", self.refine.table(), best])


def check_tune_arguments(*, model_factory: Any, lrs: Any, sweep_steps: Any, n_trials: Any,
                         epochs: Any, weight_decays: Any, top_k: Any, refine_epochs: Any,
                         study_name: Any, monitor: Any, direction: Any, seed: Any,
                         verbose: Any = True, heartbeat: Any = None, diagnose: Any = True) -> None:
    """Check every argument of :func:`tune` that needs no storage, before any training.

    Example:
        >>> check_tune_arguments(model_factory=dict, lrs=[1e-2], sweep_steps=10, n_trials=0,
        ...                      epochs=(1, 5), weight_decays=[0.0], top_k=2, refine_epochs=10,
        ...                      study_name="s", monitor="val_acc", direction="maximize", seed=0)
        Traceback (most recent call last):
        ...
        ValueError: `n_trials` must be an int >= 1, got 0.
    """
    check_int("sweep_steps", sweep_steps)  # by their own names before the stages' checks
    check_int("refine_epochs", refine_epochs)
    check_sweep_arguments(model_factory=model_factory, lrs=lrs, steps=sweep_steps, seed=seed)
    check_search_arguments(model_factory=model_factory, n_trials=n_trials, epochs=epochs,
                           weight_decays=weight_decays, study_name=study_name, monitor=monitor,
                           direction=direction, seed=seed, heartbeat=heartbeat,
                           diagnose=diagnose)
    check_refine_arguments(top_k=top_k, epochs=refine_epochs, seed=seed)
    check_flag("verbose", verbose)


def tune(model_factory: ModelFactory, data: Any, lrs: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4),
         sweep_steps: int = 100, n_trials: int = 9, epochs: int | tuple[int, int] = (1, 5),
         weight_decays: Sequence[float] = (1e-4, 1e-5, 0.0), top_k: int = 3,
         refine_epochs: int = 10, run_dir: str | Path = "tune_runs", storage: Any = None,
         study_name: str = "lightning_diag_search", monitor: str = "val_acc",
         direction: str = "maximize", seed: int = 0, verbose: bool = True,
         heartbeat: int | None = 60, diagnose: bool = True,
         **trainer_kwargs: Any) -> TuneSummary:
    """Chain :func:`lr_sweep`, :func:`random_search` and :func:`refine` (recipe step 6.1-6.3).

    Writes ``sweep.png``, TensorBoard runs under ``run_dir`` (``sweep/``, ``search/``,
    ``refine/``, ``summary/``) and prints the summary table when ``verbose``. Every argument is
    checked before the sweep starts, so a bad one costs no training: the storage URL is opened
    then, and with the embedded study this process holds ``run_dir`` for the whole call (see
    :func:`random_search`). ``diagnose``: the search ends hopeless trials by what its monitors
    see (see :func:`random_search`).
    """
    check_tune_arguments(model_factory=model_factory, lrs=lrs, sweep_steps=sweep_steps,
                         n_trials=n_trials, epochs=epochs, weight_decays=weight_decays,
                         top_k=top_k, refine_epochs=refine_epochs, study_name=study_name,
                         monitor=monitor, direction=direction, seed=seed, verbose=verbose,
                         heartbeat=heartbeat, diagnose=diagnose)
    run_dir = Path(run_dir)
    fit = fit_data(data)
    optuna = require_optuna()
    if storage is not None:
        open_storage(optuna, storage, None)  # a bad URL fails now, not after the sweep
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(run_dir) if storage is None else nullcontext():
        sweep = lr_sweep(model_factory, train_dataloaders=fit.get("train_dataloaders"),
                         datamodule=fit.get("datamodule"), lrs=lrs, steps=sweep_steps,
                         seed=seed, run_dir=run_dir, **trainer_kwargs)
        search = random_search(model_factory, data, sweep.best_lr, n_trials, epochs=epochs,
                               weight_decays=weight_decays, storage=storage,
                               study_name=study_name, run_dir=run_dir, monitor=monitor,
                               direction=direction, seed=seed, heartbeat=heartbeat,
                               diagnose=diagnose, **trainer_kwargs)
        completed = any(r.state == "complete" for r in search.rows)
        refined = (refine(search, top_k=top_k, epochs=refine_epochs, seed=seed) if completed
                   else RefineResult([], monitor))
        summary = TuneSummary(sweep, search, refined)
        _log_summary(summary, run_dir)
    if verbose:
        print(summary.text())
    return summary


def _log_summary(summary: TuneSummary, run_dir: Path) -> None:
    """TensorBoard: the summary text and the refined runs' monitor curves on one chart."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "summary"))
    try:
        tags = []
        for row in summary.refine.rows:
            tag = refine_curve(row.rank)
            tags.append(tag)
            for epoch, value in enumerate(row.curve):
                writer.add_scalar(tag, value, epoch)
        merge_custom_scalars(writer, *refine_layout(summary.refine.monitor, tags))
        writer.add_text(TUNING_SUMMARY, summary.text())
    finally:
        writer.close()

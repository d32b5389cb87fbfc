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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_diag.tensorboard.tags import TUNING_SUMMARY, refine_curve, refine_layout
from lightning_diag.tensorboard.writer import merge_custom_scalars
from lightning_diag.tuning.search import (
    RefineResult,
    SearchResult,
    _fit_data,
    check_refine_arguments,
    check_search_arguments,
    random_search,
    refine,
)
from lightning_diag.tuning.sweep import (
    ModelFactory,
    SweepResult,
    check_sweep_arguments,
    lr_sweep,
)
from lightning_diag.validation import check_flag

__all__ = ["TuneSummary", "tune"]


@dataclass
class TuneSummary:
    """The three stages' results and the final recommendation."""

    sweep: SweepResult
    search: SearchResult
    refine: RefineResult

    @property
    def best(self) -> dict[str, Any] | None:
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
            best = (f"**Best**: lr={b['lr']:.3e}, weight_decay={b['weight_decay']:g}, "
                    f"{self.refine.monitor}={b['value']:.4f}. Advisor: "
                    + ("; ".join(b["reading"]) or "healthy, no decay needed yet."))
        return "\n\n".join([
            "## 1. Learning-rate sweep", self.sweep.table(), self.sweep.rule,
            f"## 2. Random search around {self.sweep.best_lr:.0e} "
            f"(study `{self.search.study_name}`)",
            self.search.table(), "## 3. Refined", self.refine.table(), best])


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
    checked before the sweep starts, so a bad one costs no training. ``diagnose``: the search
    ends hopeless trials by what its monitors see (see :func:`random_search`).
    """
    check_sweep_arguments(model_factory=model_factory, lrs=lrs, steps=sweep_steps, seed=seed)
    check_search_arguments(model_factory=model_factory, n_trials=n_trials, epochs=epochs,
                           weight_decays=weight_decays, study_name=study_name, monitor=monitor,
                           direction=direction, seed=seed, heartbeat=heartbeat,
                           diagnose=diagnose)
    check_refine_arguments(top_k=top_k, epochs=refine_epochs, seed=seed)
    check_flag("verbose", verbose)
    run_dir = Path(run_dir)
    fit = _fit_data(data)
    sweep = lr_sweep(model_factory, train_dataloaders=fit.get("train_dataloaders"),
                     datamodule=fit.get("datamodule"), lrs=lrs, steps=sweep_steps, seed=seed,
                     run_dir=run_dir, **trainer_kwargs)
    search = random_search(model_factory, data, sweep.best_lr, n_trials, epochs=epochs,
                           weight_decays=weight_decays, storage=storage, study_name=study_name,
                           run_dir=run_dir, monitor=monitor, direction=direction, seed=seed,
                           heartbeat=heartbeat, diagnose=diagnose, **trainer_kwargs)
    completed = any(r["state"] == "complete" for r in search.rows)
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
            tag = refine_curve(row["rank"])
            tags.append(tag)
            for epoch, value in enumerate(row["curve"]):
                writer.add_scalar(tag, value, epoch)
        merge_custom_scalars(writer, *refine_layout(summary.refine.monitor, tags))
        writer.add_text(TUNING_SUMMARY, summary.text())
    finally:
        writer.close()

"""Tuning step 3: the search's best configurations trained longer, read by the advisor.

Example:
    >>> check_refine_arguments(top_k=0, epochs=10, seed=0)
    Traceback (most recent call last):
    ...
    ValueError: `top_k` must be an int >= 1, got 0.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.findings import Severity
from lightning_diag.tuning.records import RefinedConfig, RefineResult, SearchResult
from lightning_diag.tuning.sweep import build_model, quiet_trainer
from lightning_diag.tuning.trial import fit_data
from lightning_diag.validation import check_int

__all__ = ["check_refine_arguments", "refine"]


def check_refine_arguments(*, top_k: Any, epochs: Any, seed: Any) -> None:
    """Check the arguments of :func:`refine`, before any training."""
    check_int("top_k", top_k)
    check_int("epochs", epochs)
    check_int("seed", seed, low=None)


def refine(results: SearchResult, top_k: int = 3, epochs: int = 10, seed: int = 0,
           advisor: dict[str, Any] | None = None, **trainer_kwargs: Any) -> RefineResult:
    """Train the ``top_k`` best completed configurations for ``epochs`` (recipe: 10-20) with no
    learning-rate decay and an :class:`LRPlateauAdvisor` attached (``advisor`` = its kwargs).

    The factory's model must not decay its learning rate (a scheduler triggers a warning).
    Logs go to ``<run_dir>/refine/config_<rank>``.
    """
    check_refine_arguments(top_k=top_k, epochs=epochs, seed=seed)
    best = [r for r in results.rows if r.state == "complete"][:top_k]
    if not best:
        raise ValueError("The search has no completed trial to refine.")
    runs = []
    for i, cfg in enumerate(best):
        adv = LRPlateauAdvisor(**(advisor or {}))
        logger = TensorBoardLogger(str(results.run_dir), name="refine", version=f"config_{i}")
        trainer = quiet_trainer(max_epochs=epochs, logger=logger, callbacks=[adv],
                                **{**results.trainer_kwargs, **trainer_kwargs})
        trainer.fit(build_model(results.model_factory, cfg.lr, cfg.weight_decay, seed),
                    **fit_data(results.data))
        if trainer.lr_scheduler_configs:
            warnings.warn("refine: the model decays its learning rate; the recipe's step 3 trains "
                          "without decay so that the advisor can choose one.", stacklevel=2)
        value = trainer.callback_metrics.get(results.monitor)
        verdicts = [f for f in adv.findings if f.severity >= Severity.WARN]
        runs.append(RefinedConfig(
            rank=0, lr=cfg.lr, weight_decay=cfg.weight_decay, trial=cfg.number,
            value=float(value) if value is not None else math.nan,
            advisor=sorted({f.code for f in verdicts}),
            # the verdicts; the info saying which metric names it reads is no reading
            reading=[f.format() for f in verdicts],
            curve=list(adv.history.get(results.monitor, []))))
    sign = -1.0 if results.direction == "maximize" else 1.0
    runs.sort(key=lambda r: sign * r.value if math.isfinite(r.value) else math.inf)
    return RefineResult([dataclasses.replace(run, rank=rank) for rank, run in enumerate(runs, 1)],
                        results.monitor)

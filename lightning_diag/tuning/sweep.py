"""Tuning step 1: find a learning rate under which the loss goes down (a short sweep).

Example:
    >>> from functools import partial
    >>> from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
    >>> from lightning_diag.tuning import lr_sweep
    >>> result = lr_sweep(partial(DigitsClassifier, arch="mlp"), datamodule=DigitsDataModule(),
    ...                   lrs=(1e-2, 1e-3), steps=5)  # doctest: +SKIP
    >>> result.best_lr  # doctest: +SKIP
    0.01
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_diag.batch import loss_from_output
from lightning_diag.functional.curves import pick_learning_rate, smooth_ema
from lightning_diag.isolation import OptimizationSettings
from lightning_diag.tensorboard.tags import (
    TUNING_SWEEP_CHART,
    TUNING_SWEEP_TABLE,
    sweep_curve,
    sweep_layout,
)
from lightning_diag.tensorboard.writer import figure_to_array, markdown_table, merge_custom_scalars
from lightning_diag.validation import (
    check_callable,
    check_flag,
    check_int,
    check_number,
    check_sequence,
)

__all__ = ["LRComparison", "ModelFactory", "SweepResult", "check_sweep_arguments",
           "compare_with_lr_find", "lr_sweep"]

ModelFactory = Callable[..., pl.LightningModule]
"""Builds a fresh model; called as ``model_factory(lr=..., weight_decay=...)``."""

RULE = ("EMA-smoothed (alpha={alpha}) step losses; curves with a non-finite loss or a smoothed "
        "loss above 4x their first loss are diverged; the rest are scored by the mean of the last "
        "10% of their smoothed loss; the lowest score wins (ties: larger LR).")


@dataclass
class SweepResult:
    """Every curve of a sweep and the learning rate it picked.

    Attributes:
        best_lr: The chosen learning rate.
        curves: Raw step losses per learning rate.
        smoothed: EMA-smoothed losses per learning rate.
        scores: Final smoothed loss per learning rate (``inf`` when diverged).
        diverged: Learning rates whose loss diverged.
        rule: The pick rule, in words.
        png_path: The chart of all curves, when a ``run_dir`` was given.
        extended: The learning rate added beyond the edge of ``lrs`` when the pick lay there
            (recipe: a result at the edge of the range means the range was wrong), else None.
        edge: Which edge of the final range the pick lies at (``"top"``, ``"bottom"``), or ``""``.
    """

    best_lr: float
    curves: dict[float, list[float]]
    smoothed: dict[float, list[float]]
    scores: dict[float, float]
    diverged: set[float]
    rule: str
    png_path: Path | None = None
    extended: float | None = None
    edge: str = ""

    def range_note(self) -> str:
        """What the edge of the range says, in one sentence (empty: the pick is inside it).

        Example:
            >>> r = SweepResult(1.0, {1.0: [], 0.1: [], 0.01: []}, {}, {}, set(), "",
            ...                 extended=1.0, edge="top")
            >>> r.range_note().split("; ")[1]
            'the pick 1e+00 is still at its top edge: extend the range further up.'
        """
        if self.extended is None and not self.edge:
            return ""
        text = ""
        if self.extended is not None:
            side = "top" if self.extended == max(self.curves) else "bottom"
            text = (f"The best rate lay at the {side} edge of the range, so the range was "
                    f"extended once, to {self.extended:.0e} (recipe 6.1: a result at the edge "
                    "means the range was wrong); ")
        if not self.edge:
            return f"{text}the pick {self.best_lr:.0e} now lies inside the range."
        where = "up" if self.edge == "top" else "down"
        text = text or "The pick lies at the edge of the range: "
        return (f"{text}the pick {self.best_lr:.0e} is still at its {self.edge} edge: extend "
                f"the range further {where}.")

    def table(self) -> str:
        """A markdown table: one row per learning rate, the pick marked."""
        return markdown_table(
            ["lr", "final smoothed loss", "diverged", "pick"],
            [[f"{lr:.0e}", f"{self.scores[lr]:.4g}", "yes" if lr in self.diverged else "",
              "<-" if lr == self.best_lr else ""] for lr in sorted(self.curves, reverse=True)]
        ) + (f"\n\n{self.range_note()}" if self.range_note() else "")


class _StepLosses(pl.Callback):
    """Collects each training batch's loss; stops the fit at the first non-finite one."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning hands over the loss divided by the accumulation (what it backpropagates);
        # the curve is of the loss training_step returned, so accumulating runs compare.
        loss = float(loss_from_output(outputs).detach()) * trainer.accumulate_grad_batches
        self.losses.append(loss)
        if not math.isfinite(loss):
            trainer.should_stop = True


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A Trainer without progress bar, model summary or checkpoints; ``kwargs`` override."""
    opts: dict[str, Any] = {"logger": False, "enable_checkpointing": False,
                            "enable_progress_bar": False, "enable_model_summary": False,
                            "num_sanity_val_steps": 0, "devices": 1}
    opts.update(kwargs)
    return pl.Trainer(**opts)


def build_model(model_factory: ModelFactory, lr: float, weight_decay: float, seed: int,
                init: Mapping[str, torch.Tensor] | None = None) -> pl.LightningModule:
    """``model_factory(lr=, weight_decay=)`` built under ``seed``, loaded with ``init`` if given."""
    pl.seed_everything(seed, verbose=False)
    model = model_factory(lr=lr, weight_decay=weight_decay)
    if not isinstance(model, pl.LightningModule):
        raise TypeError("`model_factory(lr=..., weight_decay=...)` must return a LightningModule, "
                        f"got {type(model).__name__}.")
    if init is not None:
        model.load_state_dict(init)
    pl.seed_everything(seed, verbose=False)  # same data order and dropout masks for every run
    return model


def check_sweep_arguments(*, model_factory: Any, lrs: Any, steps: Any, seed: Any) -> None:
    """Check the arguments :func:`lr_sweep` shares with ``tune``, before any training.

    Example:
        >>> check_sweep_arguments(model_factory=dict, lrs=[0.1, 0.0], steps=100, seed=0)
        Traceback (most recent call last):
        ...
        ValueError: `lrs[1]` must be a finite number > 0, got 0.0.
    """
    check_callable("model_factory", model_factory)
    check_sequence("lrs", lrs, partial(check_number, low=0, low_open=True))
    check_int("steps", steps)
    check_int("seed", seed, low=None)


def lr_sweep(model_factory: ModelFactory, train_dataloaders: Any = None,
             datamodule: pl.LightningDataModule | None = None,
             lrs: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4), steps: int = 100,
             weight_decay: float = 1e-5, seed: int = 0, alpha: float = 0.1,
             run_dir: str | Path | None = None, settings: OptimizationSettings | None = None,
             extend_edge: bool = True, **trainer_kwargs: Any) -> SweepResult:
    """Train a fresh model per learning rate for ``steps`` iterations and pick the best rate.

    Every model starts from the same weights (built under ``seed``), sees the full training data
    in the same order (epochs repeat as needed) with a small ``weight_decay`` and no validation.
    Each run optimizes as the main run does when given its ``settings`` (gradient clipping,
    accumulation, precision) or the same Trainer arguments; ``steps`` counts optimizer steps
    and the curves hold the loss of every batch as ``training_step`` returned it. A scheduler
    that ``configure_optimizers`` returns is stepped as in any fit.
    See :func:`~lightning_diag.functional.curves.pick_learning_rate` for the rule.

    Args:
        model_factory: ``model_factory(lr=..., weight_decay=...)`` returns a fresh LightningModule.
        train_dataloaders: Training loader(s), as for ``Trainer.fit``; or give ``datamodule``.
        lrs: Candidate learning rates (recipe default 1e-1, 1e-2, 1e-3, 1e-4).
        steps: Iterations per learning rate (recipe: 100).
        weight_decay: The small weight decay used for every run.
        seed: Seed of the shared initialization and data order.
        alpha: EMA smoothing factor of the pick rule.
        extend_edge: When the pick is the largest or the smallest of ``lrs`` (two or more),
            sweep once more one step beyond it (the ratio of ``lrs``' neighbours, x10 for the
            recipe's rates) and pick again among all; :meth:`SweepResult.range_note` says so.
        run_dir: Where to write the TensorBoard chart (``sweep/``) and ``sweep.png``.
        settings: The main run's optimization
            (``OptimizationSettings.from_trainer(trainer)``), passed on as Trainer arguments.
        **trainer_kwargs: Passed to ``pl.Trainer`` (e.g. ``accelerator="cpu"``).

    Raises:
        ValueError: no data, or both; a Trainer argument given both here and by ``settings``;
            TypeError/ValueError: a bad argument, named (see :mod:`lightning_diag.validation`).
    """
    if (train_dataloaders is None) == (datamodule is None):
        raise ValueError("Give exactly one of `train_dataloaders` or `datamodule` to lr_sweep.")
    check_sweep_arguments(model_factory=model_factory, lrs=lrs, steps=steps, seed=seed)
    check_number("weight_decay", weight_decay, low=0)
    check_number("alpha", alpha, low=0, high=1, low_open=True)
    check_flag("extend_edge", extend_edge)
    trainer_kwargs = _merged(settings, trainer_kwargs)
    init = build_model(model_factory, float(lrs[0]), weight_decay, seed).state_dict()
    init = {k: v.detach().clone() for k, v in init.items()}
    run = partial(_train_rates, model_factory, init=init, steps=steps, weight_decay=weight_decay,
                  seed=seed, train_dataloaders=train_dataloaders, datamodule=datamodule,
                  trainer_kwargs=trainer_kwargs)
    curves = run(lrs)
    best, scores, bad = pick_learning_rate(curves, alpha=alpha)
    extended = beyond_edge(best, list(curves)) if extend_edge else None
    if extended is not None:
        curves.update(run([extended]))
        best, scores, bad = pick_learning_rate(curves, alpha=alpha)
    smoothed = {lr: smooth_ema(c, alpha).tolist() if c else [] for lr, c in curves.items()}
    edge = _edge(best, list(curves))
    result = SweepResult(best, curves, smoothed, scores, bad, RULE.format(alpha=alpha),
                         extended=extended, edge=edge)
    if run_dir is not None:
        result.png_path = _write_charts(result, Path(run_dir))
    return result


def _merged(settings: OptimizationSettings | None, trainer_kwargs: dict[str, Any]
            ) -> dict[str, Any]:
    """The main run's ``settings`` as Trainer arguments, with ``trainer_kwargs``; one place each.

    Raises:
        ValueError: an argument is given both ways.
    """
    if settings is None:
        return trainer_kwargs
    both = sorted(set(settings.trainer_kwargs()) & set(trainer_kwargs))
    if both:
        raise ValueError(f"`settings` already sets {both}: give them in one place.")
    return {**settings.trainer_kwargs(), **trainer_kwargs}


def _train_rates(model_factory: ModelFactory, rates: Sequence[float], *,
                 init: Mapping[str, torch.Tensor], steps: int, weight_decay: float, seed: int,
                 train_dataloaders: Any, datamodule: pl.LightningDataModule | None,
                 trainer_kwargs: dict[str, Any]) -> dict[float, list[float]]:
    """Each rate's step losses over ``steps`` optimizer steps, from the weights ``init``, every
    rate on the same batches in the same order (a loader's own shuffling generator is rewound
    before each run and after the last)."""
    generators = _generators(train_dataloaders)
    saved = [g.get_state() for g in generators]
    curves: dict[float, list[float]] = {}
    try:
        for lr in rates:
            for g, state in zip(generators, saved, strict=True):
                g.set_state(state)
            model = build_model(model_factory, float(lr), weight_decay, seed, init)
            recorder = _StepLosses()
            trainer = quiet_trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0,
                                    callbacks=[recorder], **trainer_kwargs)
            trainer.fit(model, train_dataloaders=train_dataloaders, datamodule=datamodule)
            curves[float(lr)] = recorder.losses
    finally:
        for g, state in zip(generators, saved, strict=True):
            g.set_state(state)
    return curves


def _edge(best: float, lrs: list[float]) -> str:
    """``"top"`` or ``"bottom"`` when ``best`` is the largest or smallest of two or more
    rates, else ``""``."""
    if len(set(lrs)) < 2:
        return ""
    return "top" if best == max(lrs) else "bottom" if best == min(lrs) else ""


def beyond_edge(best: float, lrs: list[float]) -> float | None:
    """The rate one step beyond the edge ``best`` lies at, or None when it lies inside.

    The step is the ratio of the edge's nearest neighbour to it, so the recipe's decade
    steps give x10 (or /10).

    Example:
        >>> beyond_edge(1e-1, [1e-1, 1e-2, 1e-3, 1e-4]), beyond_edge(1e-4, [1e-1, 1e-4])
        (1.0, 1e-07)
        >>> beyond_edge(1e-2, [1e-1, 1e-2, 1e-3]) is None
        True
    """
    edge = _edge(best, lrs)
    if not edge:
        return None
    rates = sorted(set(lrs))
    step = rates[-1] / rates[-2] if edge == "top" else rates[1] / rates[0]
    return float(f"{best * step if edge == 'top' else best / step:.3g}")


def _generators(loaders: Any) -> list[torch.Generator]:
    """The distinct torch generators of the DataLoaders (and their samplers) in ``loaders``."""
    from torch.utils.data import DataLoader

    if isinstance(loaders, DataLoader):
        found = [loaders.generator, getattr(loaders.sampler, "generator", None),
                 getattr(getattr(loaders.batch_sampler, "sampler", None), "generator", None)]
        unique = {id(g): g for g in found if isinstance(g, torch.Generator)}
        return list(unique.values())
    items = loaders.values() if isinstance(loaders, Mapping) else loaders
    if isinstance(items, (list, tuple)) or isinstance(loaders, Mapping):
        return [g for item in items for g in _generators(item)]
    return []


def _write_charts(result: SweepResult, run_dir: Path) -> Path:
    """All curves on one TensorBoard chart (custom scalars) and one PNG; returns the PNG path."""
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter


    run_dir.mkdir(parents=True, exist_ok=True)
    tags = {lr: sweep_curve(lr) for lr in result.curves}
    writer = SummaryWriter(str(run_dir / "sweep"))
    try:
        merge_custom_scalars(writer, *sweep_layout(list(tags.values())))
        for lr, curve in result.smoothed.items():
            for step, value in enumerate(curve):
                writer.add_scalar(tags[lr], value, step)
        fig, ax = plt.subplots(figsize=(7, 4))
        for lr in sorted(result.curves, reverse=True):
            line, = ax.plot(result.curves[lr], alpha=0.25)
            mark = (" (pick)" if lr == result.best_lr
                    else " (diverged)" if lr in result.diverged else "")
            ax.plot(result.smoothed[lr], color=line.get_color(), label=f"lr={lr:.0e}{mark}")
        ax.set(xlabel="iteration", ylabel="training loss", yscale="log",
               title="Learning-rate sweep (faint: raw, bold: EMA)")
        ax.legend()
        png = run_dir / "sweep.png"
        fig.savefig(png, dpi=100, bbox_inches="tight")
        writer.add_image(TUNING_SWEEP_CHART, figure_to_array(fig), 0, dataformats="HWC")
        writer.add_text(TUNING_SWEEP_TABLE, result.table() + "\n\n" + result.rule)
    finally:
        writer.close()
    return png


@dataclass
class LRComparison:
    """Our sweep's pick next to ``Tuner.lr_find``'s suggestion, each trained for a few epochs."""

    sweep_lr: float
    lr_find_lr: float | None
    metric: str
    epochs: int
    sweep_score: float
    lr_find_score: float | None
    sweep: SweepResult = field(repr=False)

    def table(self) -> str:
        def fmt(x: float | None, spec: str) -> str:
            return "n/a" if x is None else format(x, spec)

        return markdown_table(
            ["method", "suggested lr", f"{self.metric} after {self.epochs} epochs"],
            [["lightning_diag lr_sweep", f"{self.sweep_lr:.2e}", f"{self.sweep_score:.4f}"],
             ["Tuner.lr_find", fmt(self.lr_find_lr, ".2e"), fmt(self.lr_find_score, ".4f")]])


def train_and_score(model_factory: ModelFactory, datamodule: pl.LightningDataModule, lr: float,
                    weight_decay: float, epochs: int, seed: int, metric: str,
                    **trainer_kwargs: Any) -> float:
    """Train a fresh model for ``epochs`` and return ``metric`` after the last validation."""
    model = build_model(model_factory, lr, weight_decay, seed)
    trainer = quiet_trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule)
    value = trainer.callback_metrics.get(metric)
    if value is None:
        raise KeyError(f"`{metric}` was not logged; logged: {sorted(trainer.callback_metrics)}.")
    return float(value)


def compare_with_lr_find(model_factory: ModelFactory, datamodule: pl.LightningDataModule,
                         lrs: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4), steps: int = 100,
                         epochs: int = 3, weight_decay: float = 1e-5, seed: int = 0,
                         metric: str = "val_acc", **trainer_kwargs: Any) -> LRComparison:
    """Run :func:`lr_sweep` and Lightning's ``Tuner.lr_find`` on the same model and data, then
    train ``epochs`` epochs at each suggestion and report ``metric`` (e.g. the digits demo)."""
    from lightning.pytorch.tuner import Tuner

    sweep = lr_sweep(model_factory, datamodule=datamodule, lrs=lrs, steps=steps,
                     weight_decay=weight_decay, seed=seed, **trainer_kwargs)
    model = build_model(model_factory, sweep.best_lr, weight_decay, seed)
    finder = Tuner(quiet_trainer(max_epochs=-1, **trainer_kwargs)).lr_find(  # epochs uncapped
        model, datamodule=datamodule, min_lr=min(lrs) / 10, max_lr=max(lrs) * 10,
        num_training=steps, update_attr=False)
    found = finder.suggestion() if finder is not None else None
    ours = train_and_score(model_factory, datamodule, sweep.best_lr, weight_decay, epochs, seed,
                           metric, **trainer_kwargs)
    theirs = (train_and_score(model_factory, datamodule, float(found), weight_decay, epochs, seed,
                              metric, **trainer_kwargs) if found else None)
    return LRComparison(sweep.best_lr, float(found) if found else None, metric, epochs, ours,
                        theirs, sweep)

"""The main job a newcomer runs: the whole recipe attached to a small CNN on scikit-learn's digits.

``run_demo()`` trains :class:`~lightning_diag.examples.DigitsClassifier` with every callback of
the recipe, prints the findings by severity with their advice, the ``tensorboard --logdir`` line
to run and the path of the HTML report. ``inject=True`` runs the same job on deliberately broken
data and model (duplicated and leaked samples, a mis-scaled last layer, a far too high learning
rate) so that each finding can be seen once.

Example:
    >>> from lightning_diag.examples.demo import run_demo
    >>> result = run_demo("runs/demo", epochs=1, limit_batches=2, progress_bar=False,
    ...                   echo=False)  # doctest: +SKIP
    >>> result.report.exists()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import TensorDataset

from lightning_diag.base import findings as trainer_findings
from lightning_diag.callbacks.activation_histogram import ActivationHistogram
from lightning_diag.callbacks.checkpoint_ensemble import CheckpointEnsemble
from lightning_diag.callbacks.data_inspection import DataInspection
from lightning_diag.callbacks.ema import EMAWeights
from lightning_diag.callbacks.first_layer import FirstLayerVisualization
from lightning_diag.callbacks.gradient_check import GradientCheck
from lightning_diag.callbacks.initial_loss import InitialLossCheck
from lightning_diag.callbacks.invariants import TrainingInvariants
from lightning_diag.callbacks.learning_curves import LearningCurves
from lightning_diag.callbacks.lr_advisor import LRPlateauAdvisor
from lightning_diag.callbacks.overfit import OverfitSmallBatch
from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_diag.findings import Finding, format_findings
from lightning_diag.report import build_report

__all__ = [
    "BrokenDigitsDataModule",
    "DemoResult",
    "mis_scale_last_layer",
    "recipe_callbacks",
    "run_demo",
    "tensorboard_command",
]

# The injected run: a learning rate far above Adam's usual 1e-3 and a last layer 30x too large
# (its initial loss lands far above log(10)).
BROKEN_LR = 0.1
BROKEN_LAST_LAYER_SCALE = 30.0


@dataclass(frozen=True)
class DemoResult:
    """What a demo run produced.

    Attributes:
        log_dir: The run's TensorBoard directory (``<out_dir>/<clean|inject>/version_N``).
        report: The HTML report built from it (``None`` when ``report=False``).
        findings: Every finding of every callback, in callback order.
        tensorboard_command: The exact command that opens the logs, from any shell and
            directory: the ``tensorboard`` next to this Python (a virtualenv's) when there is
            one, and the absolute log directory.
        wall_time_s: Seconds from start to the printed table, report included.
        metrics: The trainer's final logged metrics as floats.
    """

    log_dir: Path
    report: Path | None
    findings: list[Finding]
    tensorboard_command: str
    wall_time_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def recipe_callbacks(every_n_steps: int = 10, every_n_epochs: int = 2,
                     overfit_max_steps: int = 1000) -> list[pl.Callback]:
    """One callback per step of the recipe (docs/workflow.md), as the demo attaches them.

    Args:
        every_n_steps: Logging interval of the activation and update-ratio monitors; the demo
            has ~23 steps per epoch, so the default of 100 would draw only a few points.
        every_n_epochs: Interval of the first-layer filter images.
        overfit_max_steps: Step budget of the small-sample overfitting experiment.
    """
    return [
        DataInspection(),                                   # 1: look at the data
        GradientCheck(),                                    # 2: analytic vs numeric gradients
        InitialLossCheck(),                                 # 3: initial loss ~ log(C)
        OverfitSmallBatch(max_steps=overfit_max_steps),     # 4: overfit a few batches
        LearningCurves(),                                   # 5.1-5.2: curves by epoch
        ActivationHistogram(every_n_steps=every_n_steps),   # 5.3: activations and gradients
        FirstLayerVisualization(every_n_epochs=every_n_epochs),  # 5.4: first-layer filters
        UpdateRatioMonitor(every_n_steps=every_n_steps),    # 5.5: |dw|/|w| ~ 1e-3
        TrainingInvariants(),                               # 5: zero_grad, modes, metrics...
        LRPlateauAdvisor(),                                 # 6.4: read the curves
        EMAWeights(evaluate="both"),                        # 7.4: raw and EMA both validated
        CheckpointEnsemble(),                               # 7.3: checkpoints as an ensemble
    ]


class BrokenDigitsDataModule(DigitsDataModule):
    """Digits with planted data bugs: exact duplicates (some with a conflicting label) and
    validation samples leaked into the training set.

    Args:
        duplicates: Training samples copied once more into the training set.
        conflicting: How many of those copies get a different label.
        leaks: Validation samples copied into the training set.
        **kwargs: Passed to :class:`DigitsDataModule`.
    """

    def __init__(self, duplicates: int = 40, conflicting: int = 10, leaks: int = 30,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        for name, value in (("duplicates", duplicates), ("conflicting", conflicting),
                            ("leaks", leaks)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
        if conflicting > duplicates:
            raise ValueError(f"`conflicting` ({conflicting}) cannot exceed `duplicates` "
                             f"({duplicates}).")
        self.duplicates, self.conflicting, self.leaks = duplicates, conflicting, leaks

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        x, y = self.train_set.tensors
        vx, vy = self.val_set.tensors
        dup_x, dup_y = x[: self.duplicates], y[: self.duplicates].clone()
        dup_y[: self.conflicting] = (dup_y[: self.conflicting] + 1) % 10
        leak_x, leak_y = vx[: self.leaks], vy[: self.leaks]
        self.train_set = TensorDataset(torch.cat([x, dup_x, leak_x]), torch.cat([y, dup_y, leak_y]))


def mis_scale_last_layer(model: nn.Module, factor: float = BROKEN_LAST_LAYER_SCALE) -> nn.Module:
    """Multiply the last ``nn.Linear``'s weight and bias by ``factor`` in place (a classic bad
    initialization: overconfident random logits) and return the model."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("`model` has no nn.Linear layer to scale.")
    with torch.no_grad():
        last[-1].weight.mul_(factor)
        if last[-1].bias is not None:
            last[-1].bias.mul_(factor)
    return model


def tensorboard_command(logdir: str | Path) -> str:
    """The command that opens ``logdir`` in TensorBoard from any shell and directory.

    The ``tensorboard`` executable installed next to the running Python (a virtualenv's
    ``bin/``) is named by its path, since that folder is often not on the ``PATH``; the log
    directory is absolute.

    Example:
        >>> tensorboard_command("runs/demo").endswith(f"--logdir {Path('runs/demo').resolve()}")
        True
    """
    local = Path(sys.executable).parent / "tensorboard"
    exe = shlex.quote(str(local)) if local.is_file() else "tensorboard"
    return f"{exe} --logdir {shlex.quote(str(Path(logdir).resolve()))}"


#: Lightning's lines the demo does not print: advertisements and hardware it does not use.
_LIGHTNING_NOISE = ("\N{ELECTRIC LIGHT BULB} Tip:", "GPU available:", "TPU available:",
                    "HPU available:")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_LIGHTNING_NOISE)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning without its tips and hardware lines, and without a deprecation warning it
    raises against newer torch releases; both only inside the block."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    noise = _DropNoise()
    rank_zero.addFilter(noise)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        rank_zero.removeFilter(noise)


def run_demo(
    out_dir: str | Path = "runs/demo",
    inject: bool = False,
    epochs: int = 10,
    seed: int = 0,
    limit_batches: int | float | None = None,
    progress_bar: bool = True,
    echo: bool = True,
    report: bool = True,
    num_threads: int | None = 1,
    callbacks: list[pl.Callback] | None = None,
) -> DemoResult:
    """Train the digits CNN with the whole recipe attached and summarize what it found.

    Args:
        out_dir: Root of the TensorBoard logs; the run goes to ``<out_dir>/clean`` or
            ``<out_dir>/inject``, one ``version_N`` per run.
        inject: Train on planted data and model bugs instead (see module docstring).
        epochs: Training epochs.
        seed: Seed of everything (data split, initialization, shuffling).
        limit_batches: Limit of train and val batches per epoch (tests and quick looks).
        progress_bar: Show Lightning's progress bar.
        echo: Print the findings table, the TensorBoard command and the report path.
        report: Build the HTML report at the end.
        num_threads: Torch intra-op threads during the run (restored afterwards); ``None`` keeps
            the current setting. One thread is the default because this tiny CNN gains nothing
            from more, and on a busy 2-core machine two threads made an epoch ~10x slower
            (oversubscription) in our measurements.
        callbacks: The callbacks to attach; default :func:`recipe_callbacks()`.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be a positive int, got {epochs!r}.")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"`num_threads` must be a positive int or None, got {num_threads!r}.")
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(Path(out_dir), inject, epochs, seed, limit_batches, progress_bar, echo, report,
                    recipe_callbacks() if callbacks is None else callbacks)
    finally:
        torch.set_num_threads(threads_before)


def _run(out_dir: Path, inject: bool, epochs: int, seed: int, limit_batches: int | float | None,
         progress_bar: bool, echo: bool, report: bool, callbacks: list[pl.Callback]) -> DemoResult:
    start = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    name = "inject" if inject else "clean"
    dm: DigitsDataModule = BrokenDigitsDataModule(seed=seed) if inject else DigitsDataModule(
        seed=seed)
    model = DigitsClassifier(arch="cnn", lr=BROKEN_LR if inject else 1e-3)
    if inject:
        mis_scale_last_layer(model)
    logger = TensorBoardLogger(str(out_dir), name=name, default_hp_metric=False)
    with _quiet_lightning():  # limits of None: all batches, without Lightning saying so
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger,
                             callbacks=callbacks, enable_progress_bar=progress_bar,
                             default_root_dir=str(out_dir), num_sanity_val_steps=0,
                             log_every_n_steps=5, deterministic=True,
                             limit_train_batches=limit_batches, limit_val_batches=limit_batches)
        trainer.fit(model, datamodule=dm)
    log_dir = Path(logger.log_dir)
    logger.experiment.flush()
    found = trainer_findings(trainer)
    html = build_report(log_dir) if report else None
    command = tensorboard_command(out_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = DemoResult(log_dir, html, found, command, time.perf_counter() - start, metrics)
    if echo:
        print("\n" + format_findings(found))
        print(f"\nTensorBoard:  {command}")
        if html is not None:
            print(f"HTML report:  {html}")
        print(f"Wall time:    {result.wall_time_s:.1f} s")
    return result

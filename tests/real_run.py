"""One real run with every callback attached, shared by the tag-registry and report tests.

A small CNN (tanh, so saturation is measured; a Conv2d, so there are filters to draw) trains for
three short epochs on digits with planted data problems: an exact and a near duplicate and a
blank image in each split, and validation samples copied from the training set (a FAIL).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import TensorDataset

from lightning_diag.base import DiagnosticCallback
from lightning_diag.findings import DiagnosticWarning
from tests.helpers import Classifier, cnn, digits, loader, trainer
from tests.shared_cases import run_callbacks

#: The planted problems: the training index a validation sample copies, and the blank ones.
LEAKED_TRAIN_INDEX = 20
TRAIN_DUPLICATE = (3, 10)
TRAIN_BLANK = 5


@dataclass
class RealRun:
    root: Path  # the trainer's root: the report is built from here
    log_dir: Path  # the TensorBoard run (``root/tb/version_0``)
    callbacks: list[DiagnosticCallback]


def _planted() -> tuple[TensorDataset, TensorDataset]:
    x, y = digits(256).tensors
    x, y, xv, yv = x[:192].clone(), y[:192].clone(), x[192:].clone(), y[192:].clone()
    first, copy = TRAIN_DUPLICATE
    x[copy], y[copy] = x[first], y[first]
    x[11] = x[4] + 1e-4  # a near duplicate
    x[TRAIN_BLANK] = 0.0
    xv[0], yv[0] = x[LEAKED_TRAIN_INDEX], y[LEAKED_TRAIN_INDEX]
    xv[2], yv[2] = xv[1], yv[1]
    xv[4] = xv[3] + 1e-4
    xv[5] = 0.0
    return TensorDataset(x, y), TensorDataset(xv, yv)


def callbacks() -> list[DiagnosticCallback]:
    """Every callback of lightning_diag.callbacks, set for a run of a few steps (the ``run``
    arguments its test file declares in ``SHARED``)."""
    return run_callbacks()


def real_run(root: Path) -> RealRun:
    """Fit the planted digits with every callback; TensorBoard under ``root/tb/version_0``."""
    train, val = _planted()
    cbs = callbacks()
    pl.seed_everything(0, verbose=False)
    model = Classifier(cnn(act=nn.Tanh, dropout=0.0), lr=3e-3)
    run = trainer(root, cbs, max_epochs=3, limit_train_batches=3, limit_val_batches=1)
    with warnings.catch_warnings():  # the planted problems are found: no need to hear of them
        warnings.simplefilter("ignore", DiagnosticWarning)
        run.fit(model, loader(train, 32), loader(val, 64, shuffle=False))
    assert run.logger is not None and run.logger.log_dir is not None
    return RealRun(root, Path(run.logger.log_dir), cbs)

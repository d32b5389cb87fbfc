"""Shared plumbing of the fit-start checks: reading the first batches and stamping findings."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl

from lightning_diag.base import FitStartCheck
from lightning_diag.findings import Finding
from lightning_diag.isolation import first_batches, preserved_rng, train_dataloader_of

__all__ = ["fit_start_batches", "stamp"]


def fit_start_batches(
    check: FitStartCheck, trainer: pl.Trainer, pl_module: pl.LightningModule, num_batches: int
) -> tuple[list[Any], list[Finding]]:
    """The first ``num_batches`` training batches, or no batch and an info ``<slug>.skipped``.

    The user's sampler and the global RNG streams are left untouched.
    """
    try:
        loader = train_dataloader_of(trainer)
        with preserved_rng():
            return first_batches(loader, num_batches, pl_module.device), []
    except ValueError as err:  # no loader, not a DataLoader, or an empty dataset
        return [], [check.skipped(trainer, str(err))]


def stamp(check: FitStartCheck, trainer: pl.Trainer, found: list[Finding]) -> list[Finding]:
    """Findings of a Trainer-free check function, stamped with this callback and the step."""
    return [
        dataclasses.replace(f, check=check.check_name, step=trainer.global_step,
                            epoch=trainer.current_epoch)
        for f in found
    ]

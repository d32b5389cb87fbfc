"""Validation of a copy of the module holding other weights (used by ``EMAWeights``).

Example:
    >>> from lightning_diag.callbacks._validate_copy import validate_copy
    >>> validate_copy(trainer, pl_module, ema.ema_state_dict())  # doctest: +SKIP
    {'val_loss': 0.31, 'val_acc': 0.92}
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_diag.batch import call_user
from lightning_diag.inference.logged import LoggedMetrics, reset_metrics
from lightning_diag.isolation import clone_module, preserved_rng

__all__ = ["validate_copy"]


def validate_copy(trainer: pl.Trainer, pl_module: pl.LightningModule,
                   weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Run ``validation_step`` of a copy holding ``weights`` over the validation batches.

    Returns the epoch value of everything the step logs: batch-size-weighted means of tensors,
    ``compute()`` of torchmetrics objects (reset first on the copy).

    Raises:
        UserCodeError: the copy's ``validation_step`` raised.
    """
    logs = LoggedMetrics()
    with preserved_rng(), torch.no_grad():
        clone = clone_module(pl_module)
        clone.load_state_dict(weights)
        reset_metrics(clone)
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        limits = trainer.num_val_batches
        for dl_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=False)):
            for idx, batch in enumerate(loader):
                if idx >= limit:
                    break
                batch = move_data_to_device(batch, pl_module.device)
                args = (batch, idx, dl_idx) if len(loaders) > 1 else (batch, idx)
                with logs.attached(clone, batch):
                    call_user(f"`{type(pl_module).__name__}.validation_step`",
                              clone.validation_step, *args)
    return logs.values()

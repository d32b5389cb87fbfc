"""Validation of a copy of the module holding other weights (used by ``EMAWeights``).

Example:
    >>> from lightning_diag.callbacks._validate_copy import validate_copy
    >>> validate_copy(trainer, pl_module, ema.ema_state_dict())  # doctest: +SKIP
    {'val_loss': 0.31, 'val_acc': 0.92}
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.data import extract_batch_size

from lightning_diag.isolation import clone_module, preserved_rng

__all__ = ["validate_copy"]


def validate_copy(trainer: pl.Trainer, pl_module: pl.LightningModule,
                   weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Run ``validation_step`` of a copy holding ``weights`` over the validation batches.

    Returns the epoch value of everything the step logs: batch-size-weighted means of tensors,
    ``compute()`` of torchmetrics objects (reset first on the copy).
    """
    from torchmetrics import Metric

    sums: dict[str, list[float]] = {}
    metrics: dict[str, Metric] = {}
    current = {"batch_size": 1}  # Lightning's default weight: the size inferred from the batch

    def capture(name: str, value: Any, *args: Any, batch_size: int | None = None,
                **kwargs: Any) -> None:
        if isinstance(value, Metric):
            metrics[name] = value
            return
        n = float(batch_size or current["batch_size"])
        total = sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * n
        total[1] += n

    def capture_dict(values: Any, *args: Any, batch_size: int | None = None, **kw: Any) -> None:
        for name, value in values.items():
            capture(name, value, batch_size=batch_size)

    with preserved_rng(), torch.no_grad():
        clone = clone_module(pl_module)
        clone.load_state_dict(weights)
        for m in clone.modules():
            if isinstance(m, Metric):
                m.reset()
        clone.log = capture  # type: ignore[method-assign]
        clone.log_dict = capture_dict  # type: ignore[method-assign,assignment]
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        limits = trainer.num_val_batches
        for dl_idx, (loader, limit) in enumerate(zip(loaders, limits, strict=False)):
            for idx, batch in enumerate(loader):
                if idx >= limit:
                    break
                batch = move_data_to_device(batch, pl_module.device)
                try:
                    current["batch_size"] = extract_batch_size(batch)
                except MisconfigurationException:  # no tensor to size: an unweighted mean
                    current["batch_size"] = 1
                args = (batch, idx, dl_idx) if len(loaders) > 1 else (batch, idx)
                clone.validation_step(*args)
        out = {k: s / n for k, (s, n) in sums.items() if n}
        out.update({k: float(m.compute()) for k, m in metrics.items()})
    return out

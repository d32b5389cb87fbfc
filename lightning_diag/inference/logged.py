"""What a module's own step logs, captured outside the Trainer and reduced as Lightning reduces
it at epoch end: the batch-size-weighted mean of each value, ``compute()`` of a torchmetrics
object logged as such. The ensemble's comparison and EMA's validation of the averaged weights
read the user's own metrics this way.

Example:
    >>> import torch, lightning.pytorch as pl
    >>> class M(pl.LightningModule):
    ...     def validation_step(self, batch, batch_idx):
    ...         self.log("val_loss", batch.float().mean())
    >>> module, logs = M(), LoggedMetrics()
    >>> for i, batch in enumerate([torch.zeros(3), torch.ones(1)]):
    ...     with logs.attached(module, batch):
    ...         module.validation_step(batch, i)
    >>> logs.values(), "log" in vars(module)
    ({'val_loss': 0.25}, False)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.data import extract_batch_size

__all__ = ["LoggedMetrics", "reset_metrics"]

_PATCHED = ("log", "log_dict")


class LoggedMetrics:
    """Collects what ``self.log`` / ``self.log_dict`` receive while attached to a module."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}
        self._metrics: dict[str, Any] = {}
        self._batch_size = 1

    def log(self, name: str, value: Any, *args: Any, batch_size: int | None = None,
            **kwargs: Any) -> None:
        """Stands in for ``LightningModule.log``; every other argument is accepted, unused."""
        from torchmetrics import Metric

        if isinstance(value, Metric):  # Lightning logs its compute() at epoch end
            self._metrics[name] = value
            return
        n = float(batch_size or self._batch_size)
        total = self._sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * n
        total[1] += n

    def log_dict(self, values: Mapping[str, Any], *args: Any, batch_size: int | None = None,
                 **kwargs: Any) -> None:
        """Stands in for ``LightningModule.log_dict``."""
        for name, value in values.items():
            self.log(name, value, batch_size=batch_size)

    @contextmanager
    def attached(self, module: torch.nn.Module, batch: Any) -> Iterator[None]:
        """Record ``module``'s logging of one step on ``batch`` here; restored on exit.

        Values are weighted by the batch size Lightning would infer from ``batch`` unless the
        step passes ``batch_size=``.
        """
        try:
            self._batch_size = extract_batch_size(batch)
        except MisconfigurationException:  # no tensor to size: an unweighted mean
            self._batch_size = 1
        saved = {name: vars(module)[name] for name in _PATCHED if name in vars(module)}
        vars(module).update(log=self.log, log_dict=self.log_dict)  # instance over class method
        try:
            yield
        finally:
            for name in _PATCHED:
                if name in saved:
                    vars(module)[name] = saved[name]
                else:
                    vars(module).pop(name, None)

    def values(self) -> dict[str, float]:
        """The epoch value of everything logged so far, by name."""
        out = {k: s / n for k, (s, n) in self._sums.items() if n}
        out.update({k: float(m.compute()) for k, m in self._metrics.items()})
        return out


def reset_metrics(module: torch.nn.Module) -> None:
    """Reset every torchmetrics object inside ``module``, so that a run starts from no state."""
    from torchmetrics import Metric

    for m in module.modules():
        if isinstance(m, Metric):
            m.reset()

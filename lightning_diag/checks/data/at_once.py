"""Samples of a :class:`TensorDataset` (or a :class:`Subset` of one) read all at once: the
inputs and targets the default readers take from each sample, without a Python call per sample.

Example:
    >>> import torch
    >>> from torch.utils.data import Subset, TensorDataset
    >>> from lightning_diag.checks.data.config import InspectionConfig
    >>> data = Subset(TensorDataset(torch.arange(10.0).reshape(5, 2), torch.arange(5)), [4, 0, 2])
    >>> x, y = read_at_once(data, InspectionConfig(), [0, 2], (2,))
    >>> x.tolist(), y.tolist()
    ([[8.0, 9.0], [4.0, 5.0]], [4, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Subset, TensorDataset

from lightning_diag.batch import default_batch_to_input, default_batch_to_target
from lightning_diag.checks.data.config import InspectionConfig

__all__ = ["read_at_once"]


def read_at_once(dataset: Any, config: InspectionConfig, indices: list[int],
                 shape: tuple[int, ...] | None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The inputs (stacked, on the CPU) and targets (None without) of the samples at
    ``indices``, as the default readers take them from ``dataset[i]`` one by one; None unless
    ``dataset`` is exactly a :class:`TensorDataset` or a :class:`Subset` of one (a subclass may
    change what ``__getitem__`` returns), read with the default readers, with inputs of
    ``shape``."""
    if not (config.batch_to_input is default_batch_to_input
            and config.batch_to_target is default_batch_to_target):
        return None
    select = torch.as_tensor(indices, dtype=torch.long)
    if type(dataset) is Subset:
        select = torch.as_tensor(dataset.indices, dtype=torch.long)[select]
        dataset = dataset.dataset
    if type(dataset) is not TensorDataset or not dataset.tensors:
        return None
    tensors = dataset.tensors
    if tuple(tensors[0].shape[1:]) != shape:
        return None
    # a sample is ``tuple(t[i] for t in tensors)``: its input ``t[0][i]``, target ``t[1][i]``
    y = tensors[1][select] if len(tensors) > 1 else None
    return tensors[0][select].detach().cpu(), y

"""Every global random stream captured and restored: side experiments leave them as they were.

Example:
    >>> import torch
    >>> from lightning_diag.isolation import preserved_rng
    >>> before = torch.get_rng_state()
    >>> with preserved_rng():
    ...     _ = torch.rand(3)
    >>> torch.equal(before, torch.get_rng_state())
    True
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState", "preserved_rng"]


@dataclass
class RNGState:
    """Every global random stream: Python, NumPy, torch CPU and every CUDA device."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)


@contextmanager
def preserved_rng() -> Iterator[RNGState]:
    """Restore every global RNG stream on exit, even when the body raises."""
    state = RNGState.capture()
    try:
        yield state
    finally:
        state.restore()

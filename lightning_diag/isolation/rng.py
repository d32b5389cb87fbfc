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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState", "preserved_generators", "preserved_rng"]


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
        return cls(random.getstate(), _numpy_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)


def _numpy_state() -> tuple[Any, ...]:
    """NumPy's global state, its key as a list of ints: ``np.random.set_state`` copies a key
    item by item, 30 times faster from a list than from the array ``get_state`` returns (the
    same values: the stream it restores is the same). Side experiments restore it hundreds of
    times a fit."""
    name, key, *rest = np.random.get_state(legacy=True)
    return (name, np.asarray(key).tolist(), *rest)


@contextmanager
def preserved_rng() -> Iterator[RNGState]:
    """Restore every global RNG stream on exit, even when the body raises."""
    state = RNGState.capture()
    try:
        yield state
    finally:
        state.restore()


#: How deep :func:`preserved_generators` looks for generators inside an object's attributes
#: (a ConcatDataset's list, a part, its transform, the transform's generator: 4).
_GENERATOR_DEPTH = 4
#: Items of a list, tuple or dict attribute looked at (a ConcatDataset's datasets, a
#: Compose's transforms): more means a container of data, not of parts.
_GENERATOR_ITEMS = 64


@contextmanager
def preserved_generators(*holders: Any) -> Iterator[None]:
    """Restore on exit the random generators that ``holders`` (datasets, usually) keep as
    their own: ``torch.Generator``, NumPy ``Generator``/``RandomState`` and ``random.Random``
    attributes, found in their attributes and in those of the datasets, transforms and
    containers they hold (a few levels deep). A side experiment that reads samples draws from
    them as the run's loader does; put back, the run's augmentations are those of a run
    without it. The global streams are :func:`preserved_rng`'s.

    Example:
        >>> import numpy as np
        >>> class Noisy:
        ...     def __init__(self):
        ...         self.rng = np.random.default_rng(0)
        ...     def __getitem__(self, i):
        ...         return self.rng.random()
        >>> data = Noisy()
        >>> first = data[0]
        >>> with preserved_generators(data):
        ...     second = data[0]
        >>> data[0] == second != first  # the draw after is the one the block made
        True
    """
    found: dict[int, Any] = {}
    for holder in holders:
        _find_generators(holder, found, 0, set())
    states = [(g, _get_state(g)) for g in found.values()]
    try:
        yield
    finally:
        for g, state in states:
            _set_state(g, state)


def _find_generators(obj: Any, found: dict[int, Any], depth: int, seen: set[int]) -> None:
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, torch.Tensor,
                                                           np.ndarray, type, ModuleType)):
        return  # data, and classes and modules (whose attributes are not the holder's own)
    seen.add(id(obj))
    if isinstance(obj, (torch.Generator, np.random.Generator, np.random.RandomState,
                        random.Random)):
        found[id(obj)] = obj
        return
    if depth >= _GENERATOR_DEPTH:
        return
    if isinstance(obj, (list, tuple)):
        items: Any = obj[:_GENERATOR_ITEMS] if len(obj) <= _GENERATOR_ITEMS else ()
    elif isinstance(obj, Mapping):
        items = list(obj.values()) if len(obj) <= _GENERATOR_ITEMS else ()
    else:
        items = list(vars(obj).values()) if hasattr(obj, "__dict__") else ()
    for item in items:
        _find_generators(item, found, depth + 1, seen)


def _get_state(g: Any) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    if isinstance(g, np.random.RandomState):
        return g.get_state()
    return g.getstate()


def _set_state(g: Any, state: Any) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    elif isinstance(g, np.random.RandomState):
        g.set_state(state)
    else:
        g.setstate(state)

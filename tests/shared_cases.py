"""What the shared tests need of each callback, declared once, in the callback's own test file.

The tests that run every callback (the real run every registry test reads, the guard's fault
injection, the bad value of every argument, the state keys) read their arguments from
``SHARED``, a :class:`Shared` that ``tests/test_<module>.py`` declares for the callback of
``lightning_diag/callbacks/<module>.py``. A new callback gets into all of them by declaring its
``SHARED``; ``tests/test_completeness.py`` fails until it does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning_diag.callbacks as callbacks
from lightning_diag.base import DiagnosticCallback

Pair = tuple[DiagnosticCallback, DiagnosticCallback]
#: For a stateful callback: a pair configured differently (given a folder), the value that
#: differs, and a state planted when the runs themselves leave both equal.
StateCase = tuple[Callable[[Path], Pair], Callable[[Any], Any], Callable[[Any], None] | None]
T, V = TypeError, ValueError


@dataclass(frozen=True)
class Shared:
    """One callback's arguments for the shared tests.

    Attributes:
        cls: The callback.
        run: Its arguments in ``tests/real_run.py`` (a few steps on planted digits).
        guard: Its arguments in ``tests/test_guard.py`` (2 epochs of 2 batches of 2 digits).
        bad: For ``tests/test_bad_input.py``: bad values of every constructor argument and the
            exception each must raise (TypeError: a wrong type, ValueError: a bad value).
        state: For ``tests/test_state_keys.py``, if the callback has state.
    """

    cls: type[DiagnosticCallback]
    run: dict[str, Any]
    guard: dict[str, Any]
    bad: list[tuple[str, Any, type[Exception]]]
    state: StateCase | None = field(default=None)


def declaring_module(cls: type) -> str:
    """The test file that declares ``cls``'s :class:`Shared`: ``tests.test_<module>``."""
    return "tests.test_" + cls.__module__.rsplit(".", 1)[1]


def declared() -> dict[str, Shared]:
    """Each callback of ``lightning_diag.callbacks.__all__`` whose test file declares its
    ``SHARED``, by class name, in ``__all__`` order (the others: :func:`missing`)."""
    found = {}
    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        module = declaring_module(cls)
        try:
            shared = getattr(importlib.import_module(module), "SHARED", None)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
            continue  # no test file yet
        if isinstance(shared, Shared) and shared.cls is cls:
            found[name] = shared
    return found


def missing() -> list[str]:
    """The callbacks whose test file declares no ``SHARED`` for them."""
    have = declared()
    return [name for name in callbacks.__all__ if name not in have]


def run_callbacks() -> list[DiagnosticCallback]:
    """Every declared callback, built with its ``run`` arguments."""
    return [shared.cls(**shared.run) for shared in declared().values()]

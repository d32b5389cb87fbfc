"""The registry of the module and tensor hooks a callback puts on the user's model.

Example:
    >>> import torch
    >>> hooks = HookRegistry()
    >>> layer = torch.nn.Linear(2, 2)
    >>> hooks.forward(layer, lambda m, i, o: 1 / 0)
    >>> len(hooks), len(layer._forward_hooks)
    (1, 1)
    >>> _ = layer(torch.zeros(1, 2))  # the user's forward goes on
    >>> len(layer._forward_hooks), type(hooks.pop_error()[1]).__name__
    (0, 'ZeroDivisionError')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["HookRegistry"]


class HookRegistry:
    """Keeps every module and tensor hook a callback registers, so that all can be removed at
    once, and guards them: these hooks run inside the user's own forward and backward passes,
    where an error of ours would end the user's step.

    A hook registered through :meth:`forward` or :meth:`tensor` that raises is removed with all
    the others, and its error is kept for the owning callback's next Lightning hook, which
    reports it as ``<slug>.error`` (see :class:`~lightning_diag.base.DiagnosticCallback`); with
    ``strict`` it is raised where it happened.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._handles: list[RemovableHandle] = []
        self._error: tuple[str, Exception] | None = None

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def forward(self, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
        """Register a guarded forward hook on ``module`` and keep its handle."""
        self.add(module.register_forward_hook(self._guarded(fn, "a forward hook")))

    def tensor(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> None:
        """Register a guarded gradient hook on ``tensor`` and keep its handle."""
        self.add(tensor.register_hook(self._guarded(fn, "a gradient hook")))

    def _guarded(self, fn: Callable[..., Any], where: str) -> Callable[..., Any]:
        def hook(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as err:
                if self.strict:
                    raise
                if self._error is None:
                    self._error = (where, err)
                self.remove_all()
                return None

        return hook

    def pop_error(self) -> tuple[str, Exception] | None:
        """The first error a guarded hook raised since the last call (where, exception)."""
        error, self._error = self._error, None
        return error

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

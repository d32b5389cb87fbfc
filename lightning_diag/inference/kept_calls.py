"""A module's call kept with its arguments, to reuse its output for a later call with the same
arguments (:func:`~lightning_diag.inference.ensemble.evaluate_members`: each member's prediction
of its own step stands in for the ensemble's call, instead of running the member twice).

Example:
    >>> import torch
    >>> x = torch.ones(2, 3)
    >>> kept = KeptCall.of((x,), {}, torch.zeros(2))
    >>> kept.same(leaves(((x,), {}))), kept.same(leaves(((x.clone(),), {})))
    (True, True)
    >>> _ = x.add_(1)  # changed in place since: not the same arguments any more
    >>> kept.same(leaves(((x,), {}))), kept.same(leaves(((torch.zeros(2, 3),), {})))
    (False, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_diag.functional.task import select_output

__all__ = ["KeptCall", "leaves", "same_arguments"]


@dataclass(frozen=True)
class KeptCall:
    """One call of a module: its arguments flattened (:func:`leaves`), the versions of their
    tensors then, its output, and the version of the output's prediction then."""

    arguments: list[Any]
    versions: list[int]
    output: Any
    version: int

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> KeptCall:
        flat = leaves((args, kwargs))
        return cls(flat, [_version(v) for v in flat], output, _version(select_output(output)))

    def same(self, arguments: list[Any]) -> bool:
        """Whether a call with ``arguments`` (flattened) may take this call's output: its
        prediction unchanged since and the arguments the same (:func:`same_arguments`)."""
        prediction = select_output(self.output)
        return (prediction is not None and prediction._version == self.version
                and same_arguments(arguments, self.arguments, self.versions))


def leaves(value: Any) -> list[Any]:
    """The arguments of a call flattened: containers' types, lengths and keys, then leaves."""
    if isinstance(value, (tuple, list)):
        return [type(value), len(value), *(x for v in value for x in leaves(v))]
    if isinstance(value, dict):
        return [dict, tuple(value), *(x for v in value.values() for x in leaves(v))]
    return [value]


def _version(value: Any) -> int:
    """A tensor's count of in-place changes (-1 for anything else)."""
    return value._version if isinstance(value, torch.Tensor) else -1


def same_arguments(now: list[Any], then: list[Any], versions: list[int]) -> bool:
    """Whether the arguments ``now`` are those a kept call got (``then``, each tensor at the
    recorded ``versions``): the same objects (tensors unchanged since) or equal tensors, and
    equal plain values (numbers, strings, None, types)."""
    if len(now) != len(then):
        return False
    for a, b, version in zip(now, then, versions, strict=True):
        if isinstance(b, torch.Tensor):
            if b._version != version or not isinstance(a, torch.Tensor):
                return False
            if a is not b and (a.shape != b.shape or a.dtype != b.dtype
                               or a.device != b.device or not torch.equal(a, b)):
                return False
        elif a is not b and not (type(a) is type(b) and isinstance(a, _PLAIN) and a == b):
            return False
    return True


_PLAIN = (int, float, complex, str, bytes, type, type(None))

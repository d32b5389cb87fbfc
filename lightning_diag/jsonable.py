"""Python values as strict JSON and back, for the finding records (``findings.jsonl``).

Tensors and numpy values become numbers or lists, dataclasses dicts, tuples lists, enums their
value, anything else its ``repr``: :func:`to_json` never raises. Strict JSON has no NaN or
infinity, so non-finite floats are written as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (which JavaScript's ``Number()`` and Python's ``float()`` both parse), and
:func:`from_json` reads them back as floats. Torch and numpy are never imported here: a value
can only be one of theirs when its library is already loaded, so reading records (``lightning-diag
check``) starts without them.

Example:
    >>> to_json({"loss": float("nan"), "shape": (2, 3)})
    {'loss': 'NaN', 'shape': [2, 3]}
    >>> from_json({"loss": "NaN"})
    {'loss': nan}
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["NON_FINITE", "from_json", "integer", "number", "optional_int", "optional_number",
           "pair", "text", "to_json"]

#: The strings strict JSON holds non-finite numbers as, and their values.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_json(obj: Any, active: frozenset[int] = frozenset()) -> Any:
    """``obj`` as strict-JSON data; ``active`` guards cycles (a container inside itself)."""
    if isinstance(obj, enum.Enum):
        return to_json(obj.value, active)
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else _spelled(obj)
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if numpy is not None and isinstance(obj, (numpy.generic, numpy.ndarray)):
        return to_json(obj.tolist(), active)
    if torch is not None and isinstance(obj, torch.Tensor):
        try:
            return to_json(obj.detach().cpu().tolist(), active)
        except (RuntimeError, NotImplementedError):  # e.g. a meta tensor has no values to copy
            return _safe_repr(obj)
    if isinstance(obj, os.PathLike):
        return to_json(os.fspath(obj), active)
    is_dataclass = dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    if not (is_dataclass or isinstance(obj, (Mapping, list, tuple, set, frozenset))):
        return _safe_repr(obj)
    if id(obj) in active:
        return "..."
    inner = active | {id(obj)}
    if is_dataclass:
        return {f.name: to_json(getattr(obj, f.name), inner) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {_key(k): to_json(v, inner) for k, v in obj.items()}
    return [to_json(v, inner) for v in obj]


def _spelled(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _key(key: Any) -> str:
    value = key.value if isinstance(key, enum.Enum) else key
    return value if isinstance(value, str) else str(value)


def _safe_repr(obj: Any) -> str:
    try:
        return repr(obj)
    # A user object's __repr__ may raise anything, and the record must still be written.
    except Exception:
        return f"<{type(obj).__name__} object>"


def from_json(obj: Any) -> Any:
    """JSON data with the non-finite spellings read back as floats."""
    if isinstance(obj, str):
        return NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


def text(x: Any) -> str:
    if not isinstance(x, str):
        raise TypeError(f"expected a string, got {x!r}")
    return x


def number(x: Any) -> float:
    if isinstance(x, str) and x in NON_FINITE:
        return NON_FINITE[x]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"expected a number, got {x!r}")
    return x


def optional_number(x: Any) -> float | None:
    return None if x is None else number(x)


def pair(x: list[Any]) -> tuple[float, float]:
    if len(x) != 2:
        raise TypeError(f"`expected` is a number or a (low, high) pair, got {x!r}")
    return number(x[0]), number(x[1])


def integer(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected an integer, got {x!r}")
    return x


def optional_int(x: Any) -> int | None:
    return None if x is None else integer(x)

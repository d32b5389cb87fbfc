"""Checks of constructor arguments, with one message style and one rule for the exception type.

Every check raises with the message ``"`name` must be <allowed>, got <value!r>."`` and picks the
exception by one rule:

* :class:`TypeError` when the value has the wrong type: a string for a number, a bool for an int
  (``True`` is an ``int`` to Python, never a count here), a float for an int, a number for a flag,
  something not callable for a function;
* :class:`ValueError` when the type is right but the value is not allowed: out of range, NaN or
  infinite, not one of the choices, an empty name, a sequence of the wrong length.

``optional=True`` also accepts None (the message then says ``... or None``). Sequence items are
checked one by one and named ``name[i]``. A relation between two arguments is checked with
:func:`require`, which raises a ValueError in the same style.

Example:
    >>> from lightning_diag.validation import check_int, check_number
    >>> check_int("every_n_steps", 50)
    >>> check_int("every_n_steps", True)
    Traceback (most recent call last):
    ...
    TypeError: `every_n_steps` must be an int >= 1, got True.
    >>> check_number("decay", 1.0, low=0, high=1, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: `decay` must be a number in [0, 1), got 1.0.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "argument",
    "check_callable",
    "check_choice",
    "check_flag",
    "check_int",
    "check_number",
    "check_sequence",
    "check_str",
    "from_arguments",
    "key_arguments",
    "require",
    "validate_arguments",
]

T = TypeVar("T")
R = TypeVar("R")


def require(ok: bool, name: str, value: Any, allowed: str,
            error: type[Exception] = ValueError) -> None:
    """Raise ``error("`name` must be <allowed>, got <value!r>.")`` unless ``ok``.

    For what the other checks cannot say alone, such as a relation between two arguments.

    Example:
        >>> require(0.1 < 0.05, "high", 0.05, "a number > `low` (0.1)")
        Traceback (most recent call last):
        ...
        ValueError: `high` must be a number > `low` (0.1), got 0.05.
    """
    if not ok:
        raise error(f"`{name}` must be {allowed}, got {value!r}.")


def _or_none(allowed: str, optional: bool) -> str:
    return f"{allowed} or None" if optional else allowed


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bound_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def text(x: float) -> str:
        return f"{x:g}" if isinstance(x, float) else str(x)

    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {text(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {text(high)}"
    return ""


def _within(value: float, low: float | None, high: float | None, low_open: bool,
            high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def check_int(name: str, value: Any, *, low: int | None = 1, high: int | None = None,
              optional: bool = False) -> None:
    """An int (never a bool) in ``[low, high]``; the default is a positive int.

    Example:
        >>> check_int("figure_every_n_logs", 0, low=0)
        >>> check_int("seed", "0", low=None)
        Traceback (most recent call last):
        ...
        TypeError: `seed` must be an int, got '0'.
    """
    if optional and value is None:
        return
    allowed = _or_none(f"an int{_bound_text(low, high, False, False)}", optional)
    require(_is_int(value), name, value, allowed, TypeError)
    require(_within(value, low, high, False, False), name, value, allowed)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """A finite int or float (never a bool) between ``low`` and ``high``.

    ``low_open`` / ``high_open`` leave an end out of the range: ``low=0, low_open=True`` is
    ``> 0``; ``low=0, high=1, high_open=True`` is ``[0, 1)``. NaN and infinities are refused.

    Example:
        >>> check_number("factor", 0.0, low=0, high=1, low_open=True, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `factor` must be a number in (0, 1), got 0.0.
        >>> check_number("tolerance", float("inf"), low=0, low_open=True, optional=True)
        Traceback (most recent call last):
        ...
        ValueError: `tolerance` must be a finite number > 0 or None, got inf.
    """
    if optional and value is None:
        return
    bounded = low is not None and high is not None
    kind = "a number" if bounded else "a finite number"
    allowed = _or_none(f"{kind}{_bound_text(low, high, low_open, high_open)}", optional)
    require(_is_number(value), name, value, allowed, TypeError)
    require(math.isfinite(value) and _within(value, low, high, low_open, high_open),
            name, value, allowed)


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    """A real bool: ``1``, ``"yes"`` and ``None`` (unless ``optional``) are refused.

    Example:
        >>> check_flag("kinks", None, optional=True)
        >>> check_flag("act", 1)
        Traceback (most recent call last):
        ...
        TypeError: `act` must be a bool, got 1.
    """
    if optional and value is None:
        return
    require(isinstance(value, bool), name, value, _or_none("a bool", optional), TypeError)


def check_choice(name: str, value: Any, choices: Sequence[Any], *,
                 optional: bool = False) -> None:
    """One of ``choices``; a value of another type than every choice is a TypeError.

    Example:
        >>> check_choice("mode", "avg", ("min", "max"))
        Traceback (most recent call last):
        ...
        ValueError: `mode` must be one of 'min', 'max', got 'avg'.
    """
    if optional and value is None:
        return
    allowed = _or_none("one of " + ", ".join(repr(c) for c in choices), optional)
    same_type = any(type(value) is type(c) for c in choices)
    require(same_type, name, value, allowed, TypeError)
    require(value in choices, name, value, allowed)


def check_callable(name: str, value: Any, *, optional: bool = False) -> None:
    """Something callable (a function, a class, an object with ``__call__``).

    Example:
        >>> check_callable("batch_to_input", 3)
        Traceback (most recent call last):
        ...
        TypeError: `batch_to_input` must be callable, got 3.
    """
    if optional and value is None:
        return
    require(callable(value), name, value, _or_none("callable", optional), TypeError)


def check_str(name: str, value: Any, *, optional: bool = False) -> None:
    """A non-empty string (a metric, attribute or module name).

    Example:
        >>> check_str("val_acc", "")
        Traceback (most recent call last):
        ...
        ValueError: `val_acc` must be a non-empty str, got ''.
    """
    if optional and value is None:
        return
    allowed = _or_none("a non-empty str", optional)
    require(isinstance(value, str), name, value, allowed, TypeError)
    require(bool(value), name, value, allowed)


def _length_text(min_len: int, max_len: int | None) -> str:
    if max_len is None:
        return {0: "a sequence", 1: "a non-empty sequence"}.get(
            min_len, f"a sequence of at least {min_len} items")
    if min_len == max_len:
        return f"a sequence of {min_len} items"
    return f"a sequence of {min_len} to {max_len} items"


def check_sequence(name: str, value: Any, item: Callable[[str, Any], None] | None = None, *,
                   min_len: int = 1, max_len: int | None = None, optional: bool = False) -> None:
    """A list, tuple or other sequence (not a string) of ``min_len`` to ``max_len`` items.

    Args:
        name: The argument's name.
        value: What was given.
        item: Checks each item, called as ``item(f"{name}[{i}]", value[i])``.
        min_len: Fewest items (1: non-empty).
        max_len: Most items; None: no limit.
        optional: Also accept None.

    Example:
        >>> from functools import partial
        >>> check_sequence("input_shape", (1, 0), partial(check_int, low=1), max_len=3)
        Traceback (most recent call last):
        ...
        ValueError: `input_shape[1]` must be an int >= 1, got 0.
    """
    if optional and value is None:
        return
    allowed = _or_none(_length_text(min_len, max_len), optional)
    require(isinstance(value, Sequence) and not isinstance(value, (str, bytes)), name, value,
            allowed, TypeError)
    require(min_len <= len(value) and (max_len is None or len(value) <= max_len), name, value,
            allowed)
    if item is not None:
        for i, v in enumerate(value):
            item(f"{name}[{i}]", v)


def argument(default: T, check: Callable[[str, Any], None] | None = None, *,
             convert: Callable[[Any], Any] | None = None, key: bool | str = True) -> T:
    """A field of a frozen settings record (a dataclass): one callback argument, declared once.

    The record is the single source of an argument's name, default and check; the callback's
    ``__init__`` builds it with :func:`from_arguments` and its ``state_key`` comes from
    :func:`key_arguments`. The record's ``__post_init__`` calls :func:`validate_arguments`.

    Args:
        default: The default value (the callback's signature repeats it; a test compares them).
        check: Called as ``check(name, value)``; raises in this module's style.
        convert: Applied to the value once it is checked (e.g. ``float``).
        key: Whether the argument changes what the callback measures, so that it is part of
            the ``state_key``: True under its own name, a string under that name (the key
            of an older version), False left out (presentation: figures, charts, schedules
            that keep the saved state valid).

    Example:
        >>> from dataclasses import dataclass
        >>> from functools import partial
        >>> @dataclass(frozen=True)
        ... class Settings:
        ...     bins: int = argument(64, partial(check_int, high=256))
        ...     ratio: float = argument(0.5, check_number, convert=float)
        ...     log_charts: bool = argument(True, check_flag, key=False)
        ...     def __post_init__(self) -> None:
        ...         validate_arguments(self)
        >>> Settings(ratio=1)
        Settings(bins=64, ratio=1.0, log_charts=True)
        >>> key_arguments(Settings())
        {'bins': 64, 'ratio': 0.5}
        >>> Settings(bins=10**6)
        Traceback (most recent call last):
        ...
        ValueError: `bins` must be an int in [1, 256], got 1000000.
    """
    metadata = {"check": check, "convert": convert, "key": key}
    return dataclasses.field(default=default, metadata=metadata)  # type: ignore[no-any-return]


def validate_arguments(record: Any) -> None:
    """Check every :func:`argument` of ``record`` (a frozen dataclass) in field order, and
    convert the ones that say so; relations between arguments are checked after it, with
    :func:`require`."""
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        check, convert = field.metadata.get("check"), field.metadata.get("convert")
        if check is not None:
            check(field.name, value)
        if convert is not None:
            object.__setattr__(record, field.name, convert(value))  # frozen: set once, here


def from_arguments(record_type: Callable[..., R], arguments: Mapping[str, Any]) -> R:
    """The record of ``record_type`` built from the entries of ``arguments`` that are its
    fields: a callback's ``__init__`` passes ``locals()``, so that no argument is named again.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Settings:
        ...     bins: int = 64
        >>> from_arguments(Settings, {"self": None, "bins": 8, "strict": False})
        Settings(bins=8)
    """
    names = [f.name for f in dataclasses.fields(record_type)]  # type: ignore[arg-type]
    return record_type(**{name: arguments[name] for name in names if name in arguments})


def key_arguments(record: Any) -> dict[str, Any]:
    """The arguments of ``record`` that make a callback's ``state_key``, in field order, each
    under its key name (see :func:`argument`)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        key = field.metadata.get("key", True)
        if key is not False:
            out[field.name if key is True else key] = getattr(record, field.name)
    return out

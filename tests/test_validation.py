"""lightning_diag.validation: one message style; TypeError for a wrong type, else ValueError."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

from lightning_diag.validation import (
    check_callable,
    check_choice,
    check_flag,
    check_int,
    check_number,
    check_sequence,
    check_str,
    require,
)

Check = Callable[[str, Any], None]
FRACTION = partial(check_number, low=0, high=1, low_open=True)  # (0, 1]

# (check, value, exception, the allowed part of the message)
REFUSED: list[tuple[Check, Any, type[Exception], str]] = [
    (check_int, True, TypeError, "an int >= 1"),
    (check_int, False, TypeError, "an int >= 1"),
    (check_int, 2.0, TypeError, "an int >= 1"),
    (check_int, "3", TypeError, "an int >= 1"),
    (check_int, None, TypeError, "an int >= 1"),
    (check_int, 0, ValueError, "an int >= 1"),
    (partial(check_int, low=0), -1, ValueError, "an int >= 0"),
    (partial(check_int, low=2, high=4), 5, ValueError, "an int in [2, 4]"),
    (partial(check_int, low=None, high=4), 5, ValueError, "an int <= 4"),
    (partial(check_int, optional=True), 0, ValueError, "an int >= 1 or None"),
    (check_number, True, TypeError, "a finite number"),
    (check_number, "0.1", TypeError, "a finite number"),
    (check_number, math.nan, ValueError, "a finite number"),
    (check_number, -math.inf, ValueError, "a finite number"),
    (FRACTION, 0.0, ValueError, "a number in (0, 1]"),
    (FRACTION, 1.5, ValueError, "a number in (0, 1]"),
    (FRACTION, math.nan, ValueError, "a number in (0, 1]"),
    (partial(check_number, low=0, high=1, high_open=True), 1.0, ValueError, "a number in [0, 1)"),
    (partial(check_number, low=1, low_open=True), 1, ValueError, "a finite number > 1"),
    (partial(check_number, low=0), -1e-9, ValueError, "a finite number >= 0"),
    (partial(check_number, low=0), math.inf, ValueError, "a finite number >= 0"),
    (partial(check_number, high=0, high_open=True), 0.0, ValueError, "a finite number < 0"),
    (check_flag, 1, TypeError, "a bool"),
    (check_flag, "yes", TypeError, "a bool"),
    (check_flag, None, TypeError, "a bool"),
    (partial(check_flag, optional=True), 0, TypeError, "a bool or None"),
    (partial(check_choice, choices=("min", "max")), "avg", ValueError, "one of 'min', 'max'"),
    (partial(check_choice, choices=("min", "max")), 1, TypeError, "one of 'min', 'max'"),
    (partial(check_choice, choices=("min", "max")), None, TypeError, "one of 'min', 'max'"),
    (check_callable, 3, TypeError, "callable"),
    (check_callable, None, TypeError, "callable"),
    (check_str, "", ValueError, "a non-empty str"),
    (check_str, 3, TypeError, "a non-empty str"),
    (partial(check_str, optional=True), b"x", TypeError, "a non-empty str or None"),
    (check_sequence, "ab", TypeError, "a non-empty sequence"),
    (check_sequence, {1, 2}, TypeError, "a non-empty sequence"),
    (check_sequence, 3, TypeError, "a non-empty sequence"),
    (check_sequence, [], ValueError, "a non-empty sequence"),
    (partial(check_sequence, min_len=2, max_len=3), (1,), ValueError,
     "a sequence of 2 to 3 items"),
    (partial(check_sequence, min_len=2, max_len=2), (1, 2, 3), ValueError,
     "a sequence of 2 items"),
    (partial(check_sequence, min_len=2), [1], ValueError, "a sequence of at least 2 items"),
]


@pytest.mark.parametrize(("check", "value", "error", "allowed"), REFUSED)
def test_refused_values_raise_the_one_message_style(check: Check, value: Any,
                                                    error: type[Exception], allowed: str) -> None:
    with pytest.raises(error) as info:
        check("arg", value)
    assert type(info.value) is error  # exactly: a ValueError is never a TypeError and back
    assert str(info.value) == f"`arg` must be {allowed}, got {value!r}."


ACCEPTED: list[tuple[Check, Any]] = [
    (check_int, 1), (check_int, np.int64(3)), (partial(check_int, low=None), -7),
    (partial(check_int, optional=True), None), (partial(check_int, low=0, high=0), 0),
    (check_number, 0), (check_number, -2.5), (check_number, np.float32(0.5)),
    (FRACTION, 1), (FRACTION, 1e-12), (partial(check_number, optional=True), None),
    (check_flag, True), (check_flag, False), (partial(check_flag, optional=True), None),
    (partial(check_choice, choices=("min", "max")), "max"),
    (partial(check_choice, choices=("min", "max"), optional=True), None),
    (check_callable, print), (check_callable, int), (check_callable, lambda x: x),
    (check_str, "val_loss"), (partial(check_str, optional=True), None),
    (check_sequence, [0]), (check_sequence, (1, 2)), (check_sequence, range(3)),
    (partial(check_sequence, min_len=0), []), (partial(check_sequence, optional=True), None),
]


@pytest.mark.parametrize(("check", "value"), ACCEPTED)
def test_accepted_values_pass_silently(check: Check, value: Any) -> None:
    assert check("arg", value) is None


def test_sequence_items_are_named_by_index() -> None:
    positive = partial(check_number, low=0, low_open=True)
    with pytest.raises(ValueError, match=re.escape("`lrs[2]` must be a finite number > 0, "
                                                   "got -0.1.")):
        check_sequence("lrs", [0.1, 0.01, -0.1], positive)
    with pytest.raises(TypeError, match=re.escape("`layers[1]` must be a non-empty str, got 3.")):
        check_sequence("layers", ["net.1", 3], check_str)
    calls: list[tuple[str, Any]] = []
    check_sequence("xs", (4, 5), lambda name, v: calls.append((name, v)))
    assert calls == [("xs[0]", 4), ("xs[1]", 5)]


def test_require_raises_in_the_same_style_with_the_type_asked_for() -> None:
    require(True, "high", 0.5, "anything")
    with pytest.raises(ValueError, match=re.escape("`high` must be a number > `low` (0.5), "
                                                   "got 0.1.")):
        require(False, "high", 0.1, "a number > `low` (0.5)")
    with pytest.raises(TypeError, match="`layers` must be"):
        require(False, "layers", 3, "a list", TypeError)


def test_float_and_int_bounds_are_written_plainly() -> None:
    with pytest.raises(ValueError, match=re.escape("an int in [0, 4294967295]")):
        check_int("seed", -1, low=0, high=2**32 - 1)
    with pytest.raises(ValueError, match=re.escape("a finite number >= 1e-05")):
        check_number("low", 1e-6, low=1e-5)

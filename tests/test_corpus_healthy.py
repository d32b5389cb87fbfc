"""The healthy-program corpus (issue 20, item 8): no WARN or FAIL on correct programs.

Each program of ``tests/corpus/healthy.py`` is first checked without the library
(``test_ground_truth``): its initial loss is its own loss at a know-nothing output within the
recipe's 10%, and training improves it. Then it is fitted with every callback of the library at
its defaults (``tests.corpus.runner.every_callback``, all twelve), and no finding may be a WARN
or a FAIL.

Programs that get a false alarm today are marked ``xfail(strict=True)`` with the alarm and the
fix that owns it: when the fix lands, the test passes, strict xfail turns that into a failure,
and the mark must be removed. ``benchmarks/corpus_report.py`` prints the values and margins.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus.healthy import HEALTHY
from tests.corpus.runner import describe, ground_truth, run

pytestmark = pytest.mark.slow

#: Today's false alarms: program -> (the alarm, its cause, the fix that owns it).
FALSE_ALARMS: dict[str, str] = {}


def _params() -> list[object]:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=FALSE_ALARMS[name]))
            if name in FALSE_ALARMS else name for name in HEALTHY]


def test_the_corpus_is_large_and_varied() -> None:
    assert len(HEALTHY) >= 25
    assert len({p.family for p in HEALTHY.values()}) >= 20
    assert set(FALSE_ALARMS) <= set(HEALTHY)


@pytest.mark.parametrize("name", list(HEALTHY))
def test_ground_truth(name: str, tmp_path: Path) -> None:
    """The program is what the corpus claims, measured without the library: its initial loss
    is its loss at a know-nothing output (recipe 3.1), and training improves it."""
    truth = ground_truth(HEALTHY[name], tmp_path)
    assert truth.initial_matches, (truth.initial, truth.know_nothing)
    assert truth.learns, (truth.quality_before, truth.quality_after)


@pytest.mark.parametrize("name", _params())
def test_no_alarm_on_a_healthy_program(name: str, tmp_path: Path) -> None:
    result = run(HEALTHY[name], tmp_path)
    assert result.error is None, result.error
    alarms = result.alarms()
    assert not alarms, f"{name}: {len(alarms)} false alarm(s):\n{describe(alarms)}"

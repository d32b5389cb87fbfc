"""The planted-bug corpus (issue 20, item 8): each silent bug is flagged with its code.

Each bug of ``tests/corpus/bugs.py`` is one mistake planted in a healthy program; fitted with
every callback of the library at its defaults (all twelve, ``TrainingInvariants``
included), at least one of the bug's codes must be raised at WARN or FAIL.

Bugs missed today are marked ``xfail(strict=True)`` with the fix that owns them: when it lands
the test passes, strict xfail turns that into a failure, and the mark must be removed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus.bugs import BUGS
from tests.corpus.runner import describe, run

pytestmark = pytest.mark.slow

#: Today's misses: bug -> (what was raised instead, its cause, the fix that owns it).
MISSED: dict[str, str] = {}


def _params() -> list[object]:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=MISSED[name]))
            if name in MISSED else name for name in BUGS]


def test_the_corpus_has_the_silent_bugs_of_issue_20() -> None:
    issue = {name for name, bug in BUGS.items() if bug.source == "issue 20"}
    assert issue == {"no_zero_grad", "target_leak_shift", "forecast_window_leak",
                     "accuracy_above_one", "running_sum_epoch_loss"}
    assert len(BUGS) >= 18
    assert set(MISSED) <= set(BUGS)


@pytest.mark.parametrize("name", _params())
def test_planted_bug_is_flagged(name: str, tmp_path: Path) -> None:
    bug = BUGS[name]
    result = run(bug.program, tmp_path)
    assert set(bug.codes) & result.codes(), (
        f"{name}: none of {bug.codes} raised; WARN/FAIL found:\n{describe(result.alarms())}")

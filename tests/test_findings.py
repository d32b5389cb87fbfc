import dataclasses

import pytest

from lightning_diag.findings import DiagnosticError, Finding, Severity


def test_severity_order_and_str_values():
    assert Severity.INFO < Severity.WARN < Severity.FAIL
    assert max([Severity.WARN, Severity.FAIL, Severity.INFO]) is Severity.FAIL
    assert Severity("warn") is Severity.WARN
    assert Severity.FAIL == "fail"


def test_finding_is_frozen_and_normalizes_fields():
    f = Finding("X", "x.bad", "warn", "msg 3.0", indices=[3, 1])  # type: ignore[arg-type]
    assert f.severity is Severity.WARN
    assert f.indices == (3, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.code = "y"  # type: ignore[misc]
    assert f.format() == "[WARN] x.bad: msg 3.0"


def test_markdown_row_escapes_pipes():
    row = Finding("X", "x.a", Severity.INFO, "a|b", advice="do\nthis").to_markdown_row()
    assert "a\\|b" in row and "\n" not in row


def test_diagnostic_error_lists_failures():
    f = Finding("X", "x.fail", Severity.FAIL, "broken", advice="fix it")
    err = DiagnosticError([f])
    assert err.findings == [f]
    assert "x.fail" in str(err) and "fix it" in str(err)

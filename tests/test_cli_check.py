"""``lightning-diag check`` on records it cannot vouch for, ``--min-severity``, and a start that
does not wait for torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_diag import cli
from lightning_diag.findings import FINDINGS_FILE, Finding, Severity, append_findings

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *findings: Finding) -> Path:
    run = tmp_path / "tb" / "version_0"
    append_findings(run / FINDINGS_FILE, findings)
    return run


@pytest.mark.parametrize("content", ["", "\n\n", "not json\n{\"version\": 1}\n[1, 2]\n",
                                     "[" * 50_000 + "]" * 50_000 + "\n"],
                         ids=["empty", "blank", "corrupt", "deeply_nested"])
def test_a_record_without_one_readable_finding_exits_2_in_one_line(tmp_path, capsys, content):
    (tmp_path / FINDINGS_FILE).write_text(content)
    assert cli.main(["check", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()  # one line, no traceback, nothing on stdout
    assert line.startswith("lightning-diag check: ") and "no readable finding record" in line
    assert out == ""


def test_one_unreadable_run_among_good_ones_still_exits_2(tmp_path, capsys):
    _run(tmp_path / "good", Finding("X", "x.ok", Severity.INFO, "fine"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / FINDINGS_FILE).write_text("garbage\n")
    assert cli.main(["check", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "x.ok" in out and "bad" in err


def test_a_torn_last_line_is_counted_and_the_rest_is_checked(tmp_path, capsys):
    run = _run(tmp_path, Finding("X", "x.bad", Severity.FAIL, "broken"))
    with (run / FINDINGS_FILE).open("a") as fh:
        fh.write('{"version": 1, "check": "X", "co')
    assert cli.main(["check", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "[FAIL] x.bad" in out and "skipped 1 of 2 line(s)" in err


def test_min_severity_lists_only_what_is_asked_and_counts_the_rest(tmp_path, capsys):
    _run(tmp_path, Finding("X", "x.bad", Severity.WARN, "not good"),
         *[Finding("X", f"x.info{i}", Severity.INFO, "fine") for i in range(5)])
    assert cli.main(["check", str(tmp_path), "--min-severity", "warn"]) == 0
    out = capsys.readouterr().out
    assert "[WARN] x.bad" in out and "[INFO]" not in out
    assert "(5 below WARN not shown)" in out and "0 fail, 1 warn, 5 info." in out
    assert cli.main(["check", str(tmp_path), "--min-severity", "fail", "--fail-on", "warn"]) == 1
    assert "[WARN]" not in capsys.readouterr().out


def test_update_records_are_merged_before_checking(tmp_path, capsys):
    run = _run(tmp_path, Finding("X", "x.high", Severity.WARN, "ratio 1", value=1.0, step=1))
    update = {"version": 2, "update": True, "check": "X", "code": "x.high", "subject": "",
              "steps": [5], "severity": "fail", "message": "ratio 9", "value": 9.0, "step": 5}
    with (run / FINDINGS_FILE).open("a") as fh:
        fh.write(json.dumps(update) + "\n")
    assert cli.main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] x.high  (X, seen at steps 1, 5)" in out and "ratio 9" in out


def test_check_starts_without_importing_torch(tmp_path):
    run = _run(tmp_path, Finding("X", "x.ok", Severity.INFO, "fine"))
    code = ("import sys; from lightning_diag.cli import main; status = main(['check', "
            f"{str(run)!r}]); print(status, 'torch' in sys.modules, 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=True)
    assert done.stdout.splitlines()[-1] == "0 False False"

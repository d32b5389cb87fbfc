"""One presentation of a finding: the terminal line, the TensorBoard table, the HTML report and
``lightning-diag check`` show its number, its steps and its subject the same way."""

from __future__ import annotations

import math
from html.parser import HTMLParser

from lightning_diag.findings import FINDINGS_FILE, Finding, Severity, append_findings
from lightning_diag.presentation import (
    cells,
    counts_text,
    format_findings,
    headline,
    number,
    step_list,
)
from lightning_diag.report.build import build_report
from lightning_diag.tensorboard.findings_table import table_row

#: A dead-unit finding seen at 23 logging steps (the issue's example).
DEAD = Finding("ActivationHistogram", "activations.dead_units", Severity.WARN,
               "84% of the units of net.5 (ReLU) are dead.", value=0.84375, expected=(0.0, 0.5),
               step=10, subject="net.5", details={"steps": list(range(10, 240, 10))})


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_one_number_one_step_form_one_name_everywhere(tmp_path):
    value, steps = "84.38%", "10-230 (23x)"
    assert step_list(DEAD.steps()) == steps and number(DEAD.value, percent=True) == value
    assert headline(DEAD) == (f"[WARN] activations.dead_units net.5: dead units {value} "
                              f"(expected 0% to 50%) at steps {steps}")
    row = table_row(DEAD)  # TensorBoard
    assert row[0] == "WARN<br>`activations.dead_units`<br>net.5"
    assert row[3] == f"dead units: {value}<br>expected [0%, 50%]<br>steps {steps}"
    listing = format_findings([DEAD])  # lightning-diag check, the demo
    assert f"[WARN] activations.dead_units net.5  (ActivationHistogram, seen at steps {steps})" \
        in listing
    append_findings(tmp_path / FINDINGS_FILE, [DEAD])  # the HTML report
    page = _Text()
    page.feed(build_report(tmp_path).read_text(encoding="utf-8"))
    shown = [t.strip() for t in page.text]
    assert value in shown and "[0%, 50%]" in shown and steps in shown
    assert "ActivationHistogram \u00b7 net.5" in "".join(page.text)


def test_non_finite_numbers_are_spelled_as_in_the_record():
    assert [number(x) for x in (math.nan, math.inf, -math.inf, 1234567.0)] == [
        "NaN", "Infinity", "-Infinity", "1.235e+06"]


def test_an_info_reading_outside_its_range_shows_no_range():
    summary = Finding("ActivationHistogram", "activations.summary", Severity.INFO,
                      "worst dead fraction 100%", value=1.0, expected=(0.0, 0.5), step=20)
    assert cells(summary).expected == "-" and "expected" not in headline(summary)
    inside = Finding("InitialLossCheck", "initial_loss.ok", Severity.INFO, "fine", value=2.3,
                     expected=(2.0, 2.6))
    assert cells(inside).expected == "[2, 2.6]" and "(expected 2 to 2.6)" in headline(inside)


def test_counts_leave_the_diagnosis_out():
    found = [Finding("A", "a.x", Severity.FAIL, "m"), Finding("B", "b.y", Severity.FAIL, "m"),
             Finding("Diagnosis", "diagnosis.summary", Severity.FAIL, "m")]
    assert counts_text(found) == "2 fail, 0 warn, 0 info, and the diagnosis"

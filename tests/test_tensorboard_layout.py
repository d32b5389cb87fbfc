"""What a user sees in TensorBoard on the demo's injected run, read back from its event files:
groups in recipe order, one findings table (FAIL first), train and validation overlaid, the
update ratio as log10 with its -3 line, EMA and ensemble comparisons."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from lightning_diag.callbacks.update_ratio import UpdateRatioMonitor
from lightning_diag.examples.demo import DemoResult, recipe_callbacks, run_demo
from lightning_diag.findings import Severity, sort_findings
from lightning_diag.presentation import counts
from lightning_diag.tensorboard import tags
from tests.helpers import events


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[DemoResult, UpdateRatioMonitor]:
    callbacks = recipe_callbacks(overfit_max_steps=10)
    result = run_demo(tmp_path_factory.mktemp("demo") / "runs", inject=True, epochs=2,
                      limit_batches=2, progress_bar=False, echo=False, report=False,
                      callbacks=callbacks)
    (ratio,) = [cb for cb in callbacks if isinstance(cb, UpdateRatioMonitor)]
    return result, ratio


def _runs(log_dir: Path) -> dict[str, object]:
    """The run and its sibling runs, as TensorBoard lists them (name -> EventAccumulator)."""
    found = {"": events(log_dir)}
    found |= {d.name: events(d) for d in sorted(log_dir.iterdir()) if d.is_dir()
              and any(d.glob("events.out.tfevents.*"))}
    return found


def _all_tags(acc) -> set[str]:
    kinds = acc.Tags()
    texts = {t.removesuffix("/text_summary") for t in kinds["tensors"]
             if t.endswith("/text_summary")}
    return set(kinds["scalars"]) | set(kinds["images"]) | set(kinds["histograms"]) | texts


def test_groups_come_in_recipe_order_before_the_users_metrics(demo):
    result, _ = demo
    runs = _runs(result.log_dir)
    assert set(runs) <= {"", *tags.SIBLING_RUNS}
    groups = sorted({t.split("/")[0] for acc in runs.values() for t in _all_tags(acc)})
    ours = [g for g in groups if g in tags.ROOTS]
    # TensorBoard sorts the groups by name and opens the first two: the curves, the findings
    assert groups[:len(ours)] == ours == [r for r in tags.ROOTS if r in ours]
    assert ours[:2] == [tags.CURVES.root, tags.FINDINGS.root]
    assert {tags.DATA.root, tags.OVERFIT.root, tags.ACTIVATIONS.root, tags.UPDATE_RATIO.root,
            tags.ENSEMBLE.root, tags.EMA.root} <= set(ours)
    # what is left is the module's own metrics (and Lightning's epoch), which are not ours
    assert {"train_loss", "val_loss", "epoch"} <= set(groups[len(ours):])


def test_one_findings_table_holds_every_finding_diagnosis_and_fail_first(demo):
    result, _ = demo
    runs = _runs(result.log_dir)
    tables = [t for acc in runs.values() for t in acc.Tags()["tensors"]
              if t.startswith(tags.FINDINGS.prefix)]
    assert tables == [f"{tags.FINDINGS_TABLE}/text_summary"]
    written = runs[""].Tensors(tables[0])
    # the Text dashboard shows the latest step on top, the last text written at that step
    latest = written[-1]
    assert latest.step == max(e.step for e in written)
    table = latest.tensor_proto.string_val[0].decode()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    codes = [row.split(" | ")[1].split("`")[1] for row in rows]  # the code, then its subject
    assert codes == [f.code for f in sort_findings(result.findings)]
    severities = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert severities[0] == "FAIL" or codes[0].startswith("diagnosis.")
    assert {"data.leakage", "initial_loss.mismatch"} <= set(codes)
    assert not [t for acc in runs.values() for t in acc.Tags()["scalars"]
                if t.startswith(tags.FINDINGS.prefix)]  # no lone dots of finding values


def test_one_table_version_per_content_and_the_counts_where_tensorboard_opens(demo):
    result, _ = demo
    main = _runs(result.log_dir)[""]
    versions = [e.tensor_proto.string_val[0].decode()
                for e in main.Tensors(f"{tags.FINDINGS_TABLE}/text_summary")]
    bodies = [v.split("\n\n", 1)[1] for v in versions]  # the table, without its step line
    assert len(bodies) == len(set(bodies)) >= 2
    n = counts(result.findings)
    assert n[Severity.FAIL] >= 2  # the leak and the initial loss; the diagnosis is not counted
    for severity in (Severity.FAIL, Severity.WARN):
        points = main.Scalars(tags.findings_count(severity.value))
        assert points[-1].value == n[severity]
        assert points[-1].step == max(e.step for e in main.Tensors(
            f"{tags.FINDINGS_TABLE}/text_summary"))
    # on the first cards TensorBoard opens on: the first group, before its loss chart
    group = sorted({t for acc in _runs(result.log_dir).values() for t in acc.Tags()["scalars"]
                    if t.startswith(tags.CURVES.prefix)})
    assert group.index(tags.findings_count("fail")) == 1, group  # next to the accuracy


def test_train_and_validation_curves_share_one_tag_in_sibling_runs(demo):
    result, _ = demo
    runs = _runs(result.log_dir)
    for quantity, metric in (("loss", "loss"), ("accuracy", "acc")):
        tag = tags.curve(quantity)
        assert tag not in runs[""].Tags()["scalars"]
        for run, split in ((tags.TRAIN_RUN, "train"), (tags.VALIDATION_RUN, "val")):
            points = runs[run].Scalars(tag)
            assert [e.step for e in points] == [0, 1]  # epochs on the x-axis
            assert points[-1].value == pytest.approx(result.metrics[f"{split}_{metric}"])
    for tag, pair in ((tags.ema_comparison("val_loss"), (tags.RAW_RUN, tags.EMA_RUN)),
                      (tags.ensemble_comparison("val_acc"),
                       (tags.MEMBERS_RUN, tags.COMBINED_RUN))):
        assert all(runs[run].Scalars(tag) for run in pair), tag
    # the raw weights' side is this epoch's validation, not the previous one's
    raw = runs[tags.RAW_RUN].Scalars(tags.ema_comparison("val_loss"))
    val = runs[tags.VALIDATION_RUN].Scalars(tags.curve("loss"))
    assert [(e.step, e.value) for e in raw] == [(e.step, e.value) for e in val]


def test_update_ratio_is_log10_with_a_line_at_minus_3(demo):
    result, ratio = demo
    runs = _runs(result.log_dir)
    main, guide = runs[""], runs[tags.GUIDE_RUN]
    mine = {t for t in main.Tags()["scalars"] if t.startswith(tags.UPDATE_RATIO.prefix)}
    assert tags.UPDATE_RATIO_MEDIAN in mine and len(mine) > 1
    assert set(guide.Tags()["scalars"]) == mine  # the -3 line on every update-ratio chart
    assert all(e.value == -3.0 for t in mine for e in guide.Scalars(t))
    for name, value in ratio.last.items():
        logged = main.Scalars(tags.update_ratio_layer(ratio.tag_names[name]))[-1].value
        want = math.log10(value) if value > 0 else -math.inf  # a weight that did not move
        assert logged == pytest.approx(want, abs=1e-5), name
    median = statistics.median(ratio.last.values())
    assert main.Scalars(tags.UPDATE_RATIO_MEDIAN)[-1].value == pytest.approx(
        math.log10(median), abs=1e-5)

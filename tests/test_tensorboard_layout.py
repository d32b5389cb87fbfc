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
from tests.helpers import card_counts, events


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
    # the diagnosis first, as paragraphs above the table (prose in a narrow cell reads badly)
    ordered = sort_findings(result.findings)
    assert ordered[0].code == "diagnosis.summary"
    _, diagnosis, advice, table_part = table.split("\n\n", 3)
    assert diagnosis.startswith("**FAIL `diagnosis.summary`**: " + ordered[0].message[:40])
    assert advice.startswith("**Advice**: ")
    rows = [line for line in table_part.splitlines() if line.startswith("| ") and "`" in line]
    # each row's first cell: the severity, then the code (then its subject)
    firsts = [row.split(" | ")[0].removeprefix("| ").split("<br>") for row in rows]
    assert [first[1].strip("`") for first in firsts] == [f.code for f in ordered[1:]]
    assert [first[0] for first in firsts] == [
        "**FAIL**" if f.severity is Severity.FAIL else f.severity.value.upper()
        for f in ordered[1:]]
    assert {"data.leakage", "initial_loss.mismatch"} <= {f.code for f in ordered[1:3]}
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
    cards = main.Images(tags.FINDINGS_CARD)
    assert card_counts(cards[-1]) == " ".join(f"{s.value}={k}" for s, k in n.items())
    assert cards[-1].step == max(e.step for e in main.Tensors(
        f"{tags.FINDINGS_TABLE}/text_summary"))
    shown = [card_counts(e, "text") for e in cards]
    assert len(shown) == len(set(shown)) >= 2  # one version per content
    assert shown[-1].startswith(f"{n[Severity.FAIL]} FAIL") and "end of fit" in shown[-1]
    # an image (Time Series does not smooth it) on the first cards TensorBoard opens on: the
    # first group, its cards sorted by tag, scalars and images alike: next to the accuracy
    group = sorted({t for acc in _runs(result.log_dir).values()
                    for t in acc.Tags()["scalars"] + acc.Tags()["images"]
                    if t.startswith(tags.CURVES.prefix)})
    assert group.index(tags.FINDINGS_CARD) == 1, group


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
    # the trained weights' side of the EMA chart is the validation run, this epoch's
    raw = runs[tags.VALIDATION_RUN].Scalars(tags.ema_comparison("val_loss"))
    val = runs[tags.VALIDATION_RUN].Scalars(tags.curve("loss"))
    assert [(e.step, e.value) for e in raw] == [(e.step, e.value) for e in val]
    assert runs[tags.EMA_RUN].Scalars(tags.ema_comparison("val_loss"))
    # the ensemble's few numbers are bars in an image, not a smoothed line
    assert runs[""].Images(tags.ENSEMBLE_FIGURE)


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


#: TensorBoard's palette (the Time Series dashboard's, and the legacy dashboards' of 7 too):
#: runs take its colours in the order it lists them, by the time of their first event, then
#: by name (tensorboard/plugins/core/core_plugin.py, `_serve_runs`; the frontend's run colours).
PALETTE = 7


def _tensorboard_order(root: Path) -> list[str]:
    """The runs under ``root`` in the order TensorBoard lists (and colours) them."""
    dirs = sorted({p.parent for p in root.rglob("*tfevents*")})
    starts = {str(d.relative_to(root)): events(d).FirstEventTimestamp() for d in dirs}
    return sorted(starts, key=lambda run: (starts[run], run))


def test_two_runs_side_by_side_get_distinct_colours_on_every_chart(demo):
    result, _ = demo
    root = result.log_dir.parents[1]  # runs/: inject/version_0, and now clean/version_0
    run_demo(root, inject=False, epochs=2, limit_batches=2, progress_bar=False, echo=False,
             report=False, callbacks=recipe_callbacks(overfit_max_steps=10))
    order = _tensorboard_order(root)
    colours = {run: i % PALETTE for i, run in enumerate(order)}
    assert len(colours) == 10  # each run and its 4 sibling runs
    by_tag: dict[str, list[str]] = {}
    for run in colours:
        for tag in events(root / run).Tags()["scalars"]:
            by_tag.setdefault(tag, []).append(run)
    shared = {tag: runs for tag, runs in by_tag.items() if len(runs) > 2}
    assert tags.curve("loss") in shared and tags.UPDATE_RATIO_MEDIAN in shared
    assert tags.ema_comparison("val_loss") in shared
    for tag, runs in shared.items():
        assert len({colours[r] for r in runs}) == len(runs), (tag, {r: colours[r] for r in runs})
    # each run next to its siblings, in one order, whenever they were written
    assert order == [f"{name}/version_0{sibling}" for name in ("inject", "clean")
                     for sibling in ("", *(f"/{s}" for s in tags.SIBLING_RUNS))]

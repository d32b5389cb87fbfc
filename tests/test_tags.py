"""The tag registry against what the writers really write, read back from the event files."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
from tensorboard.plugins.custom_scalar import layout_pb2

import lightning_diag.callbacks
from lightning_diag.tensorboard import tags
from lightning_diag.tensorboard.tags import TagSpec, declared, find
from tests.helpers import events

ROOT = Path(__file__).resolve().parents[1]
#: What the models and Lightning log themselves (``hp_metric``: TensorBoardLogger's placeholder
#: next to saved hyperparameters): not lightning_diag's tags.
USER_SCALARS = {"train_loss", "train_acc", "val_loss", "val_acc", "epoch", "hp_metric"}
#: Declared, conditional, and not met by the real run (with the reason).
NOT_MET = {
    tags.data_grid("non_finite"): "a NaN input would make the training loss NaN",
    tags.data_grid("non_finite", "validation"): "a NaN input would make val_loss NaN",
}
Written = set[tuple[str, str, str]]  # (kind, tag, sibling run or "" for the run itself)


def written(log_dir: Path) -> tuple[Written, dict[str, dict[str, list[str]]]]:
    """Every (kind, tag, run) of the run's event files and its sibling runs', and its
    custom-scalars layout."""
    found: Written = set()
    layout: dict[str, dict[str, list[str]]] = {}
    runs = [("", log_dir)] + [(d.name, d) for d in sorted(log_dir.iterdir())
                              if d.is_dir() and any(d.glob("events.out.tfevents.*"))]
    for run, directory in runs:
        assert run in ("", *tags.SIBLING_RUNS), f"undeclared run {directory}"
        acc = events(directory)
        found |= {("scalar", t, run) for t in acc.Tags()["scalars"] if t not in USER_SCALARS}
        found |= {("histogram", t, run) for t in acc.Tags()["histograms"]}
        found |= {("image", t, run) for t in acc.Tags()["images"]}
        for t in acc.Tags()["tensors"]:
            if t.endswith("/text_summary"):
                found.add(("text", t.removesuffix("/text_summary"), run))
            elif t == "custom_scalars__config__":
                proto = layout_pb2.Layout()
                proto.ParseFromString(acc.Tensors(t)[-1].tensor_proto.string_val[0])
                layout = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart}
                          for c in proto.category}
            elif not t.startswith("_hparams_/"):  # the hyperparameters Lightning saved
                raise AssertionError(f"unexpected tensor tag {t!r}")
    found |= {("layout", category, "") for category in layout}
    return found, layout


def owners(kind: str, tag: str, run: str, writers: Iterable[str]) -> list[str]:
    return [w for w in writers if find(tag, kind, w, run) is not None]  # type: ignore[arg-type]


def check_layout(layout: dict[str, dict[str, list[str]]], found: Written,
                 writers: Iterable[str]) -> None:
    """Every chart declared by its category's writer, and none of them empty."""
    scalars = [t for k, t, _ in found if k == "scalar"]
    for category, charts in layout.items():
        specs = [s for w in writers for s in declared(w)
                 if s.kind == "layout" and s.matches(category)]
        for title, chart_tags in charts.items():
            assert any(s.matches_chart(title) for s in specs), (category, title)
            for pattern in chart_tags:
                assert any(re.fullmatch(pattern, t) for t in scalars), (category, title, pattern)


def check_declared(found: Written, layout: dict[str, dict[str, list[str]]],
                   writers: list[str]) -> dict[str, Written]:
    """Nothing undeclared; returns what each writer wrote."""
    undeclared = sorted(f"{k} {t} {r}" for k, t, r in found if not owners(k, t, r, writers))
    assert not undeclared, f"written but declared by none of {writers}: {undeclared}"
    check_layout(layout, found, writers)
    return {w: {(k, t, r) for k, t, r in found if w in owners(k, t, r, writers)}
            for w in writers}


def missing(spec: TagSpec, wrote: Written) -> bool:
    """Whether the declared tag is absent from any of its declared runs."""
    return any(not any(k == spec.kind and spec.matches(t) and r == run for k, t, r in wrote)
               for run in spec.runs or ("",))


# -- every callback --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_tags(real_run):
    found, layout = written(real_run.log_dir)
    names = [type(cb).__name__ for cb in real_run.callbacks]
    return real_run, check_declared(found, layout, names), layout


def test_the_real_run_holds_every_callback_and_the_registry_knows_them(real_run):
    names = {type(cb).__name__ for cb in real_run.callbacks}
    assert names == set(lightning_diag.callbacks.__all__)
    assert set(tags.WRITERS) == names | {"tuning"}


def test_every_declared_tag_is_written_unless_its_condition_is_not_met(run_tags):
    run, by_writer, _ = run_tags
    for cb in run.callbacks:
        name = type(cb).__name__
        own = [s for s in declared(name) if s.pattern != tags.FINDINGS_TABLE]
        absent = {s.pattern for s in own if missing(s, by_writer[name])}
        assert absent == {s.pattern for s in own if s.pattern in NOT_MET}, name
        for spec in own:
            if spec.pattern in NOT_MET:  # a condition, not a tag that stopped being written
                assert spec.conditional, spec


def test_one_findings_table_for_the_whole_run_and_no_findings_scalars(run_tags):
    run, by_writer, _ = run_tags
    everything = set().union(*by_writer.values())
    assert [(k, t) for k, t, _ in everything if t.startswith(tags.FINDINGS.prefix)] == [
        ("text", tags.FINDINGS_TABLE)]
    assert ("text", tags.FINDINGS_TABLE, "") in by_writer["LRPlateauAdvisor"]
    assert any(cb.findings for cb in run.callbacks if type(cb).__name__ == "LRPlateauAdvisor")


def test_every_tag_is_under_a_recipe_root(run_tags):
    _, by_writer, _ = run_tags
    roots = {t.split("/")[0] for wrote in by_writer.values() for k, t, _ in wrote
             if k != "layout" and not t.endswith(tags.EMA_SUFFIX)}
    assert roots <= set(tags.ROOTS)
    assert list(tags.ROOTS) == sorted(tags.ROOTS)  # TensorBoard's order is the recipe's


def test_the_layout_is_the_declared_one(run_tags):
    _, _, layout = run_tags
    category, charts = tags.update_ratio_layout()
    assert layout[category] == charts
    # the overfitting ladder's, when the configured rate could not overfit
    assert set(layout) <= {category, tags.OVERFIT.root}


def test_conditional_tags_say_on_what_and_patterns_are_unique():
    assert all(s.condition.strip() for s in tags.TAGS if s.conditional)
    keys = [(s.kind, s.pattern, s.charts, s.runs) for s in tags.TAGS]
    assert len(keys) == len(set(keys))
    assert {r for s in tags.TAGS for r in s.runs} == set(tags.SIBLING_RUNS)


# -- tuning ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tune_dir(tmp_path_factory) -> Path:
    pytest.importorskip("optuna")
    from lightning_diag.examples.digits import DigitsClassifier
    from lightning_diag.tuning.pipeline import tune
    from tests.test_tuning import TinyDigits

    run_dir = tmp_path_factory.mktemp("tune")
    tune(functools.partial(DigitsClassifier, arch="mlp", width=8, dropout=0.0), TinyDigits(64),
         lrs=(1e-2, 1e-4), sweep_steps=2, n_trials=1, epochs=(1, 1), top_k=1, refine_epochs=1,
         run_dir=run_dir, accelerator="cpu", limit_train_batches=1, verbose=False)
    from lightning_diag.tuning.search import random_search

    # a learning rate of 30 makes the first update far larger than the weights: the diagnosis
    # ends that trial and says so in its run
    bad = random_search(functools.partial(DigitsClassifier, arch="mlp", width=8, dropout=0.0),
                        TinyDigits(64), center_lr=30.0, n_trials=1, epochs=(1, 1),
                        run_dir=run_dir / "bad", accelerator="cpu", limit_train_batches=1)
    assert bad.rows[0]["ended_by"] == "update_ratio.too_high"
    return run_dir


def test_tuning_writes_what_it_declares(tune_dir):
    wrote: Written = set()
    for run in sorted({p.parent for p in tune_dir.rglob("events.out.tfevents.*")
                       if p.parent.name not in tags.SIBLING_RUNS}):
        found, layout = written(run)
        # the refinement runs hold the advisor's findings; the search trials, their monitors'
        by_writer = check_declared(found, layout, ["tuning", "LRPlateauAdvisor",
                                                   "UpdateRatioMonitor", "ActivationHistogram"])
        wrote |= by_writer["tuning"]
    assert not [s.pattern for s in declared("tuning") if s.kind != "layout" and missing(s, wrote)]
    categories = {t for k, t, _ in wrote if k == "layout"}
    assert categories == {s.pattern for s in declared("tuning") if s.kind == "layout"}


# -- the documentation -----------------------------------------------------------------------
def test_no_writer_spells_a_tag():
    literal = re.compile(r"""\bf?["'](""" + "|".join(map(re.escape, tags.ROOTS)) + ")/")
    package = ROOT / "lightning_diag"
    spelled = [f"{p.relative_to(ROOT)}:{n}" for p in package.rglob("*.py")
               if p.name != "tags.py" or p.parent.name != "tensorboard"
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               if literal.search(line)]
    assert not spelled, f"build these tags in lightning_diag/tensorboard/tags.py: {spelled}"

"""The code registry (lightning_diag/codes.py) against what the checks really emit: run every
callback and compare, scan the source for code literals, and check what is derived from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lightning_diag.callbacks
from lightning_diag.base import DiagnosticCallback, FitStartCheck
from lightning_diag.checks.diagnosis import CAUSES, _kind, causes
from lightning_diag.codes import CODES, FAMILIES, GENERIC, declared_codes, spec
from lightning_diag.findings import Finding, Severity
from lightning_diag.tuning.pruning import PRUNING_CODES, DiagnosisPruning

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_diag"
#: The checks a finding may name for a code its callback owns: the Trainer-free function.
FUNCTIONS = {"inspect_dataset": "DataInspection"}


def callback_classes() -> list[type[DiagnosticCallback]]:
    return [getattr(lightning_diag.callbacks, n) for n in lightning_diag.callbacks.__all__] + [
        DiagnosisPruning]


def test_every_code_is_declared_once_in_its_checks_family_with_a_sane_range():
    names = [s.code for s in CODES]
    assert len(names) == len(set(names))
    for s in CODES:
        assert s.code.split(".")[0] in FAMILIES[s.check], s
        assert s.lowest <= s.highest and s.meaning and s.step, s
        assert s.cause in CAUSES or s.cause == "", s
        if s.cause:  # a training problem is a WARN or FAIL
            assert s.highest >= Severity.WARN, s
        if s.ends_trial:
            assert s.allows(Severity.WARN), s


def test_every_callback_has_its_family_and_its_error_code():
    for cls in callback_classes():
        name = cls.__name__
        assert FAMILIES[name][0] == cls.slug, name
        assert spec(f"{cls.slug}.error") in declared_codes(name), name
    assert FAMILIES["ActivationHistogram"] == ("activations", "gradients")


def _emitted_by_real_run(real_run) -> list[Finding]:
    return [f for cb in real_run.callbacks for f in cb.findings]


def test_every_code_the_real_run_emits_is_declared_for_its_check_within_its_range(real_run):
    found = _emitted_by_real_run(real_run)
    assert len({f.code for f in found}) >= 18  # every check has spoken
    assert "diagnosis.summary" in {f.code for f in found}
    for f in found:
        declared = next((s for s in CODES if s.code == f.code), None)
        assert declared is not None, f"{f.code} ({f.check}) is not declared in codes.py"
        assert declared.check == FUNCTIONS.get(f.check, f.check), (f.code, f.check)
        assert declared.allows(f.severity), (f.code, f.severity)


_LITERAL = re.compile(r"""["']([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)["']""")


def test_every_code_literal_in_the_package_is_declared():
    families = {f for fams in FAMILIES.values() for f in fams}
    declared = {s.code for s in CODES}
    undeclared = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "codes.py" and path.parent == PACKAGE:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for family, what in _LITERAL.findall(line):
                code = f"{family}.{what}"
                if family in families and code not in declared and what not in ("py", "pt"):
                    undeclared.append(f"{path.relative_to(ROOT)}:{n}: {code}")
    assert not undeclared, undeclared


def _slug_codes(cls: type[DiagnosticCallback]) -> set[str]:
    """The ``f"{self.slug}.<what>"`` codes in ``cls``'s module, and the generic codes its
    base class gives it (``.skipped`` for a fit-start check, ``.no_tensorboard`` when it asks
    for TensorBoard, ``.user_error`` when it calls the user's code on a copy)."""
    source = Path(__import__(cls.__module__, fromlist=["_"]).__file__).read_text("utf-8")
    out = {f"{cls.slug}.{what}" for what in re.findall(r"\{self\.slug\}\.([a-z_]+)", source)}
    out.add(f"{cls.slug}.error")
    if issubclass(cls, FitStartCheck) or "self.skipped(" in source:
        out.add(f"{cls.slug}.skipped")
    if "require_tensorboard(" in source:
        out.add(f"{cls.slug}.no_tensorboard")
    if issubclass(cls, FitStartCheck) or "UserCodeError" in source or "validate_copy" in source:
        out.add(f"{cls.slug}.user_error")
    return out


def test_every_code_built_from_a_slug_is_declared_for_that_callback():
    for cls in callback_classes():
        built = _slug_codes(cls)
        mine = {s.code for s in declared_codes(cls.__name__)}
        assert built <= mine, (cls.__name__, sorted(built - mine))


def test_the_slug_scan_reads_the_source():
    class Odd(DiagnosticCallback):
        slug = "odd"

    # this test's own module spells f"{self.slug}.surprise": a scan that reads nothing finds
    # nothing, this one finds it
    assert "odd.surprise" in _slug_codes(Odd), 'f"{self.slug}.surprise"'


def test_undeclared_codes_are_read_by_their_suffix():
    assert spec("my_check.error").cause == "" and spec("my_check.odd") is None
    assert set(GENERIC) == {"error", "user_error", "skipped", "no_tensorboard"}


def test_the_diagnosis_reads_each_code_as_declared():
    for s in CODES:
        if s.code.startswith("diagnosis."):
            continue
        f = Finding(s.check, s.code, s.highest, "m")
        assert _kind(f) == s.cause, s.code
    # the two rules beyond the table: where the samples of a divergence were flagged, and
    # the overfit test's ladder of learning rates
    flagged = Finding("LRPlateauAdvisor", "advisor.divergence", Severity.WARN, "m",
                      details={"flagged_in_batch": {"data.non_finite": [3]}})
    ladder = Finding("OverfitSmallBatch", "overfit.not_reached", Severity.WARN, "m",
                     details={"ladder": {"verdict": "lr_too_high"}})
    assert (_kind(flagged), _kind(ladder)) == ("data", "lr_high")
    # a code routed by its finding's reason: an initial loss below 0 is no initialization
    negative = Finding("InitialLossCheck", "initial_loss.mismatch", Severity.FAIL, "m",
                       details={"reason": "negative"})
    assert _kind(negative) == "implementation"
    (cause,) = causes([negative])
    assert "log-probabilities" in cause.next_step()
    for s in CODES:
        for reason, routed_to, fix in s.reasons:
            assert routed_to in CAUSES and fix and s.routed(reason) == (routed_to, fix), s


def test_the_invariants_point_at_the_implementation_or_the_data_with_a_fix():
    for s in declared_codes("TrainingInvariants"):
        if s.highest >= Severity.WARN and s.code.rpartition(".")[2] not in GENERIC:
            assert s.cause in ("implementation", "data") and s.fix, s.code
    leak = Finding("TrainingInvariants", "invariants.target_leak", Severity.WARN, "m")
    (cause,) = causes([leak])
    assert cause.key == "data" and "feed the model what precedes it" in cause.next_step()


def test_pruning_codes_are_derived_and_unchanged():
    # issue 24: irreversible evidence only (benchmarks/results/pruning_rules.md)
    assert PRUNING_CODES == {s.code: s.ends_trial for s in CODES if s.ends_trial} == {
        "update_ratio.too_high": "an update as large as the weights",
        "update_ratio.zero_updates": "no weight moves",
    }


@pytest.mark.parametrize("code", ["data.leakage", "activations.dead_units"])
def test_fractions_are_declared_as_percentages(code):
    s = spec(code)
    assert s is not None and s.percent and s.value

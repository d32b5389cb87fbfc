"""The package's public names: every one stays importable, and the callbacks' are derived.

``lightning_diag/__init__.py`` lists no callback: it exports ``lightning_diag.callbacks.__all__``,
read from that module's source, so that a new callback is exported by adding it there. The
names stay lazy (PEP 562): ``import lightning_diag`` and ``lightning-diag check`` load neither
torch nor Lightning.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_diag
import lightning_diag.callbacks as callbacks

#: Every name ``from lightning_diag import X`` gave before the callbacks' names were derived.
PUBLIC_NAMES = (
    "ActivationHistogram", "CheckpointEnsemble", "CheckpointLoadError", "DataInspection",
    "DiagnosticCallback", "DiagnosticError", "DiagnosticWarning", "EMAWeights", "EnsembleModel",
    "Finding", "FirstLayerVisualization", "GradientCheck", "InitialLossCheck", "LRPlateauAdvisor",
    "LearningCurves", "OverfitResult", "OverfitSmallBatch", "Severity", "TrainingInvariants",
    "UpdateRatioMonitor", "check_gradients", "check_initial_loss", "diagnose", "findings",
    "inspect_dataset", "load_ema_weights", "load_findings", "overfit_small_batch",
    "train_ensemble", "train_top_configs",
)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_every_public_name_still_imports(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from lightning_diag import {name}", namespace)  # the user's spelling
    assert namespace[name] is getattr(lightning_diag, name)
    assert name in lightning_diag.__all__ and name in dir(lightning_diag)


def test_all_is_the_old_names_and_every_callback() -> None:
    assert set(lightning_diag.__all__) == set(PUBLIC_NAMES) | set(callbacks.__all__)
    assert lightning_diag.__all__ == sorted(lightning_diag.__all__)
    for name in callbacks.__all__:
        assert getattr(lightning_diag, name) is getattr(callbacks, name)


def test_findings_is_the_function_not_the_module() -> None:
    from lightning_diag import findings
    from lightning_diag.base import findings as function

    assert findings is function


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_diag.Nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from lightning_diag import Nope", {})


def test_the_exported_callbacks_are_read_from_the_callbacks_source() -> None:
    # the parsed list is the imported one, in the same order
    assert lightning_diag._callback_names() == tuple(callbacks.__all__)


def test_every_callback_class_in_the_callbacks_folder_is_exported() -> None:
    """Completeness: a callback class defined in ``callbacks/<module>.py`` and listed in that
    module's ``__all__`` is in ``lightning_diag.callbacks.__all__`` (hence the package's)."""
    import importlib
    import pkgutil

    import lightning.pytorch as pl

    defined = set()
    for info in pkgutil.iter_modules(callbacks.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"lightning_diag.callbacks.{info.name}")
        defined |= {name for name in module.__all__
                    if isinstance(obj := getattr(module, name), type)
                    and issubclass(obj, pl.Callback) and obj.__module__ == module.__name__}
    assert defined == set(callbacks.__all__)


def test_importing_the_package_loads_neither_torch_nor_lightning() -> None:
    code = ("import sys, lightning_diag; from lightning_diag import Finding, load_findings; "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_is_re_exported_for_type_checkers() -> None:
    """A type checker (mypy --strict: no implicit re-export) sees each name: imported under
    TYPE_CHECKING as ``X as X``, or the callbacks through ``from lightning_diag.callbacks import
    *`` (its literal ``__all__``)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(lightning_diag.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING")
    seen: set[str] = set()
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            if alias.name == "*":
                assert node.module == "lightning_diag.callbacks"
                seen |= set(callbacks.__all__)
            elif alias.asname == alias.name:
                seen.add(alias.name)
    assert seen == set(lightning_diag.__all__)

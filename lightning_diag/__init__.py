"""lightning_diag: the "babysit your network" training recipe as PyTorch Lightning callbacks.

The names below are imported when first used (PEP 562), so that ``import lightning_diag`` and
the command line (``lightning-diag check`` reads JSON lines) do not wait for torch and
Lightning to load.

Example:
    >>> import lightning_diag as ld
    >>> callbacks = [ld.InitialLossCheck(), ld.GradientCheck(), ld.OverfitSmallBatch()]
    >>> [c.check_name for c in callbacks]
    ['InitialLossCheck', 'GradientCheck', 'OverfitSmallBatch']
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `X as X`: re-exported for type checkers (the star: callbacks.__all__)
    from lightning_diag.base import DiagnosticCallback as DiagnosticCallback
    from lightning_diag.base import findings as findings
    from lightning_diag.callbacks import *  # noqa: F403
    from lightning_diag.checks.data.inspect import inspect_dataset as inspect_dataset
    from lightning_diag.checks.diagnosis import diagnose as diagnose
    from lightning_diag.checks.gradients import check_gradients as check_gradients
    from lightning_diag.checks.initial_loss import check_initial_loss as check_initial_loss
    from lightning_diag.checks.overfit import OverfitResult as OverfitResult
    from lightning_diag.checks.overfit import overfit_small_batch as overfit_small_batch
    from lightning_diag.findings import DiagnosticError as DiagnosticError
    from lightning_diag.findings import DiagnosticWarning as DiagnosticWarning
    from lightning_diag.findings import Finding as Finding
    from lightning_diag.findings import Severity as Severity
    from lightning_diag.findings import load_findings as load_findings
    from lightning_diag.inference import CheckpointLoadError as CheckpointLoadError
    from lightning_diag.inference import EnsembleModel as EnsembleModel
    from lightning_diag.inference import load_ema_weights as load_ema_weights
    from lightning_diag.inference import train_ensemble as train_ensemble
    from lightning_diag.inference import train_top_configs as train_top_configs

import lightning_diag.findings  # noqa: F401  (light; loaded now for the name below)

# `lightning_diag.findings` names the function `lightning_diag.base.findings` (trainer ->
# findings), as it always has; loading the submodule of that name set the attribute to the
# module, so it is dropped here and found, like every other name, by `__getattr__`.
del globals()["findings"]

__version__ = "0.1.0"

#: Where each public name lives.
_SOURCES: dict[str, tuple[str, ...]] = {
    "lightning_diag.base": ("DiagnosticCallback", "findings"),
    "lightning_diag.checks.data.inspect": ("inspect_dataset",),
    "lightning_diag.checks.diagnosis": ("diagnose",),
    "lightning_diag.checks.gradients": ("check_gradients",),
    "lightning_diag.checks.initial_loss": ("check_initial_loss",),
    "lightning_diag.checks.overfit": ("OverfitResult", "overfit_small_batch"),
    "lightning_diag.findings": ("DiagnosticError", "DiagnosticWarning", "Finding", "Severity",
                                "load_findings"),
    "lightning_diag.inference": ("CheckpointLoadError", "EnsembleModel", "load_ema_weights",
                                 "train_ensemble", "train_top_configs"),
}


def _callback_names() -> tuple[str, ...]:
    """``lightning_diag.callbacks.__all__``, read from its source without importing it (that
    would load torch and Lightning): adding a callback there exports it here too."""
    source = Path(__file__).with_name("callbacks") / "__init__.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise ImportError(f"{source} declares no __all__")


_SOURCES["lightning_diag.callbacks"] = _callback_names()
_LAZY = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_diag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""Step 6 of the recipe: learning-rate sweep, random search (Optuna), refinement, ``tune``.

Example:
    >>> from lightning_diag.tuning import lr_sweep, random_search, refine, tune
    >>> callable(tune)
    True
"""

from lightning_diag.tuning.pipeline import TuneSummary, tune
from lightning_diag.tuning.pruning import (
    PRUNING_CODES,
    DiagnosisPruning,
    describe_end,
    ends_trial,
    trial_monitors,
)
from lightning_diag.tuning.records import RefinedConfig, RefineResult, SearchResult, TrialRecord
from lightning_diag.tuning.refine import refine
from lightning_diag.tuning.search import random_search
from lightning_diag.tuning.study import RunDirInUseError, StorageError
from lightning_diag.tuning.sweep import (
    LRComparison,
    ModelFactory,
    SweepResult,
    compare_with_lr_find,
    lr_sweep,
)

__all__ = [
    "PRUNING_CODES",
    "DiagnosisPruning",
    "LRComparison",
    "ModelFactory",
    "RefineResult",
    "RefinedConfig",
    "RunDirInUseError",
    "SearchResult",
    "StorageError",
    "SweepResult",
    "TrialRecord",
    "TuneSummary",
    "compare_with_lr_find",
    "describe_end",
    "ends_trial",
    "lr_sweep",
    "random_search",
    "refine",
    "trial_monitors",
    "tune",
]

"""Pure tensor maths behind the callbacks, testable without a Trainer."""

from lightning_diag.functional.checks import (
    centered_difference,
    count_param_layers,
    directional_difference,
    expected_initial_loss,
    gradient_tolerance,
    has_kinks,
    kink_gap,
    relative_error,
)
from lightning_diag.functional.curves import (
    diverged,
    is_jump,
    jump_threshold,
    pick_learning_rate,
    plateau_length,
    running_median,
    smooth_ema,
)
from lightning_diag.functional.data import (
    class_counts,
    constant_mask,
    duplicate_groups,
    hashed_similar_pairs,
    imbalance_ratio,
    sample_hashes,
    similar_pairs,
)
from lightning_diag.functional.ema import all_finite, ema_update_, warmup_decay
from lightning_diag.functional.ensemble import combine_outputs
from lightning_diag.functional.monitors import (
    gradient_flow,
    layer_stats,
    update_ratios,
)

__all__ = [
    "all_finite",
    "centered_difference",
    "class_counts",
    "combine_outputs",
    "constant_mask",
    "count_param_layers",
    "directional_difference",
    "diverged",
    "duplicate_groups",
    "ema_update_",
    "expected_initial_loss",
    "gradient_flow",
    "gradient_tolerance",
    "has_kinks",
    "hashed_similar_pairs",
    "imbalance_ratio",
    "is_jump",
    "jump_threshold",
    "kink_gap",
    "layer_stats",
    "pick_learning_rate",
    "plateau_length",
    "relative_error",
    "running_median",
    "sample_hashes",
    "similar_pairs",
    "smooth_ema",
    "update_ratios",
    "warmup_decay",
]

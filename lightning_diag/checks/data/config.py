"""The validated settings of a data inspection, shared by the scan and the search.

Example:
    >>> from lightning_diag.checks.data.config import InspectionConfig
    >>> InspectionConfig(max_samples=1)
    Traceback (most recent call last):
    ...
    ValueError: `max_samples` must be an int >= 2, got 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_diag.batch import BatchFn, default_batch_to_input, default_batch_to_target

__all__ = ["InspectionConfig"]


@dataclass(frozen=True)
class InspectionConfig:
    """Validated settings of a data inspection (see :func:`inspect_dataset` for their meaning)."""

    num_classes: int | None = None
    max_samples: int = 100_000
    near_threshold: float = 0.997
    imbalance_ratio: float = 10.0
    dim: int = 64
    chunk_size: int = 2048
    seed: int = 0
    progress: bool = True
    progress_min: int = 10_000
    num_threads: int | None = 1
    batch_to_input: BatchFn = default_batch_to_input
    batch_to_target: BatchFn = default_batch_to_target

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"`{name}` must be {allowed}, got {getattr(self, name)!r}.")

        def integer(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int) and not isinstance(value, bool)

        need(self.num_classes is None or (integer("num_classes") and self.num_classes >= 1),
             "num_classes", "None or an int >= 1")
        for name, low in (("max_samples", 2), ("dim", 8), ("chunk_size", 1), ("progress_min", 0)):
            need(integer(name) and getattr(self, name) >= low, name, f"an int >= {low}")
        need(integer("seed"), "seed", "an int")
        need(self.num_threads is None or (integer("num_threads") and self.num_threads >= 1),
             "num_threads", "None or an int >= 1")
        need(isinstance(self.near_threshold, (int, float)) and 0 < self.near_threshold < 1,
             "near_threshold", "a float in (0, 1) (cosine similarity of centred samples)")
        need(isinstance(self.imbalance_ratio, (int, float)) and self.imbalance_ratio > 1,
             "imbalance_ratio", "a number > 1 (commonest / rarest class count)")
        need(isinstance(self.progress, bool), "progress", "a bool")
        for name in ("batch_to_input", "batch_to_target"):
            if not callable(getattr(self, name)):
                raise TypeError(f"`{name}` must be callable, got {getattr(self, name)!r}.")

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
from lightning_diag.validation import (
    check_callable,
    check_flag,
    check_int,
    check_number,
    check_str,
)

__all__ = ["InspectionConfig"]


@dataclass(frozen=True)
class InspectionConfig:
    """Validated settings of a data inspection (see :func:`inspect_dataset` for their meaning)."""

    num_classes: int | None = None
    #: The class count the model's output gives (set by the callback from one step of a
    #: copy: the width of ``(N, C)`` scores, or 2 for a single binary logit), used when
    #: ``num_classes`` is None; ``output_source`` says how it was read, for messages.
    output_classes: int | None = None
    output_source: str = "the model's output width"
    max_samples: int = 100_000
    near_threshold: float = 0.997
    token_threshold: float = 0.8
    imbalance_ratio: float = 10.0
    dim: int = 64
    chunk_size: int = 2048
    seed: int = 0
    progress: bool = True
    progress_min: int = 10_000
    num_threads: int | None = 1
    num_workers: int = 0
    batch_to_input: BatchFn = default_batch_to_input
    batch_to_target: BatchFn = default_batch_to_target

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, optional=True)
        check_int("output_classes", self.output_classes, optional=True)
        check_str("output_source", self.output_source)
        for name, low in (("max_samples", 2), ("dim", 8), ("chunk_size", 1), ("progress_min", 0)):
            check_int(name, getattr(self, name), low=low)
        check_int("seed", self.seed, low=None)
        check_int("num_threads", self.num_threads, optional=True)
        check_int("num_workers", self.num_workers, low=0)
        check_number("near_threshold", self.near_threshold, low=0, high=1, low_open=True,
                     high_open=True)
        check_number("token_threshold", self.token_threshold, low=0, high=1, low_open=True,
                     high_open=True)
        check_number("imbalance_ratio", self.imbalance_ratio, low=1, low_open=True)
        check_flag("progress", self.progress)
        check_callable("batch_to_input", self.batch_to_input)
        check_callable("batch_to_target", self.batch_to_target)

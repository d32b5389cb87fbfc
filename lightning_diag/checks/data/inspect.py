"""Look at the data first (step 1 of the recipe): duplicates, leaks, corrupt samples and labels.

:func:`inspect_dataset` reads map-style datasets by index (no DataLoader, no shuffling) and returns
:class:`~lightning_diag.findings.Finding` objects; it needs no Trainer, so it works in a notebook.
:class:`~lightning_diag.callbacks.data_inspection.DataInspection` runs it at fit start.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lightning_diag.checks.data.inspect import inspect_dataset
    >>> x = torch.rand(6, 1, 4, 4)
    >>> x[5] = x[0]
    >>> found = inspect_dataset(TensorDataset(x, torch.tensor([0, 1, 0, 1, 0, 0])))
    >>> [(f.code, f.indices) for f in found if f.code == "data.exact_duplicate"]
    [('data.exact_duplicate', (0, 5))]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_diag.batch import BatchFn, default_batch_to_input, default_batch_to_target
from lightning_diag.checks.data.config import InspectionConfig
from lightning_diag.checks.data.findings import findings_of
from lightning_diag.checks.data.scan import DataReport, NotInspectable, SplitScan
from lightning_diag.findings import Finding, Severity
from lightning_diag.functional.data import (
    candidate_threshold,
    centered_cosine,
    connected_groups,
    duplicate_groups,
    hashed_similar_pairs,
    similar_pairs,
)
from lightning_diag.functional.tokens import (
    SHINGLE,
    background_share,
    jaccard,
    margin_for,
    min_ngrams,
    shingles,
    similar_signature_pairs,
)
from lightning_diag.isolation import preserved_generators, preserved_rng

__all__ = [
    "EXACT_SEARCH_PAIRS",
    "MAX_BACKGROUND",
    "MIN_NEAR_FEATURES",
    "DataReport",
    "InspectionConfig",
    "SplitScan",
    "inspect_dataset",
    "run_inspection",
]

MakeFinding = Callable[..., Finding]

# Below this many features a correlation of 0.997 happens by chance (3 random numbers often
# correlate that well): near duplicates are searched only on inputs with at least this many.
MIN_NEAR_FEATURES = 16

#: Token sequences: near duplicates are not searched when more than this share of random pairs
#: already overlap at the threshold (chance, not copies). Text: 0 of 2,000 random pairs.
MAX_BACKGROUND = 0.01

# Above this many sample pairs (a set of ~141,000 with itself) near duplicates are searched by
# random-hyperplane hashing (about N log N; a pair at the threshold is missed with probability
# below 1e-6) rather than by comparing every pair (exact, N**2).
EXACT_SEARCH_PAIRS = 10**10


def inspect_dataset(
    train: Any, val: Any = None, num_classes: int | None = None, *,
    max_samples: int = 100_000, near_threshold: float = 0.997, token_threshold: float = 0.8,
    imbalance_ratio: float = 10.0, batch_to_input: BatchFn = default_batch_to_input,
    batch_to_target: BatchFn = default_batch_to_target, dim: int = 64, chunk_size: int = 2048,
    seed: int = 0, progress: bool = True, num_threads: int | None = 1, num_workers: int = 0,
) -> list[Finding]:
    """Inspect a training set (and optionally a validation set) before training on it.

    Args:
        train: A map-style dataset (``len`` and ``[i]``) of tuples ``(x, y, ...)``, dicts, or
            tensors. Inputs may be images ``(C, H, W)`` or flat vectors.
        val: The validation dataset, checked the same way and for leakage from ``train``.
        num_classes: Number of classes; inferred as ``max(train label) + 1`` when None.
        max_samples: Each set larger than this is inspected on a seeded random subset of this
            size (an info finding says so).
        near_threshold: Cosine similarity of per-sample centred inputs above which two distinct
            samples are near duplicates. 0.997 sits above the closest distinct pair of
            scikit-learn's digits (0.9942, two 1s) and below a copy with a little noise.
        token_threshold: For token sequences (1-D integer inputs, compared as sequences, never
            as intensities): the Jaccard similarity of two sequences' sets of 3-token n-grams
            above which they are near duplicates. 0.8 is the usual near-duplicate threshold
            for text; see ``docs/callbacks/data_inspection.md`` for the margin measured.
        imbalance_ratio: Warn when the commonest class has this many times the rarest's samples.
        batch_to_input: Maps a sample to its input (default: ``sample[0]`` or a known dict key).
        batch_to_target: Maps a sample to its target (default: ``sample[1]``, a known key, None).
        dim: Dimensions of the reduced representation used to search near duplicates.
        chunk_size: Block side of the similarity search (peak memory ``chunk_size**2`` floats).
        seed: Seed of the subset and of the random projection (a local generator; the global
            RNG streams are left as they were).
        progress: Show a progress bar on sets of 10,000 samples or more.
        num_threads: torch intra-op threads during the inspection (restored afterwards); None
            keeps the current setting. The work is many small per-chunk operations: on the
            2-core benchmark machine one thread took a third of the CPU time of two.
        num_workers: Processes reading the samples (a DataLoader's workers), for datasets whose
            ``__getitem__`` decodes files; each reads, hashes and reduces blocks of 1,024
            samples and sends back only the hashes and reduced representations. 0 reads here.

    Returns:
        The findings: ``data.*`` codes, see ``docs/callbacks/data_inspection.md``; only
        ``data.skipped`` (info) when a set has no ``len()`` or its first sample holds no input
        the readers find (the message names ``batch_to_input=`` / ``batch_to_target=``).

    Example:
        >>> from lightning_diag.examples.digits import load_digits_tensors
        >>> from torch.utils.data import TensorDataset
        >>> x, y = load_digits_tensors()
        >>> found = inspect_dataset(TensorDataset(x[:1400], y[:1400]),
        ...                         TensorDataset(x[1400:], y[1400:]))
        >>> [f.severity.value for f in found if f.code != "data.summary"]
        []
    """
    config = InspectionConfig(
        num_classes=num_classes, max_samples=max_samples, near_threshold=near_threshold,
        token_threshold=token_threshold, imbalance_ratio=imbalance_ratio, dim=dim,
        chunk_size=chunk_size, seed=seed, progress=progress, batch_to_input=batch_to_input,
        batch_to_target=batch_to_target, num_threads=num_threads, num_workers=num_workers,
    )

    def make(code: str, severity: Any, message: str, **kw: Any) -> Finding:
        return Finding(check="inspect_dataset", code=code, severity=severity, message=message,
                       **kw)

    try:
        return run_inspection(train, val, config, make).findings
    except NotInspectable as err:
        return [make("data.skipped", Severity.INFO, f"inspect_dataset skipped: {err}")]


def run_inspection(train: Any, val: Any, config: InspectionConfig, make: MakeFinding) -> DataReport:
    """Scan both sets, search duplicates and leaks, and build the findings (global RNG and the
    datasets' own generators restored, since a dataset's ``__getitem__`` may draw random
    augmentations).

    Raises:
        NotInspectable: a set has no ``len()`` or its first sample holds no readable input.
    """
    with preserved_rng(), preserved_generators(train, val), torch.no_grad(), \
            _threads(config.num_threads):
        scan_train = SplitScan.read(train, "train", config)
        scan_val = SplitScan.read(val, "validation", config) if val is not None else None
        if scan_val is not None and not _comparable(scan_train, scan_val):
            scan_val.exclude_all()  # inputs of another shape cannot be compared with train
        report = DataReport(train=scan_train, val=scan_val, config=config)
        searched = {}
        for scan in report.scans():
            report.exact[scan.name] = [scan.to_indices(g) for g in duplicate_groups(scan.keys())]
            searched[scan.name], report.near_skipped[scan.name] = _token_gate(scan, config)
            report.near[scan.name] = ([scan.to_indices(g) for g in _near_groups(scan, config)]
                                      if searched[scan.name] else [])
        if scan_val is not None:
            report.leaks = _leaks(scan_train, scan_val, config, near=searched[scan_train.name])
        report.findings = findings_of(report, make)
    return report


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _verify(
    pairs: torch.Tensor, a: SplitScan, b: SplitScan, config: InspectionConfig
) -> torch.Tensor:
    """Keep the candidate pairs (positions) whose full inputs are similar enough."""
    if len(pairs) == 0 or a.projection is None:
        return pairs  # the search ran on the full (centred, normalised) inputs: already exact
    left = torch.stack([a.full_input(int(i)) for i in pairs[:, 0]])
    right = torch.stack([b.full_input(int(j)) for j in pairs[:, 1]])
    return pairs[centered_cosine(left, right) >= config.near_threshold]


def _comparable(train: SplitScan, val: SplitScan) -> bool:
    """Whether validation inputs can be compared with training ones: the same shape, or token
    sequences on both sides (of any lengths)."""
    return train.tokens == val.tokens and (train.tokens or val.shape == train.shape)


def _near_reps(scan: SplitScan, config: InspectionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The representations searched for near duplicates and their positions: every comparable
    sample, but for token sequences only those long enough to judge (:func:`min_ngrams`)."""
    reps, pos = scan.valid_reps()
    if scan.tokens:
        keep = scan.ngrams[pos] >= min_ngrams(config.token_threshold)
        reps, pos = reps[keep], pos[keep]
    return reps, pos


def _token_gate(scan: SplitScan, config: InspectionConfig) -> tuple[bool, str]:
    """Whether near duplicates of ``scan``'s token sequences are searched at all, and why some
    or all are not ("" when every sequence is)."""
    if not scan.tokens:
        return True, ""
    reps, pos = _near_reps(scan, config)
    share = background_share(reps, config.token_threshold, seed=config.seed)
    if share > MAX_BACKGROUND:
        return False, (
            f"{share:.0%} of random pairs of its integer sequences already share "
            f"{config.token_threshold:g} of their {SHINGLE}-token n-grams (Jaccard), so an "
            f"overlap that high says nothing (allowed: {MAX_BACKGROUND:.0%}); these look like "
            "codes over a few symbols, not text")
    short = int(scan.valid.sum()) - len(pos)
    if not short:
        return True, ""
    need = min_ngrams(config.token_threshold)
    return len(pos) > 1, (
        f"{short} of {int(scan.valid.sum())} token sequences hold fewer than {need} distinct "
        f"{SHINGLE}-token n-grams (median {int(scan.ngrams[scan.valid].median())}), too few for "
        f"their overlap to tell a near copy from another sentence (a Jaccard of "
        f"{config.token_threshold:g} means at most one changed token in {need} n-grams); they "
        "were compared for exact copies only")


def _token_candidates(a: SplitScan, b: SplitScan | None,
                      config: InspectionConfig) -> torch.Tensor:
    """Position pairs of token sequences whose n-gram sets overlap at ``token_threshold`` or
    more: candidates from the MinHash signatures, those near the threshold verified exactly."""
    threshold = config.token_threshold
    margin = margin_for(threshold=threshold)
    ra, pa = _near_reps(a, config)
    rb, pb = (ra, pa) if b is None else _near_reps(b, config)
    found, estimate = similar_signature_pairs(ra, None if b is None else rb, threshold,
                                              margin=margin)
    pairs = torch.stack([pa[found[:, 0]], pb[found[:, 1]]], dim=1)
    other = a if b is None else b
    keep = [bool(e >= threshold + margin) or _exact_overlap(a, int(i), other, int(j)) >= threshold
            for (i, j), e in zip(pairs.tolist(), estimate.tolist(), strict=True)]
    return pairs[torch.tensor(keep, dtype=torch.bool)] if keep else pairs


def _exact_overlap(a: SplitScan, i: int, b: SplitScan, j: int) -> float:
    """The exact Jaccard similarity of the n-gram sets of two sequences, read again."""
    left, right = (s.sample(int(s.indices[p])).reshape(1, -1) for s, p in ((a, i), (b, j)))
    return jaccard(shingles(left)[0], shingles(right)[0])


def _candidates(a: SplitScan, b: SplitScan | None, config: InspectionConfig) -> torch.Tensor:
    """Similar position pairs of ``a`` (with itself, or with ``b``), verified on full inputs."""
    if a.tokens:
        return _token_candidates(a, b, config)
    if a.features < MIN_NEAR_FEATURES:
        return torch.zeros(0, 2, dtype=torch.long)
    threshold = candidate_threshold(config.near_threshold, a.projection is not None)
    ra, pa = a.valid_reps()
    rb, pb = (ra, pa) if b is None else b.valid_reps()
    pairs_to_compare = len(ra) * (len(ra) - 1) // 2 if b is None else len(ra) * len(rb)
    if pairs_to_compare > EXACT_SEARCH_PAIRS:
        found, _ = hashed_similar_pairs(ra, None if b is None else rb, threshold,
                                        seed=config.seed)
    else:
        found, _ = similar_pairs(ra, None if b is None else rb, threshold, config.chunk_size)
    pairs = torch.stack([pa[found[:, 0]], pb[found[:, 1]]], dim=1)
    return _verify(pairs, a, a if b is None else b, config)


def _near_groups(scan: SplitScan, config: InspectionConfig) -> list[list[int]]:
    pairs = _candidates(scan, None, config)
    distinct = [bool(scan.hashes[i] != scan.hashes[j]) for i, j in pairs.tolist()]
    keep = pairs[torch.tensor(distinct, dtype=torch.bool)] if distinct else pairs
    return connected_groups(keep)


def _leaks(train: SplitScan, val: SplitScan, config: InspectionConfig,
           near: bool = True) -> dict[str, Any]:
    """Train/validation pairs (dataset indices) sharing an input, exactly or (with ``near``)
    nearly."""
    by_hash: dict[bytes, list[int]] = {}
    for pos, key in enumerate(train.hashes):
        if key is not None:
            by_hash.setdefault(key, []).append(pos)
    exact = [(i, j) for j, key in enumerate(val.hashes) if key is not None
             for i in by_hash.get(key, [])]
    close = [tuple(p) for p in _candidates(train, val, config).tolist()] if near else []
    pairs = sorted(set(exact) | set(close))
    return {
        "pairs": [(int(train.indices[i]), int(val.indices[j])) for i, j in pairs],
        "exact": len(exact),
    }

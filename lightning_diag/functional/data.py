"""Pure maths behind the data inspection (step 1 of the recipe: "look at the data first").

Exact duplicates are found by hashing each sample's bytes; near duplicates on reduced
representations (per-sample centred, L2-normalised, randomly projected to a few dimensions) whose
cosine similarities are computed block by block, so memory stays bounded by the block size and
never holds an ``N x N`` matrix.

Example:
    >>> import torch
    >>> from lightning_diag.functional.data import sample_hashes, duplicate_groups
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    >>> duplicate_groups(sample_hashes(x))
    [[0, 2]]
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import torch

__all__ = [
    "candidate_threshold",
    "centered_cosine",
    "class_counts",
    "connected_groups",
    "constant_mask",
    "duplicate_groups",
    "image_grid",
    "imbalance_ratio",
    "principal_direction",
    "projection_matrix",
    "reduce_samples",
    "sample_hashes",
    "similar_pairs",
]


def sample_hashes(x: torch.Tensor) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each row of ``x`` (``(N, ...)``): equal rows, equal digests."""
    flat = x.detach().reshape(len(x), -1).contiguous().cpu()
    raw = flat.numpy().view("uint8").reshape(len(flat), -1) if len(flat) else flat.numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in raw]


def duplicate_groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Positions sharing a key, as groups of two or more, ordered by their first position."""
    where: dict[Hashable, list[int]] = {}
    for pos, key in enumerate(keys):
        where.setdefault(key, []).append(pos)
    return sorted((g for g in where.values() if len(g) > 1), key=lambda g: g[0])


def constant_mask(x: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """True for the rows of finite ``x`` (``(N, D)``) whose values are all equal (blank samples)."""
    hi, lo = x.amax(dim=1), x.amin(dim=1)
    return (hi - lo) <= rtol * (1.0 + hi.abs())


def projection_matrix(in_features: int, dim: int, seed: int = 0) -> torch.Tensor | None:
    """A ``(in_features, dim)`` Gaussian random projection, or None when no reduction is needed.

    Drawn from a local ``torch.Generator``: the global RNG is not touched.
    """
    if in_features <= dim:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(in_features, dim, generator=gen) / dim**0.5


def _center_normalize(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reduce_samples(x: torch.Tensor, projection: torch.Tensor | None = None) -> torch.Tensor:
    """Reduced representation: centred, L2-normalised, projected, re-normalised rows.

    Centring per sample makes the cosine a correlation, blind to brightness and contrast changes
    (a re-encoded copy stays close); constant rows map to the zero vector, similar to nothing.

    Args:
        x: ``(N, D)`` finite float samples.
        projection: From :func:`projection_matrix`; None keeps the ``D`` dimensions.
    """
    rep = _center_normalize(x.float())
    zero = rep.norm(dim=1) < 0.5
    if projection is not None:
        rep = rep @ projection
        rep = rep / rep.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rep[zero] = 0.0
    return rep


def centered_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of per-sample centred ``a`` and ``b`` (``(N, D)`` each): the exact similarity
    that :func:`reduce_samples` approximates."""
    return (_center_normalize(a.float()) * _center_normalize(b.float())).sum(dim=1)


def candidate_threshold(threshold: float, projected: bool, slack: float = 2.56) -> float:
    """The looser similarity to search with on projected representations.

    A random projection to ``d`` dimensions scales distances by ``sqrt(chi2_d / d)``; allowing
    distances 1.6x longer (``slack = 1.6**2`` on ``1 - cos``) misses a true pair with negligible
    probability at ``d = 64``; candidates are then verified on the full samples.
    """
    return 1.0 - slack * (1.0 - threshold) if projected else threshold


def principal_direction(x: torch.Tensor, max_rows: int = 10_000) -> torch.Tensor:
    """The unit direction of largest variance of the rows of ``x`` (from the first ``max_rows``)."""
    sample = x[:max_rows].float()
    centred = sample - sample.mean(dim=0)
    if len(centred) < 2 or not bool(centred.abs().max() > 0):
        return torch.nn.functional.normalize(torch.ones(x.shape[1]), dim=0)
    # eigenvectors of the small (d, d) covariance: far cheaper than an SVD of the rows
    return torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -1]


def similar_pairs(
    a: torch.Tensor, b: torch.Tensor | None = None, threshold: float = 0.99, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs with cosine ``>= threshold`` between unit rows, in ``chunk x chunk`` blocks.

    Rows are sorted by their coordinate along the principal direction ``w``. Two unit rows with
    cosine ``>= t`` are at most ``sqrt(2 (1 - t))`` apart, so their coordinates differ by at most
    that much (``|w.u - w.v| <= |u - v|``): each row chunk is compared only with the window of
    rows whose coordinates are that close. The result is exact; the window only skips work.

    Args:
        a: ``(N, d)`` unit (or zero) rows.
        b: ``(M, d)`` rows to compare against; None searches ``a`` against itself (pairs ``i < j``).
        threshold: Minimum cosine similarity, in ``(0, 1)``.
        chunk: Block side; peak extra memory is ``chunk**2`` floats.

    Returns:
        ``(P, 2)`` int64 pairs (row of ``a``, row of ``b`` or ``a``) and their ``(P,)``
        similarities.
    """
    other = a if b is None else b
    if len(a) == 0 or len(other) == 0:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)
    direction = principal_direction(a if b is None else torch.cat([a[:5000], other[:5000]]))
    key_a, order_a = (a @ direction).sort()
    key_b, order_b = (key_a, order_a) if b is None else (other @ direction).sort()
    sa, sb = a[order_a], other[order_b]
    radius = (2.0 * (1.0 - threshold)) ** 0.5 + 1e-6
    pairs: list[torch.Tensor] = []
    sims: list[torch.Tensor] = []
    for i0 in range(0, len(sa), chunk):
        i1 = min(i0 + chunk, len(sa))
        lo = int(torch.searchsorted(key_b, key_a[i0] - radius))
        hi = int(torch.searchsorted(key_b, key_a[i1 - 1] + radius, right=True))
        for j0 in range(max(lo, i0) if b is None else lo, hi, chunk):
            j1 = min(j0 + chunk, hi)
            block = sa[i0:i1] @ sb[j0:j1].T
            if not bool(block.max() >= threshold):  # the usual case: skip the costly nonzero
                continue
            hit = block >= threshold
            if b is None and j0 < i1:  # keep sorted pairs i < j only
                hit = hit.triu(diagonal=i0 - j0 + 1)
            rows, cols = hit.nonzero(as_tuple=True)
            if len(rows):
                pairs.append(torch.stack([order_a[rows + i0], order_b[cols + j0]], dim=1))
                sims.append(block[rows, cols])
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)
    found = torch.cat(pairs)
    if b is None:
        found = found.sort(dim=1).values
    return found, torch.cat(sims)


def connected_groups(pairs: torch.Tensor) -> list[list[int]]:
    """Connected components (size >= 2) of the graph whose edges are ``pairs`` (``(P, 2)``)."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Samples per class in ``[0, num_classes)``; labels outside that range are not counted."""
    ok = (labels >= 0) & (labels < num_classes)
    return torch.bincount(labels[ok].long(), minlength=num_classes)


def imbalance_ratio(counts: torch.Tensor) -> float:
    """Commonest over rarest class count, among classes present (``1.0`` for one class or none)."""
    present = counts[counts > 0]
    if len(present) < 2:
        return 1.0
    return float(present.max()) / float(present.min())


def image_grid(rows: list[list[torch.Tensor]], pad: int = 1, scale: int = 1) -> torch.Tensor:
    """Tile images into a ``(3, H, W)`` grid in [0, 1], one list per row (short rows left blank).

    Each image (``(H, W)``, ``(1, H, W)`` or ``(3, H, W)``, all the same size) is min-max scaled
    on its own and enlarged ``scale`` times (nearest neighbour); non-finite values show as 0.
    """
    cells = [[_to_rgb(img).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
              for img in row] for row in rows if row]
    height, width = cells[0][0].shape[1:]
    ncol = max(len(row) for row in cells)
    grid = torch.ones(3, len(cells) * (height + pad) + pad, ncol * (width + pad) + pad)
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[:, top:top + height, left:left + width] = img
    return grid


def _to_rgb(img: torch.Tensor) -> torch.Tensor:
    img = torch.nan_to_num(img.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)

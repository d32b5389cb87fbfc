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
import math
from collections.abc import Hashable, Sequence

import torch

__all__ = [
    "candidate_threshold",
    "centered_cosine",
    "class_counts",
    "connected_groups",
    "constant_mask",
    "duplicate_groups",
    "hashed_similar_pairs",
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


def hashed_similar_pairs(
    a: torch.Tensor, b: torch.Tensor | None = None, threshold: float = 0.99, miss: float = 1e-6,
    seed: int = 0, extra_bits: int = 8, max_bucket: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of :func:`similar_pairs`, in about ``N log N`` time instead of ``N**2``.

    Random-hyperplane hashing: ``k`` sign bits per table, one table per set of ``k`` random
    hyperplanes; only rows sharing a table's key are compared. Two unit rows at angle ``theta``
    share a bit with probability ``1 - theta / pi``, so a pair at the threshold shares a key in
    at least one of ``L`` tables except with probability ``(1 - p**k)**L``; ``L`` is chosen to
    make that at most ``miss`` (1e-6 by default; closer pairs are missed less often still). With
    ``k = log2(N) + extra_bits``, a table groups about ``N / 2**extra_bits`` unrelated pairs.

    Args:
        a: ``(N, d)`` unit (or zero) rows; zero rows are similar to nothing.
        b: ``(M, d)`` rows to compare against; None searches ``a`` against itself (pairs ``i < j``).
        threshold: Minimum cosine similarity, in ``(0, 1)``.
        miss: The largest chance to miss one pair at exactly ``threshold``.
        seed: Seed of the hyperplanes (a local generator).
        extra_bits: Bits per key beyond ``log2(N + M)``: more bits, fewer unrelated pairs to
            check, more tables to hash.
        max_bucket: Rows sharing a key beyond this many are compared as one block.

    Returns:
        ``(P, 2)`` int64 pairs, each once, sorted (row of ``a``, row of ``b`` or ``a``), and their
        ``(P,)`` similarities.

    Example:
        >>> import torch
        >>> x = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
        >>> x[7] = torch.nn.functional.normalize(x[3] + 0.01 * torch.randn(16), dim=0)
        >>> hashed_similar_pairs(x, threshold=0.99)[0].tolist()
        [[3, 7]]
    """
    rows = a if b is None else torch.cat([a, b])
    live = (rows.norm(dim=1) > 0.5).nonzero().flatten()
    x = rows if len(live) == len(rows) else rows[live]
    side = None if b is None else live >= len(a)
    n = len(x)
    empty = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)
    if n < 2:
        return empty
    bits = min(48, math.ceil(math.log2(n)) + extra_bits)
    p = 1.0 - math.acos(threshold) / math.pi
    tables = max(1, math.ceil(math.log(miss) / math.log1p(-(p**bits))))
    gen = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    for t0 in range(0, tables, 8):  # 8 tables of keys at a time: bounded memory
        keys = _hash_keys(x, bits, min(8, tables - t0), gen)
        for key in keys:
            left, right = _same_key_pairs(key, x, threshold, max_bucket)
            if side is not None:
                across = side[left] != side[right]
                left, right = left[across], right[across]
            for i in range(0, len(left), 1 << 16):  # the pairs' rows, gathered in chunks
                li, ri = left[i:i + (1 << 16)], right[i:i + (1 << 16)]
                hit = (x[li] * x[ri]).sum(dim=1) >= threshold
                found.append(torch.stack([li[hit], ri[hit]], dim=1))
    pairs = torch.cat(found) if found else empty[0]
    if len(pairs) == 0:
        return empty
    if side is None:
        pairs = pairs.sort(dim=1).values
    else:  # the row of `a` first
        pairs = torch.where(side[pairs[:, :1]], pairs.flip(1), pairs)
    pairs = torch.unique(pairs, dim=0)
    sims = (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(dim=1)
    pairs = live[pairs]
    if side is not None:
        pairs[:, 1] -= len(a)
    return pairs, sims


def _hash_keys(x: torch.Tensor, bits: int, tables: int, gen: torch.Generator,
               rows: int = 16384) -> torch.Tensor:
    """``(tables, N)`` int64 keys: the sign bits of ``x`` on ``bits`` random hyperplanes each."""
    planes = torch.randn(x.shape[1], tables * bits, generator=gen)
    low = min(bits, 24)  # packed as two float32 halves below 2**24: exact
    pack = torch.zeros(bits, 2)
    pack[:low, 0] = 2.0 ** torch.arange(low)
    pack[low:, 1] = 2.0 ** torch.arange(bits - low)
    keys = torch.empty(tables, len(x), dtype=torch.int64)
    for i in range(0, len(x), rows):
        signs = (x[i:i + rows] @ planes > 0).float().view(-1, tables, bits)
        halves = (signs @ pack).to(torch.int64)
        keys[:, i:i + rows] = (halves[..., 0] + (halves[..., 1] << 24)).T
    return keys


def _same_key_pairs(key: torch.Tensor, x: torch.Tensor, threshold: float,
                    max_bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pairs sharing ``key``: all of them in buckets of up to ``max_bucket`` rows, and those
    at ``threshold`` or above in larger buckets (compared as blocks)."""
    sorted_key, order = key.sort()
    n = len(key)
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    starts = start.nonzero().flatten()
    sizes = torch.diff(starts, append=torch.tensor([n]))
    size_of = torch.repeat_interleave(sizes, sizes)
    small = (size_of >= 2) & (size_of <= max_bucket)
    k, o = sorted_key[small], order[small]
    left, right = [], []
    for d in range(1, int(size_of[small].max()) if bool(small.any()) else 1):
        at = (k[d:] == k[:-d]).nonzero().flatten()  # rows d apart in one bucket
        left.append(o[at])
        right.append(o[at + d])
    for big in (sizes > max_bucket).nonzero().flatten().tolist():
        members = order[starts[big]:starts[big] + sizes[big]]
        i, j = (x[members] @ x[members].T >= threshold).triu(diagonal=1).nonzero(as_tuple=True)
        left.append(members[i])
        right.append(members[j])
    if not left:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(left), torch.cat(right)


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

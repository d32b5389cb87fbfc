"""Token sequences compared as sequences, never as intensities (recipe step 1, for text).

Integer token ids carry no magnitude: token 7 is no closer to token 8 than to token 900, so the
centred cosine that finds near-identical images finds padding patterns in text (two sentences
of one length padded with 0 correlate, whatever their words). Sequences are compared instead by
the overlap of their token n-grams: the Jaccard similarity of their sets of ``n`` consecutive
tokens (``n = 3``, :data:`SHINGLE`), a standard measure of near-duplicate text. Exact duplicates
are still found by hashing each sequence's values, as for any input.

Near duplicates are searched with MinHash signatures (:func:`minhash`: the minimum of each of
``k`` random hash functions over a sequence's n-grams; two signatures agree at each position
with probability equal to the Jaccard similarity) and banding (:func:`similar_signature_pairs`:
sequences sharing all ``r`` values of one of ``b`` bands become candidates), so the search grows
as the number of sequences, not its square.

Example:
    >>> import torch
    >>> x = torch.tensor([[5, 9, 2, 7, 1, 4, 8, 3, 6, 2, 11, 12, 0, 0],
    ...                   [5, 9, 2, 7, 1, 4, 8, 3, 6, 2, 11, 13, 0, 0],   # one word changed
    ...                   [5, 9, 7, 2, 4, 1, 3, 8, 2, 6, 12, 11, 0, 0]])  # the same words
    >>> grams = shingles(x)
    >>> round(jaccard(grams[0], grams[1]), 3), round(jaccard(grams[0], grams[2]), 3)
    (0.6, 0.0)
    >>> pairs, estimates = similar_signature_pairs(minhash(grams), threshold=0.5)
    >>> pairs.tolist()
    [[0, 1]]
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BANDS",
    "NUM_HASHES",
    "SHINGLE",
    "background_share",
    "distinct_counts",
    "estimated_jaccard",
    "is_token_sequence",
    "jaccard",
    "margin_for",
    "min_ngrams",
    "minhash",
    "shingles",
    "similar_signature_pairs",
]

#: Tokens per n-gram: short enough for sentences of a few words, long enough that sequences
#: sharing common words (``the``, padding) but not phrases stay apart.
SHINGLE = 3
#: MinHash functions per signature; the estimate of a Jaccard similarity ``J`` has standard
#: deviation ``sqrt(J (1 - J) / 128)``, 0.035 at 0.8.
NUM_HASHES = 128
#: Bands of ``NUM_HASHES / BANDS = 4`` values: a pair at Jaccard 0.8 shares no band with
#: probability ``(1 - 0.8**4)**32 = 5e-8``, one at 0.5 becomes a candidate with probability 0.87,
#: one at 0.1 with probability 0.003.
BANDS = 32
#: Integer dtypes that hold intensities, never token ids: 8-bit images and masks.
_INTENSITY_INTS = (torch.uint8, torch.bool)


def is_token_sequence(x: torch.Tensor) -> bool:
    """Whether a sample's input is a sequence of token ids: one dimension of integers (not
    ``uint8`` or ``bool``, which hold pixels and masks).

    Example:
        >>> import torch
        >>> is_token_sequence(torch.tensor([101, 2023, 102])), is_token_sequence(torch.rand(3))
        (True, False)
    """
    return (x.dim() == 1 and not x.is_floating_point() and not x.is_complex()
            and x.dtype not in _INTENSITY_INTS)


def _constants(count: int, seed: int) -> torch.Tensor:
    """``count`` odd 63-bit multipliers from a local generator (the global RNG is not touched)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 2**62, (count,), generator=gen, dtype=torch.int64) * 2 + 1


def shingles(x: torch.Tensor, n: int = SHINGLE, lengths: torch.Tensor | None = None,
             ) -> torch.Tensor:
    """Hashes of the ``n``-grams of each row of ``x`` (``(B, T)`` token ids): ``(B, T - n + 1)``
    int64 (one n-gram of all ``T`` tokens when ``T < n``).

    With ``lengths`` (rows padded at the end to one ``T``), the n-grams past a row's length are
    replaced by its first one: the set of a row's n-grams is its own, whatever the padding.
    """
    x = x.to(torch.int64)
    n = max(1, min(n, x.shape[1]))
    mult = _constants(n, seed=1)
    windows = x.unfold(1, n, 1)  # (B, S, n)
    grams = (windows * mult).sum(dim=2)  # int64 arithmetic wraps: a hash, not a value
    if lengths is not None:
        count = (lengths.to(torch.int64) - n + 1).clamp_min(1)
        past = torch.arange(grams.shape[1]) >= count[:, None]
        grams = torch.where(past, grams[:, :1], grams)
    return grams


def minhash(grams: torch.Tensor, num_hashes: int = NUM_HASHES, seed: int = 0,
            rows: int = 0) -> torch.Tensor:
    """MinHash signatures ``(B, num_hashes)`` (int32) of the n-gram hashes ``(B, S)``.

    Hash function ``i`` maps an n-gram ``g`` to ``a_i g + b_i`` (64-bit, wrapping: a bijection
    for odd ``a_i``); a signature keeps the high 32 bits of each minimum. Rows are processed in
    blocks of ``rows`` (default: a block of about 4 million values).
    """
    a = _constants(num_hashes, seed)
    b = _constants(num_hashes, seed + 1)
    block = rows or max(1, (1 << 22) // max(1, grams.shape[1] * num_hashes))
    out = torch.empty(len(grams), num_hashes, dtype=torch.int32)
    for i in range(0, len(grams), block):
        g = grams[i:i + block, :, None]
        out[i:i + block] = ((g * a + b).amin(dim=1) >> 32).to(torch.int32)
    return out


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """The exact Jaccard similarity of the sets of values of ``a`` and ``b`` (n-gram hashes)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


def estimated_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise share of equal signature values: the MinHash estimate of the Jaccard
    similarity."""
    return (a == b).float().mean(dim=-1)


def _band_keys(sig: torch.Tensor, bands: int) -> torch.Tensor:
    """``(bands, N)`` int64 keys: a hash of each band's values."""
    rows = sig.shape[1] // bands
    mult = _constants(rows, seed=2)
    banded = sig[:, : rows * bands].to(torch.int64).view(len(sig), bands, rows)
    return (banded * mult).sum(dim=2).T


def _same_key(key: torch.Tensor, max_bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position pairs ``i < j`` sharing ``key``, each bucket of more than ``max_bucket``
    positions cut to its first ``max_bucket`` (near-identical rows: they pair with the rest
    of their bucket through another band or through the members kept)."""
    sorted_key, order = key.sort(stable=True)
    n = len(key)
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    starts = start.nonzero().flatten()
    sizes = torch.diff(starts, append=torch.tensor([n]))
    group = torch.repeat_interleave(torch.arange(len(starts)), sizes)
    rank = torch.arange(n) - starts[group]
    keep = (sizes[group] >= 2) & (rank < max_bucket)
    k, o = sorted_key[keep], order[keep]
    left, right = [], []
    for d in range(1, min(max_bucket, int(sizes.max())) if n else 1):
        at = (k[d:] == k[:-d]).nonzero().flatten()
        left.append(o[at])
        right.append(o[at + d])
    if not left:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(left), torch.cat(right)


def similar_signature_pairs(
    a: torch.Tensor, b: torch.Tensor | None = None, threshold: float = 0.8,
    bands: int = BANDS, margin: float = 0.0, max_bucket: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of signatures whose estimated Jaccard similarity is at least ``threshold - margin``,
    among those sharing a band (see the module docstring).

    Args:
        a: ``(N, k)`` signatures from :func:`minhash`.
        b: ``(M, k)`` signatures to compare against; None searches ``a`` against itself.
        threshold: The similarity sought.
        bands: Bands of ``k / bands`` values.
        margin: Keep pairs estimated this far below ``threshold`` too (to verify them exactly).
        max_bucket: Rows sharing one band key beyond this many are paired up to this many.

    Returns:
        ``(P, 2)`` int64 pairs, each once and sorted (row of ``a``, row of ``b`` or ``a``), and
        their ``(P,)`` estimates.
    """
    rows = a if b is None else torch.cat([a, b])
    empty = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)
    if len(rows) < 2:
        return empty
    found = []
    for key in _band_keys(rows, bands):
        left, right = _same_key(key, max_bucket)
        if b is not None:
            across = (left < len(a)) != (right < len(a))
            left, right = left[across], right[across]
        found.append(torch.stack([left.minimum(right), left.maximum(right)], dim=1))
    pairs = torch.unique(torch.cat(found), dim=0) if found else empty[0]
    if len(pairs) == 0:
        return empty
    estimate = estimated_jaccard(rows[pairs[:, 0]], rows[pairs[:, 1]])
    keep = estimate >= threshold - margin
    pairs, estimate = pairs[keep], estimate[keep]
    if b is not None:
        pairs[:, 1] -= len(a)
    order = torch.argsort(pairs[:, 0] * (len(rows) + 1) + pairs[:, 1])
    return pairs[order], estimate[order]


def distinct_counts(grams: torch.Tensor) -> torch.Tensor:
    """Distinct values per row of ``grams`` (``(B, S)``): each sequence's number of different
    n-grams."""
    if grams.shape[1] == 0:
        return torch.zeros(len(grams), dtype=torch.int64)
    ordered = grams.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)


def min_ngrams(threshold: float, n: int = SHINGLE) -> int:
    """The fewest distinct n-grams a sequence needs for an overlap of ``threshold`` to mean
    "at most one changed token in this many n-grams": one substituted token changes up to ``n``
    n-grams, so ``k`` substitutions leave a Jaccard of at least ``(S - n k) / (S + n k)``, which
    is ``threshold`` at ``S = n k (1 + threshold) / (1 - threshold)`` (27 for 0.8). Shorter
    sequences differing by one token (``good movie``/``bad movie``) can fall on either side.

    Example:
        >>> min_ngrams(0.8), min_ngrams(0.9)
        (27, 57)
    """
    return math.ceil(n * (1 + threshold) / (1 - threshold) - 1e-9)


def background_share(sig: torch.Tensor, threshold: float, pairs: int = 2000,
                     seed: int = 0) -> float:
    """The share of random distinct pairs of ``sig`` estimated at ``threshold`` or above: how
    often chance alone makes two sequences "near duplicates" (0 for text; near 1 for short
    sequences over a few symbols, such as binary features)."""
    n = len(sig)
    if n < 2:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(n, (pairs,), generator=gen)
    j = (i + torch.randint(1, n, (pairs,), generator=gen)) % n  # never i itself
    return float((estimated_jaccard(sig[i], sig[j]) >= threshold).float().mean())


def margin_for(num_hashes: int = NUM_HASHES, threshold: float = 0.8, sigmas: float = 4.0,
               ) -> float:
    """How far below ``threshold`` an estimate can fall for a pair exactly at it
    (``sigmas`` standard deviations of the MinHash estimate)."""
    return sigmas * math.sqrt(threshold * (1 - threshold) / num_hashes)

"""Reference checks of the token-sequence maths (``lightning_diag.functional.tokens``)."""

from __future__ import annotations

import itertools
import math

import torch

from lightning_diag.functional.tokens import (
    background_share,
    distinct_counts,
    estimated_jaccard,
    is_token_sequence,
    jaccard,
    margin_for,
    min_ngrams,
    minhash,
    shingles,
    similar_signature_pairs,
)


def ngram_set(seq: list[int], n: int = 3) -> set[tuple[int, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def random_text(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_jaccard_of_shingles_is_that_of_the_ngram_sets():
    x = random_text(30, 12, 6, 0)  # a small vocabulary: overlaps of every size
    grams = shingles(x)
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = ngram_set(x[i].tolist()), ngram_set(x[j].tolist())
        assert math.isclose(jaccard(grams[i], grams[j]), len(a & b) / len(a | b))
    assert distinct_counts(grams).tolist() == [len(ngram_set(r.tolist())) for r in x]


def test_padding_past_the_length_leaves_the_set_unchanged():
    x = random_text(4, 10, 50, 1)
    lengths = torch.tensor([10, 7, 4, 2])
    padded = x.clone()
    for row, size in enumerate(lengths.tolist()):
        padded[row, size:] = 0
    grams = shingles(padded, lengths=lengths)
    for row, size in enumerate(lengths.tolist()):
        alone = shingles(x[row:row + 1, :size])[0]
        assert set(grams[row].tolist()) == set(alone.tolist())


def test_minhash_estimates_the_jaccard_within_its_standard_deviation():
    base = random_text(1, 60, 10_000, 2)[0]
    rows = [base]
    for changed in range(0, 40, 2):  # more and more tokens replaced
        other = base.clone()
        other[:changed] = torch.arange(20_000, 20_000 + changed)
        rows.append(other)
    grams = shingles(torch.stack(rows))
    sig = minhash(grams)
    for k in range(1, len(rows)):
        exact_j = jaccard(grams[0], grams[k])
        estimate = float(estimated_jaccard(sig[0], sig[k]))
        sd = math.sqrt(max(exact_j * (1 - exact_j), 1e-4) / sig.shape[1])
        assert abs(estimate - exact_j) <= 4 * sd + 1e-9, (k, exact_j, estimate)


def test_banding_finds_planted_near_copies_among_unrelated_sequences():
    x = random_text(2000, 40, 5000, 3)
    x[1500] = x[10]
    x[1500, 20] = 4999  # one token changed: Jaccard 35/41 = 0.85
    x[700, 5:] = x[300, 5:]  # the first five tokens changed: Jaccard 33/43 = 0.77
    grams = shingles(x)
    pairs, _ = similar_signature_pairs(minhash(grams), threshold=0.8,
                                       margin=margin_for())
    found = {tuple(p) for p in pairs.tolist()}
    assert (10, 1500) in found
    assert found <= {(10, 1500), (300, 700)}  # nothing unrelated; the 0.77 pair is borderline


def test_banding_across_two_sets_pairs_only_across():
    a, b = random_text(300, 40, 5000, 4), random_text(200, 40, 5000, 5)
    b[50] = a[7]
    b[60] = a[7]
    pairs, _ = similar_signature_pairs(minhash(shingles(a)), minhash(shingles(b)),
                                       threshold=0.8)
    assert pairs.tolist() == [[7, 50], [7, 60]]


def test_min_ngrams_is_where_one_substitution_keeps_the_threshold():
    for threshold in (0.7, 0.8, 0.9):
        need = min_ngrams(threshold)
        # one substitution inside a sequence of `need` distinct 3-grams changes 3 of them
        assert (need - 3) / (need + 3) >= threshold - 1e-12
        assert (need - 4) / (need + 2) < threshold  # one fewer: below it


def test_background_share_and_what_counts_as_a_token_sequence():
    text = minhash(shingles(random_text(300, 40, 5000, 6)))
    three_symbols = minhash(shingles(torch.randint(0, 3, (300, 200),
                                                   generator=torch.Generator().manual_seed(0))))
    assert background_share(text, 0.8) == 0.0 and background_share(three_symbols, 0.8) > 0.9
    assert is_token_sequence(torch.tensor([1, 2, 3], dtype=torch.int32))
    assert not is_token_sequence(torch.zeros(3, dtype=torch.uint8))  # pixels
    assert not is_token_sequence(torch.zeros(2, 3, dtype=torch.long))  # one dimension only
    assert not is_token_sequence(torch.zeros(3, dtype=torch.bool))

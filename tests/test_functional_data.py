"""Reference checks of the data-inspection maths against direct torch expressions."""

from __future__ import annotations

import pytest
import torch

from lightning_diag.functional.data import (
    candidate_threshold,
    centered_cosine,
    class_counts,
    connected_groups,
    constant_mask,
    duplicate_groups,
    hashed_similar_pairs,
    image_grid,
    imbalance_ratio,
    principal_direction,
    projection_matrix,
    reduce_samples,
    sample_hashes,
    similar_pairs,
)


def test_hashes_group_exactly_the_equal_rows() -> None:
    x = torch.randint(0, 3, (40, 2)).float()  # many accidental equal rows
    groups = duplicate_groups(sample_hashes(x))
    expected: dict[tuple[float, ...], list[int]] = {}
    for i, row in enumerate(x.tolist()):
        expected.setdefault(tuple(row), []).append(i)
    assert groups == sorted((g for g in expected.values() if len(g) > 1), key=lambda g: g[0])
    assert len(set(sample_hashes(torch.eye(5)))) == 5


def test_reduced_representation_is_the_correlation_without_projection() -> None:
    x = torch.randn(20, 16, dtype=torch.float64).float()
    rep = reduce_samples(x)
    torch.testing.assert_close(rep @ rep.T, torch.corrcoef(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(centered_cosine(x, x.flip(0)), torch.corrcoef(x).flip(1).diag())
    x[3] = 7.0  # constant: the zero vector, similar to nothing
    assert reduce_samples(x)[3].abs().sum() == 0


def test_projection_keeps_noisy_copies_above_the_candidate_threshold() -> None:
    before = torch.get_rng_state()
    proj = projection_matrix(784, 64, seed=3)
    assert torch.equal(before, torch.get_rng_state())
    assert proj is not None and proj.shape == (784, 64) and projection_matrix(64, 64) is None
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(500, 784, generator=gen)
    noisy = base + 0.015 * torch.randn(500, 784, generator=gen)
    true = centered_cosine(base, noisy)
    assert bool((true >= 0.997).all())
    projected = (reduce_samples(base, proj) * reduce_samples(noisy, proj)).sum(1)
    assert bool((projected >= candidate_threshold(0.997, projected=True)).all())
    assert candidate_threshold(0.997, projected=False) == 0.997


@pytest.mark.parametrize("cross", [False, True])
def test_chunked_pairs_match_the_full_matrix(cross: bool) -> None:
    a = reduce_samples(torch.randn(300, 4))
    b = reduce_samples(torch.randn(120, 4)) if cross else None
    pairs, sims = similar_pairs(a, b, threshold=0.8, chunk=16)
    assert len(pairs) > 50
    full = a @ (a if b is None else b).T
    hit = full >= 0.8
    if b is None:
        hit = hit.triu(diagonal=1)
    expected = sorted(map(tuple, hit.nonzero().tolist()))
    assert sorted(map(tuple, pairs.tolist())) == expected
    torch.testing.assert_close(sims, full[pairs[:, 0], pairs[:, 1]])


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("max_bucket", [256, 4])  # 4: the large buckets compared as blocks
def test_hashed_pairs_are_the_full_matrix_pairs(cross: bool, max_bucket: int) -> None:
    gen = torch.Generator().manual_seed(0)

    def rows(n: int) -> torch.Tensor:
        x = torch.randn(n, 32, generator=gen)
        x[: n // 10] = x[0] + 0.15 * torch.randn(n // 10, 32, generator=gen)  # one tight cluster
        copies = torch.randint(0, n, (n // 20,), generator=gen)  # near copies at cos ~0.9987
        x[n - len(copies):] = x[copies] + 0.05 * torch.randn(len(copies), 32, generator=gen)
        x[5] = 0.0  # zero rows are similar to nothing
        return torch.nn.functional.normalize(x, dim=1)

    a = rows(3000)
    b = torch.cat([rows(500), a[:50] + 0.0]) if cross else None  # b holds copies of a's rows
    pairs, sims = hashed_similar_pairs(a, b, threshold=0.99, max_bucket=max_bucket)
    full = a @ (a if b is None else b).T
    hit = full >= 0.99
    if b is None:
        hit = hit.triu(diagonal=1)
    expected = sorted(map(tuple, hit.nonzero().tolist()))
    assert len(expected) > 100
    assert sorted(map(tuple, pairs.tolist())) == expected
    torch.testing.assert_close(sims, full[pairs[:, 0], pairs[:, 1]])


def test_principal_direction_is_the_top_singular_vector() -> None:
    x = torch.randn(200, 6) * torch.tensor([1.0, 5.0, 1.0, 1.0, 0.5, 1.0])
    w = principal_direction(x)
    assert float(w.norm()) == pytest.approx(1.0) and abs(float(w[1])) > 0.95


def test_connected_groups_union_chains() -> None:
    pairs = torch.tensor([[5, 1], [1, 9], [3, 4], [7, 7]])
    assert connected_groups(pairs) == [[1, 5, 9], [3, 4]]
    assert connected_groups(torch.zeros(0, 2, dtype=torch.long)) == []


def test_counts_ratio_and_constant_rows() -> None:
    labels = torch.tensor([0, 0, 0, 2, 2, 7, -1])
    counts = class_counts(labels, 4)
    assert counts.tolist() == [3, 0, 2, 0]
    assert imbalance_ratio(counts) == 1.5
    assert imbalance_ratio(torch.tensor([0, 5])) == 1.0
    x = torch.tensor([[1.0, 1.0], [1.0, 2.0], [0.0, 0.0]])
    assert constant_mask(x).tolist() == [True, False, True]


def test_image_grid_tiles_rows() -> None:
    imgs = [torch.rand(1, 4, 5) for _ in range(3)]
    grid = image_grid([imgs[:2], imgs[2:], []], pad=1)
    assert grid.shape == (3, 2 * 5 + 1, 2 * 6 + 1)
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0
    big = image_grid([imgs[:1]], pad=0, scale=3)
    assert big.shape == (3, 12, 15)
    assert torch.equal(big[:, ::3, ::3], image_grid([imgs[:1]], pad=0))
